"""The blocking core: each runner built on concurrent.futures-style primitives.

The facade (:mod:`taskrunners.task_runners`), flows, futures and compat reach it only
through :mod:`taskrunners._core.seam`. Modules:

- ``base``: what every blocking runner shares (start/stop, submission, waiting,
  pickling) and the hooks a backend implements; ``calls``: call handles;
  ``running``: running one call to a State; ``seam``: the core as other layers use it.
- ``sequential``, ``concurrent`` (with ``thread_pool`` and ``loop_thread``),
  ``interrupts`` (Ctrl-C during a Sequential call): the in-process runners.
- ``remote`` and ``records``: what the runners that send calls to other processes
  share; then one module per backend and its parts (``parallel*``, ``dask*``,
  ``ray*``), each with an ``*_engine`` module holding the engine's private names.
"""
