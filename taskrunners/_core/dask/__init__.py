"""The DaskTaskRunner: calls on a Dask cluster. The runner (``runner``), its batches
(``batches``), call handles (``calls``), a block's client and cluster (``cluster``),
what runs on the workers (``worker``), and distributed's private names
(``dask_private``)."""
