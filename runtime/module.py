"""A compiled g3n folder loaded into IREE: integrity checks, the host-side PLE gather, prefill/decode calls."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from .archive import ArchiveReader, to_float32

MANIFEST = "g3n.json"


class ModelError(RuntimeError):
    """A compiled folder (or a request to it) that cannot be used; the message says why."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class CompiledModel:
    """The text modules of one target. KV caches live in the module (device memory) between calls."""

    def __init__(self, folder: str | Path, device: str | None = None, target: str | None = None):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise ModelError(f"{self.folder}: not a g3n output folder (no {MANIFEST}); create one with g3n-compile")
        try:
            self.manifest = m = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}: not valid JSON ({e})") from None
        targets = m["targets"]
        target = target or next(iter(targets))
        if target not in targets:
            raise ModelError(f"{self.folder}: no module for target {target!r} (compiled: {', '.join(targets)})")
        self.target = target
        self.device_name = device or targets[target]["driver"]
        vmfb = self.folder / targets[target]["file"]
        irpa = self.folder / m["parameters"]["file"]
        for f in (vmfb, irpa):
            if not f.is_file():
                raise ModelError(f"{f}: missing (recompile with g3n-compile)")
        if sha256_file(vmfb) != targets[target]["sha256"]:
            raise ModelError(f"{vmfb}: does not match {MANIFEST} (it was replaced or rebuilt); recompile the folder")
        self.archive = ArchiveReader(irpa)
        stored = self.archive.bytes(m["parameters"]["archive_id_entry"]).decode(errors="replace") \
            if m["parameters"]["archive_id_entry"] in self.archive.entries else None
        if stored != m["parameters"]["archive_id"]:
            raise ModelError(f"{irpa}: this parameter archive does not belong to {vmfb.name} "
                             f"(archive id {stored or 'missing'}, module expects {m['parameters']['archive_id']})")
        ple = m["per_layer_rows"]
        self.per_layer_dtype = ple["dtype"]
        self.per_layer_table = self.archive.array(ple["parameter"], ple["dtype"], tuple(ple["shape"]))
        self.chunk = m["prefill_chunk"]
        self.max_context = m["max_context"]
        self.vocab_size = m["config"]["vocab_size"]
        self._load_iree(vmfb, irpa)

    def _load_iree(self, vmfb: Path, irpa: Path) -> None:
        import iree.runtime as rt

        t0 = time.perf_counter()
        try:
            self.config = rt.Config(self.device_name)
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"IREE device {self.device_name!r} is not available here ({e})") from None
        index = rt.ParameterIndex()
        index.load(str(irpa))
        instance = self.config.vm_instance
        modules = [
            rt.create_io_parameters_module(instance, index.create_provider(scope=self.manifest["parameters"]["scope"])),
            rt.create_hal_module(instance, self.config.device),
            rt.VmModule.mmap(instance, str(vmfb)),
        ]
        try:
            self.context = rt.VmContext(instance, modules=modules)
        except RuntimeError as e:
            raise ModelError(f"{vmfb.name} could not be loaded with {irpa.name}: {str(e).splitlines()[0]}") from None
        main = modules[-1]
        self._prefill = rt.FunctionInvoker(self.context, self.config.device, main.lookup_function("prefill"))
        self._decode = rt.FunctionInvoker(self.context, self.config.device, main.lookup_function("decode"))
        self.load_seconds = time.perf_counter() - t0

    def per_layer_rows(self, ids: np.ndarray) -> np.ndarray:
        """Host-side gather from the memory-mapped PLE table; ids outside it read row 0."""
        rows = self.per_layer_table
        safe = np.where((ids >= 0) & (ids < rows.shape[0]), ids, 0)
        picked = to_float32(rows[safe.reshape(-1)], self.per_layer_dtype)
        return np.ascontiguousarray(picked).reshape(*ids.shape, rows.shape[1])

    def prefill(self, ids: list[int], start: int) -> np.ndarray:
        """Run `ids` (any count) at positions start..; returns the logits [vocab] of the last one."""
        logits = None
        for offset in range(0, len(ids), self.chunk):
            part = ids[offset:offset + self.chunk]
            padded = np.zeros((1, self.chunk), dtype=np.int64)
            padded[0, :len(part)] = part
            logits = self._prefill(padded, self.per_layer_rows(padded), np.array([start + offset], np.int64),
                                   np.array([len(part)], np.int64))
        return np.array(logits.to_host(), dtype=np.float32).reshape(-1)  # a copy: IREE reuses the buffer

    def decode(self, token: int, position: int) -> np.ndarray:
        ids = np.array([[token]], dtype=np.int64)
        logits = self._decode(ids, self.per_layer_rows(ids), np.array([position], np.int64))
        return np.array(logits.to_host(), dtype=np.float32).reshape(-1)  # a copy: IREE reuses the buffer
