"""The RayTaskRunner: calls on a Ray cluster. The runner (``runner``), how calls are
handed to Ray (``sending``) and what they hold (``calls``), the connection
(``connection``), per-call resources (``options``), what Ray's failures mean for each
call (``outcomes``), what runs in the workers (``worker``), and Ray's private names
(``ray_private``)."""
