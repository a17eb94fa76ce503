"""Write the `.irpa` parameter archive one tensor at a time.

Each tensor is converted on its own and appended to a scratch file; the archive index then points IREE
at regions of that file and `create_archive_file` copies them into place. Peak memory is one tensor.
An `g3n.archive_id` entry (random bytes, also recorded in g3n.json) ties the archive to its modules.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable, Iterable

import iree.runtime as rt
import numpy as np
import torch

from runtime.archive import ARCHIVE_ID  # the entry the runtime checks


def write_archive(path: Path, names: Iterable[str], get: Callable[[str], torch.Tensor], log=print) -> str:
    """Write `names` (tensors from `get`) to `path`; returns the archive id."""
    path = Path(path)
    scratch = path.with_name(path.name + ".scratch")
    archive_id = uuid.uuid4().hex
    entries = []
    names = list(names)
    with open(scratch, "wb") as f:
        for i, name in enumerate(names):
            data = get(name).detach().contiguous()
            blob = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else np.zeros(0, np.uint8)
            entries.append((name, f.tell(), blob.nbytes))
            f.write(blob.data)
            f.write(b"\0" * (-blob.nbytes % 64))  # keep every tensor 64-byte aligned
            if (i + 1) % 100 == 0:
                log(f"  archived {i + 1}/{len(names)} tensors")
        id_offset = f.tell()
        f.write(archive_id.encode())
    fd = os.open(scratch, os.O_RDONLY)
    try:
        handle = rt.FileHandle.wrap_fd(fd)
        index = rt.ParameterIndex()
        for name, offset, length in entries:
            index.add_from_file_handle(name, handle, length, offset)
        index.add_from_file_handle(ARCHIVE_ID, handle, len(archive_id), id_offset)
        index.create_archive_file(str(path))
    finally:
        os.close(fd)
        scratch.unlink()
    return archive_id
