"""A compiled g3n folder loaded into IREE: the module for the device, integrity checks, the host-side PLE
gather, prefill/decode calls, and the audio/vision encoders (loaded when a prompt first needs them)."""

from __future__ import annotations

import time
from pathlib import Path

import iree.runtime as rt
import numpy as np

from .abi import MANIFEST, AudioEncoder, Function, Manifest, ManifestError, TargetModule, VisionEncoder, sha256_file
from .archive import ArchiveReader, to_float32
from .device import PRELOAD_PARAMETERS, Device, DeviceError, Readback
from .errors import UserError


class ModelError(UserError, RuntimeError):
    """A compiled folder (or a request to it) that cannot be used; the message says why."""


def _pick_module(folder: Path, targets: dict[str, TargetModule], device: str | None, target: str | None
                 ) -> tuple[str, Device]:
    """(target, device): the folder's module for `device` (default: the first module, on its own driver)."""
    compiled = ", ".join(f"{name} ({t.driver})" for name, t in targets.items()) or "nothing"
    try:
        wanted = Device.parse(device) if device else None
    except DeviceError as e:
        raise ModelError(str(e)) from None
    if target is None and wanted is not None:
        target = next((name for name, t in targets.items() if wanted.runs(t.driver)), None)
        if target is None:
            raise ModelError(f"{folder}: no module for {wanted.kind} devices (compiled: {compiled}); "
                             f"add one with g3n-compile --target {wanted.kind} -o {folder}")
    target = target or next(iter(targets), None)
    if target not in targets:
        raise ModelError(f"{folder}: no module for target {target!r} (compiled: {compiled})")
    wanted = wanted or Device(targets[target].driver)
    if not wanted.runs(targets[target].driver):
        raise ModelError(f"{folder}: the {target} module does not run on {wanted.kind} devices")
    return target, wanted


