"""Flows and tasks (not implemented yet)."""

__all__ = ["flow", "task", "unmapped", "wait", "as_completed"]


def _missing(*args, **kwargs):
    raise NotImplementedError("flows are not implemented yet")


flow = task = unmapped = wait = as_completed = _missing
