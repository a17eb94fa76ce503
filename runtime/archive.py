"""An `.irpa` parameter archive: its index, which IREE's parameter provider serves to the modules, and its
named entries read from the host, memory-mapped. An archive IREE cannot parse (empty, truncated, another
kind of file, entries past its end) or whose host-read tables are not the size g3n.json gives them is one
ArchiveError line."""

from __future__ import annotations

import math
from pathlib import Path

import iree.runtime as rt
import numpy as np

from .device import IREE_ERRORS, iree_reason
from .errors import UserError

ARCHIVE_ID = "g3n.archive_id"


class ArchiveError(UserError, RuntimeError):
    """A parameter archive that is damaged or not the one g3n.json describes. A RuntimeError, as g3n-compile
    expects of a folder it overwrites."""


class ArchiveReader:
    def __init__(self, path: Path, mmap: bool = True):
        """`mmap`: IREE maps the file (else it reads it into memory) when it serves the parameters."""
        self.path = Path(path)
        self.index = rt.ParameterIndex()
        try:
            self.index.load(str(self.path), mmap=mmap)  # IREE checks the header and that entries lie in the file
            self.entries = {key: (e.file_storage[1], e.length) for key, e in self.index.items() if e.is_file}
        except IREE_ERRORS as e:  # also nanobind's RuntimeError on entry names that are not UTF-8
            raise self.error(iree_reason(e)) from None

    def error(self, what: str) -> ArchiveError:
        return ArchiveError(f"{self.path}: not a complete g3n parameter archive ({what}); recompile with g3n-compile")

    def bytes(self, name: str) -> bytes:
        offset, length = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def array(self, name: str, dtype: str, shape: tuple[int, ...]) -> np.memmap:
        """Entry `name` as a read-only memory map; bfloat16 (which numpy lacks) maps as its uint16 bits."""
        if name not in self.entries:
            raise self.error(f"no entry {name}")
        storage = np.dtype(_STORAGE.get(dtype, dtype))
        offset, length = self.entries[name]
        if length != storage.itemsize * math.prod(shape):
            raise self.error(f"entry {name} holds {length} bytes, not the {storage.itemsize * math.prod(shape)} of "
                             f"{dtype}{list(shape)} that g3n.json gives it")
        return np.memmap(self.path, dtype=storage, mode="r", offset=offset, shape=shape)


_STORAGE = {"bfloat16": np.uint16}


def to_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Values read with `ArchiveReader.array(..., dtype)` as float32 (bfloat16 is the top half of a float32)."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)
