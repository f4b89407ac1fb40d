"""The blocking core: each runner built on concurrent.futures-style primitives.

Every module outside this package (the facade, flows, futures, sync, compat,
benchmarks) imports from it only :mod:`taskrunners._core.seam`, which re-exports
what they use and holds the driving they share; ``tests/test_layout.py`` checks it.
Modules:

- At the top, what belongs to no one backend: ``base`` (start/stop, submission,
  waiting, pickling, and the hooks a backend implements), ``calls`` (call handles),
  ``futures`` (task runs, and the futures that hold their calls), ``running``
  (running one call to a State), ``batching`` (grouping calls into batches),
  ``waiting`` (waiting for a call from async code), ``keywords`` (checking keyword
  arguments meant for an engine), ``arguments`` (checking a submission's arguments),
  ``settings`` (a runner's documented settings, which its facade shows too) and
  ``seam`` (the one door in).
- ``local/``: the runners that run calls in this process, Sequential and Concurrent.
- ``remote/``: what the runners that send calls to other processes share.
- ``parallel/``, ``dask/``, ``ray/``: one package per such backend, its runner in
  ``runner``, and a ``*_private`` module holding its engine's private names.
"""
