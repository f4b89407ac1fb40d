"""The runners that run calls in this process: Sequential (``sequential``, with
``interrupts`` for a Ctrl-C during a call) and Concurrent (``threads``, on a
``thread_pool`` and, for coroutines, a ``loop_thread``)."""
