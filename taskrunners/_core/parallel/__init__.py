"""The ParallelTaskRunner: local worker processes on loky. The runner (``runner``),
its pool (``pool``) with one loky executor per ``generation``, the call handles and
batches (``calls``), the Crashed states (``crashes``), what runs in the workers
(``worker``), and loky's private names (``loky_private``)."""
