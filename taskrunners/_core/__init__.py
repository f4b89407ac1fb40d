"""The blocking core: one module per runner, built on concurrent.futures-style primitives."""
