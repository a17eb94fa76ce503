"""The safetensors file format, read memory-mapped and written tensor by tensor.

Layout: 8-byte little-endian header length N, N bytes of JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the data.
Reading maps the file and hands out zero-copy tensors, so an E4B checkpoint (16 GB bf16) costs page
cache, not RSS. Writing takes the header up front and then streams one tensor at a time, so a
multi-gigabyte random checkpoint never has to exist in memory as a whole.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from runtime.errors import UserError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(UserError, ValueError):
    """A file that is not a complete, well-formed safetensors file."""


class TensorInfo:
    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int):
        self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end


class SafetensorsFile:
    """One safetensors file, validated on open (header, offsets, file length); tensors are mmap views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot open ({e.strerror})") from None
        size = self.path.stat().st_size
        if size < 8:
            raise SafetensorsError(f"{self.path}: truncated ({size} bytes; not a safetensors file)")
        (n,) = struct.unpack("<Q", self._file.read(8))
        if n > min(size - 8, _MAX_HEADER):
            raise SafetensorsError(f"{self.path}: header length {n} exceeds the file ({size} bytes): truncated or not safetensors")
        try:
            header = json.loads(self._file.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SafetensorsError(f"{self.path}: header is not valid JSON (corrupt or not safetensors)") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, spec in header.items():
            self.tensors[name] = self._parse_entry(name, spec, data_len)
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def _parse_entry(self, name: str, spec, data_len: int) -> TensorInfo:
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(o) for o in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed header entry: {spec!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise SafetensorsError(f"{self.path}: tensor {name!r} declares {end - begin} bytes for shape {list(shape)} "
                                   f"{spec['dtype']} ({nbytes} bytes expected)")
        if end > data_len:
            raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} ends at byte {self._data_start + end} "
                                   f"but the file has {self._data_start + data_len}")
        return TensorInfo(dtype, shape, begin, end)

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy, copy-on-write view of the tensor's bytes."""
        info = self.tensors[name]
        if info.end == info.begin:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=info.end - info.begin,
                                offset=self._data_start + info.begin)
        return flat.view(info.dtype).view(info.shape)

    def close(self):
        # Tensors handed out keep the mapping alive; closing the file object is enough.
        self._file.close()


def write_safetensors(path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors are named and shaped by `specs`, calling `produce(name)`
    for one tensor at a time (in `specs` order) so that only one is in memory. `produce` may also
    return the tensor as row blocks (an iterable of tensors that concatenate along dim 0 to it), so
    that not even one multi-gigabyte tensor has to be in memory whole."""
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (dtype, shape) in specs.items():
            produced = produce(name)
            rows = 0
            for t in [produced] if isinstance(produced, torch.Tensor) else produced:
                if t.dtype != dtype or tuple(t.shape[1:]) != tuple(shape[1:]) or t.dim() != len(shape):
                    raise ValueError(f"{name}: produced {t.dtype} {list(t.shape)}, declared {dtype} {list(shape)}")
                if t.numel():
                    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                rows += t.shape[0] if t.dim() else 1
            if rows != (shape[0] if shape else 1):
                raise ValueError(f"{name}: produced {rows} rows, declared {dtype} {list(shape)}")
    tmp.replace(path)
