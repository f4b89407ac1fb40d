"""The blocking core: each runner built on concurrent.futures-style primitives.

The facade (:mod:`taskrunners.task_runners`), flows, futures and compat reach it only
through :mod:`taskrunners._core.seam`. Modules:

- At the top, what belongs to no one backend: ``base`` (start/stop, submission,
  waiting, pickling, and the hooks a backend implements), ``calls`` (call handles),
  ``running`` (running one call to a State), ``batching`` (grouping calls into
  batches), ``waiting`` (waiting for a call from async code), ``keywords``
  (checking keyword arguments meant for an engine), ``settings`` (a runner's
  documented settings, which its facade shows too) and ``seam`` (the core as the
  other layers use it).
- ``local/``: the runners that run calls in this process, Sequential and Concurrent.
- ``remote/``: what the runners that send calls to other processes share.
- ``parallel/``, ``dask/``, ``ray/``: one package per such backend, its runner in
  ``runner``, and a ``*_private`` module holding its engine's private names.
"""
