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
import os
import reprlib
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from runtime.errors import UserError

from .jsonfile import parse_json

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
# The safetensors reference reader's own bound; E4B's largest header is about 100 KB.
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(UserError, ValueError):
    """A file that is not a complete, well-formed safetensors file."""


class TensorInfo:
    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int):
        self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end


def _counts(value, length: int | None = None) -> bool:
    """Whether `value` is a list of non-negative integers (of `length` entries, if given)."""
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


class SafetensorsFile:
    """One safetensors file, validated on open from its header alone (length, JSON, dtypes, shapes, offsets
    inside the file, no two tensors sharing bytes or a name); tensors are mmap views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            size = os.fstat(self._file.fileno()).st_size
            self.tensors, self.metadata = self._read_header(size)
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        except BaseException:
            self._file.close()
            raise

    def _fail(self, what: str) -> SafetensorsError:
        return SafetensorsError(f"{self.path}: {what}; re-download or re-convert this file")

    def _read_header(self, size: int) -> tuple[dict[str, TensorInfo], dict]:
        if size < 8:
            raise self._fail(f"truncated ({size} bytes; not a safetensors file)")
        (n,) = struct.unpack("<Q", self._file.read(8))
        if n > MAX_HEADER:  # checked before reading: a corrupt length must not allocate gigabytes
            raise self._fail(f"header length {n} is over the {MAX_HEADER}-byte bound (corrupt or not safetensors)")
        if n > size - 8:
            raise self._fail(f"header length {n} exceeds the file ({size} bytes): truncated or not safetensors")
        try:
            header = parse_json(self._file.read(n))
        except ValueError as e:
            raise self._fail(f"header is not valid JSON ({e}): corrupt or not safetensors") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise self._fail(f"header: __metadata__ is not an object: {reprlib.repr(metadata)}")
        self._data_start = 8 + n
        tensors = {name: self._parse_entry(name, spec, size - self._data_start) for name, spec in header.items()}
        spans = sorted((info.begin, info.end, name) for name, info in tensors.items() if info.end > info.begin)
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise self._fail(f"tensors {first!r} and {second!r} overlap (bytes {begin}..{end} of the data)")
        return tensors, metadata

    def _parse_entry(self, name: str, spec, data_len: int) -> TensorInfo:
        where = f"tensor {name!r}"
        if not isinstance(spec, dict):
            raise self._fail(f"{where}: header entry is not an object: {reprlib.repr(spec)}")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._fail(f"{where}: dtype {reprlib.repr(dtype)} is not one g3n reads ({', '.join(DTYPES)})")
        if not _counts(shape):
            raise self._fail(f"{where}: shape {reprlib.repr(shape)} is not a list of non-negative integers")
        if not _counts(offsets, 2) or offsets[0] > offsets[1]:
            raise self._fail(f"{where}: data_offsets {reprlib.repr(offsets)} is not [begin, end] with begin <= end")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise self._fail(f"{where} declares {end - begin} bytes for shape {reprlib.repr(shape)} {dtype} "
                             f"({nbytes} bytes expected)")
        if end > data_len:
            raise self._fail(f"truncated: {where} ends at byte {self._data_start + end} but the file has "
                             f"{self._data_start + data_len}")
        return TensorInfo(DTYPES[dtype], tuple(shape), begin, end)

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
