"""The Parallel runner's large values: files in shared memory that its workers map.

Each value shared by the calls of a block (see :mod:`~taskrunners._core.remote.sharing`)
is one file in a folder of the block's own, in ``/dev/shm`` where the system has it
(memory, not disk), else in the temporary folder. A worker maps the file read-only
the first time one of its calls needs the value, and keeps what it loaded while the
file exists: a numpy array is then a read-only view of the mapping, with no copy.
A file is removed when no pending call needs its value, and the folder at the end of
the block; loky's resource tracker removes the folder if this process dies first.
"""

from __future__ import annotations

import mmap
import os
import pickle
import shutil
import tempfile
from typing import Any, List, Optional, Tuple, cast

from loky.backend import resource_tracker

from taskrunners._core.remote import sharing
from taskrunners._core.remote.sharing import MappedCopy, Shared, SharedValues

__all__ = ["SharedFiles", "load_file"]

_SHARED_MEMORY = "/dev/shm"


class SharedFiles(SharedValues):
    """Large values in files of one folder, mapped by the workers."""

    def __init__(self, threshold: int) -> None:
        super().__init__(threshold)
        where = _SHARED_MEMORY if os.access(_SHARED_MEMORY, os.W_OK) else None
        self.folder = tempfile.mkdtemp(prefix=f"taskrunners-shared-{os.getpid()}-", dir=where)
        resource_tracker.register(self.folder, "folder")

    def reduce(self, shared: Shared) -> Tuple[Any, ...]:
        copy = cast(MappedCopy, self._copy_of(shared))  # as _copy made it
        return (load_file, (shared.key, copy.path, copy.header_size, copy.spans))

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.folder, ignore_errors=True)
        resource_tracker.unregister(self.folder, "folder")

    def _open(self, key: str) -> Tuple[int, Optional[str]]:
        path = os.path.join(self.folder, key)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), path

    def _dropped(self, copy: Any) -> None:
        try:
            os.unlink(copy.path)
        except FileNotFoundError:
            pass


def load_file(key: str, path: str, header_size: int, spans: List[Tuple[int, int]]) -> Any:
    """The value shared in ``path``, loaded once in this process (see the module)."""

    def source() -> Any:
        with open(path, "rb") as file:
            memory = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(memory)
        return pickle.loads(
            view[:header_size], buffers=[view[offset : offset + size] for offset, size in spans]
        )

    return sharing.load(key, source, lambda: os.path.exists(path))
