"""What the runners that send calls to other processes share (Parallel, Dask, Ray):
how a call travels there and back (``protocol``), its log records (``records``),
which worker started each call (``slots``), and its arguments as they were at submit
(``snapshots``)."""
