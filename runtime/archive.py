"""Read named entries of an `.irpa` parameter archive from the host, memory-mapped."""

from __future__ import annotations

from pathlib import Path

import iree.runtime as rt
import numpy as np

ARCHIVE_ID = "g3n.archive_id"


class ArchiveReader:
    def __init__(self, path: Path):
        self.path = Path(path)
        index = rt.ParameterIndex()
        index.load(str(self.path))
        self.entries = {key: (e.file_storage[1], e.length) for key, e in index.items() if e.is_file}

    def bytes(self, name: str) -> bytes:
        offset, length = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def array(self, name: str, dtype: str, shape: tuple[int, ...]) -> np.memmap:
        """Entry `name` as a read-only memory map; bfloat16 (which numpy lacks) maps as its uint16 bits."""
        return np.memmap(self.path, dtype=_STORAGE.get(dtype, dtype), mode="r", offset=self.entries[name][0],
                         shape=shape)


_STORAGE = {"bfloat16": np.uint16}


def to_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Values read with `ArchiveReader.array(..., dtype)` as float32 (bfloat16 is the top half of a float32)."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)