class CompiledModel:
    """The text modules of one target. KV caches live in the module (device memory) between calls.

    `device`: cpu, vulkan, cuda (`:N` for the Nth of that kind) or an IREE driver name; it picks the
    folder's module for that kind of device. Default: the folder's first target, on its own driver."""

    def __init__(self, folder: str | Path, device: str | None = None, target: str | None = None):
        self.folder = Path(folder)
        try:
            self.manifest = m = Manifest.read(self.folder)
        except ManifestError as e:
            raise ModelError(str(e)) from None
        if m.parameters is None:
            raise ModelError(f"{self.folder}: {MANIFEST} lists no parameter archive (an unfinished compile); recompile "
                             f"with g3n-compile")
        self.target, self.device = _pick_module(self.folder, m.targets, device, target)
        entry = m.targets[self.target]
        vmfb = self.folder / entry.file
        irpa = self.folder / m.parameters.file
        for f in (vmfb, irpa):
            if not f.is_file():
                raise ModelError(f"{f}: missing (recompile with g3n-compile)")
        if sha256_file(vmfb) != entry.sha256:
            raise ModelError(f"{vmfb}: does not match {MANIFEST} (it was replaced or rebuilt); recompile the folder")
        self.archive = ArchiveReader(irpa)
        stored = self.archive.bytes(m.parameters.archive_id_entry).decode(errors="replace") \
            if m.parameters.archive_id_entry in self.archive.entries else None
        if stored != m.parameters.archive_id:
            raise ModelError(f"{irpa}: this parameter archive does not belong to {vmfb.name} "
                             f"(archive id {stored or 'missing'}, module expects {m.parameters.archive_id})")
        tokens = m.multimodal_tokens
        self.token_table = None if tokens is None else self.archive.array(tokens.parameter, tokens.dtype, tokens.shape)
        self.token_table_first = tokens.first_id if tokens else 0
        self._encoders = {}
        ple = m.per_layer_rows
        self.per_layer_dtype = ple.dtype
        self.per_layer_table = self.archive.array(ple.parameter, ple.dtype, ple.shape)
        self.prefill_abi, self.decode_abi = m.functions["prefill"], m.functions["decode"]
        self.chunk = self.prefill_abi.arg("input_ids").shape[1]
        self.max_context = m.max_context
        self.vocab_size = m.config["vocab_size"]
        self.hidden_size = m.config["hidden_size"]
        self._load_iree(vmfb, irpa)

    def _load_iree(self, vmfb: Path, irpa: Path) -> None:
        t0 = time.perf_counter()
        try:
            self.config = rt.Config(device=self.device.open())
        except DeviceError as e:
            raise ModelError(str(e)) from None
        self._index = rt.ParameterIndex()
        self._index.load(str(irpa), mmap=self.device.driver not in PRELOAD_PARAMETERS)
        self._prefill, self._decode = self._functions(vmfb, "prefill", "decode")
        self._read = Readback(self.config.device)
        self.load_seconds = time.perf_counter() - t0

    def _functions(self, vmfb: Path, *names: str) -> list:
        """Invokers of `names` in module `vmfb`, in a context of its own on this device and archive."""
        instance = self.config.vm_instance
        modules = [
            rt.create_io_parameters_module(instance,
                                           self._index.create_provider(scope=self.manifest.parameters.scope)),
            rt.create_hal_module(instance, self.config.device),
            rt.VmModule.mmap(instance, str(vmfb)),
        ]
        try:
            context = rt.VmContext(instance, modules=modules)
        except RuntimeError as e:
            raise ModelError(f"{vmfb.name} could not be loaded with {self.manifest.parameters.file}: "
                             f"{str(e).splitlines()[0]}") from None
        return [rt.FunctionInvoker(context, self.config.device, modules[-1].lookup_function(n)) for n in names]

    def encoder(self, kind: str) -> tuple[AudioEncoder | VisionEncoder, object]:
        """The folder's `kind` ("audio" or "vision") encoder for this target: (its ABI from g3n.json, its
        function), loaded on first use."""
        if kind not in self._encoders:
            abi = self.manifest.encoders.get(kind)
            entry = self.manifest.targets[self.target].encoders.get(kind)
            if abi is None or entry is None:
                medium = "images" if kind == "vision" else "audio"
                if abi is None:
                    raise ModelError(f"{self.folder} has no {kind} encoder: the checkpoint it was compiled from has "
                                     f"no {kind} tower, so prompts with {medium} cannot run on it")
                raise ModelError(f"{self.folder} has no {kind} encoder for {self.target} (it did not compile for "
                                 f"that target); run prompts with {medium} on another device of the folder")
            path = self.folder / entry.file
            if not path.is_file():
                raise ModelError(f"{path}: missing (recompile with g3n-compile)")
            if sha256_file(path) != entry.sha256:
                raise ModelError(f"{path}: does not match {MANIFEST} (it was replaced or rebuilt); recompile the folder")
            self._encoders[kind] = abi, self._functions(path, abi.function)[0]
        return self._encoders[kind]

    def encode(self, kind: str, *inputs: np.ndarray) -> np.ndarray:
        """Run the `kind` encoder: its soft tokens [soft_tokens, hidden] as float32."""
        _, function = self.encoder(kind)
        return self._read(function(*inputs))[0]

    def token_embedding(self, token: int) -> np.ndarray | None:
        """The embedding of a multimodal token id (its embedder's row, float32 [hidden]); None for a text id."""
        row = token - self.token_table_first
        if self.token_table is None or not 0 <= row < self.token_table.shape[0]:
            return None
        return np.asarray(self.token_table[row], dtype=np.float32)

    def per_layer_rows(self, ids: np.ndarray) -> np.ndarray:
        """Host-side gather from the memory-mapped PLE table; ids outside it read row 0."""
        rows = self.per_layer_table
        safe = np.where((ids >= 0) & (ids < rows.shape[0]), ids, 0)
        picked = to_float32(rows[safe.reshape(-1)], self.per_layer_dtype)
        return np.ascontiguousarray(picked).reshape(*ids.shape, rows.shape[1])

    def prefill(self, ids: list[int], start: int, embeds: np.ndarray | None = None,
                embeds_mask: np.ndarray | None = None) -> np.ndarray:
        """Run `ids` (any count) at positions start..; returns the logits [vocab] of the last one.
        `embeds` [len(ids), hidden] replaces the embedding of the tokens where `embeds_mask` [len(ids)]
        is True (soft tokens may straddle chunks)."""
        logits = None
        for offset in range(0, len(ids), self.chunk):
            part = ids[offset:offset + self.chunk]
            padded = np.zeros((1, self.chunk), dtype=np.int64)
            padded[0, :len(part)] = part
            chunk_embeds = np.zeros((1, self.chunk, self.hidden_size), dtype=np.float32)
            chunk_mask = np.zeros((1, self.chunk), dtype=bool)
            if embeds is not None:
                chunk_embeds[0, :len(part)] = embeds[offset:offset + self.chunk]
                chunk_mask[0, :len(part)] = embeds_mask[offset:offset + self.chunk]
            logits = self._call(self._prefill, self.prefill_abi, input_ids=padded,
                                per_layer_rows=self.per_layer_rows(padded), start=np.array([start + offset], np.int64),
                                length=np.array([len(part)], np.int64), embeds=chunk_embeds, embeds_mask=chunk_mask)
        return self._read(logits).reshape(-1)

    def decode(self, token: int, position: int) -> np.ndarray:
        ids = np.array([[token]], dtype=np.int64)
        logits = self._call(self._decode, self.decode_abi, input_ids=ids, per_layer_rows=self.per_layer_rows(ids),
                            start=np.array([position], np.int64))
        return self._read(logits).reshape(-1)

    @staticmethod
    def _call(function, abi: Function, **inputs: np.ndarray):
        """`function` with `inputs` in the order its ABI lists its arguments."""
        return function(*(inputs[a.name] for a in abi.args))
