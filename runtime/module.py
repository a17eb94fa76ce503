"""A compiled g3n folder loaded into IREE: the module for the device, integrity checks, the host-side PLE
gather, prefill/decode calls, and the audio/vision encoders (loaded when a prompt first needs them).

Whatever is wrong with a folder is one ModelError line, never a crash or silently wrong output, with one
exception: a `.vmfb` is code, and code whose sha256 g3n.json records is trusted. `_check_module` catches
a damaged module even when its recorded hash was edited to match; a module rebuilt from the same
checkpoint with another --max-context (the same function signatures, caches of another size) is not caught.
"""

from __future__ import annotations

import re
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import iree.runtime as rt
import numpy as np

from .abi import (MANIFEST, AudioEncoder, EncoderModule, Function, Manifest, ManifestError, TargetModule,
                  VisionEncoder, sha256_file)
from .archive import ArchiveError, ArchiveReader, to_float32
from .device import IREE_ERRORS, PRELOAD_PARAMETERS, Device, DeviceError, Readback, available, iree_reason
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
            raise ModelError(f"{folder}: no module for {wanted.kind} devices (compiled: {compiled}; devices here: "
                             f"{', '.join(available()) or 'none'}); add one with g3n-compile --target {wanted.kind} -o "
                             f"{folder}")
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
        vmfb = self._module_file(m.targets[self.target])
        t0 = time.perf_counter()
        try:
            self.config = rt.Config(device=self.device.open())
            # After the device: on drivers in PRELOAD_PARAMETERS, this reads the whole archive into memory.
            self._read_archive(self.folder / m.parameters.file, vmfb.name)
        except (DeviceError, ArchiveError) as e:
            raise ModelError(str(e)) from None
        self._encoders = {}
        self.prefill_abi, self.decode_abi = m.functions["prefill"], m.functions["decode"]
        self.chunk = self.prefill_abi.arg("input_ids").shape[1]
        self.max_context = m.max_context
        self.vocab_size = m.config["vocab_size"]
        self.hidden_size = m.config["hidden_size"]
        self._prefill, self._decode = self._functions(vmfb, self.prefill_abi, self.decode_abi)
        self._read = Readback(self.config.device)
        self.load_seconds = time.perf_counter() - t0

    def _module_file(self, entry: TargetModule | EncoderModule) -> Path:
        """The module file `entry` names, checked against its recorded hash and for damage."""
        path = self.folder / entry.file
        if not path.is_file():
            raise ModelError(f"{path}: missing (recompile with g3n-compile)")
        if sha256_file(path) != entry.sha256:
            raise ModelError(f"{path}: does not match {MANIFEST} (it was replaced or rebuilt); recompile the folder")
        _check_module(path)
        return path

    def _read_archive(self, irpa: Path, module: str) -> None:
        """The archive, checked to be the modules' own, and its host-read tables (as ArchiveError)."""
        m = self.manifest
        if not irpa.is_file():
            raise ArchiveError(f"{irpa}: missing (recompile with g3n-compile)")
        self.archive = ArchiveReader(irpa, mmap=self.device.driver not in PRELOAD_PARAMETERS)
        stored = self.archive.bytes(m.parameters.archive_id_entry) \
            if m.parameters.archive_id_entry in self.archive.entries else b"missing"
        if stored != m.parameters.archive_id.encode():
            shown = stored.decode() if stored.isalnum() else "unreadable"
            raise ArchiveError(f"{irpa}: this parameter archive does not belong to {module} "
                               f"(archive id {shown}, module expects {m.parameters.archive_id}); recompile the folder")
        tokens = m.multimodal_tokens
        self.token_table = None if tokens is None else self.archive.array(tokens.parameter, tokens.dtype, tokens.shape)
        self.token_table_first = tokens.first_id if tokens else 0
        ple = m.per_layer_rows
        self.per_layer_dtype = ple.dtype
        self.per_layer_table = self.archive.array(ple.parameter, ple.dtype, ple.shape)

    def _functions(self, vmfb: Path, *abis: Function) -> list[Callable]:
        """The functions `abis` of module `vmfb`, in a context of its own on this device and archive, each
        called with its inputs by name (`_bind`)."""
        instance = self.config.vm_instance
        try:
            module = rt.VmModule.mmap(instance, str(vmfb))  # IREE verifies the FlatBuffer and the bytecode
        except IREE_ERRORS as e:
            raise ModelError(f"{vmfb}: not a valid IREE module ({iree_reason(e)}); recompile the folder") from None
        missing = [a.name for a in abis if module.lookup_function(a.name) is None]
        if missing:
            public = [n for n in module.function_names if "$" not in n and not n.startswith("__")]
            raise ModelError(f"{vmfb}: has no function {', '.join(missing)} (it has {', '.join(public)}), so it is "
                             f"not the module {MANIFEST} names; recompile the folder")
        try:
            context = rt.VmContext(instance, modules=[
                rt.create_io_parameters_module(
                    instance, self.archive.index.create_provider(scope=self.manifest.parameters.scope)),
                rt.create_hal_module(instance, self.config.device), module])
        except IREE_ERRORS as e:
            reason = iree_reason(e)
            built_for = re.search(r'hal\.device\.target<"([\w-]+)"', reason)  # a module of another target
            if built_for:
                raise ModelError(f"{vmfb}: compiled for IREE's {built_for[1]} devices, which the {self.device.name} is "
                                 f"not; recompile the folder") from None
            raise ModelError(f"{vmfb.name} could not be loaded with {self.manifest.parameters.file} on "
                             f"{self.device.name} ({reason:.300}); recompile the folder") from None
        return [self._bind(vmfb, rt.FunctionInvoker(context, self.config.device, module.lookup_function(a.name)), a)
                for a in abis]

    @staticmethod
    def _bind(vmfb: Path, invoker, abi: Function) -> Callable:
        """`invoker` called with its inputs by name, passed in the order `abi` lists them. The module checks
        their shapes and dtypes; a module built for others (another build, its hash edited in) fails there,
        and one that returns other shapes fails here, either as one line."""
        def call(**inputs: np.ndarray):
            try:
                results = invoker(*(inputs[a.name] for a in abi.args))
            except ValueError as e:  # IREE's INVALID_ARGUMENT: inputs of other shapes than the module's
                raise ModelError(f"{vmfb}: its {abi.name} does not take the inputs {MANIFEST} describes "
                                 f"({iree_reason(e)}); the module is of another build: recompile the folder") from None
            got = [tuple(r.shape) for r in (results if isinstance(results, tuple) else (results,))]
            want = [t.shape for t in abi.results]
            if got != want:
                raise ModelError(f"{vmfb}: its {abi.name} returns shapes {got}, not the {want} {MANIFEST} describes; "
                                 f"the module is of another build: recompile the folder")
            return results
        return call

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
                others = [t for t, m in self.manifest.targets.items() if kind in m.encoders]
                where = f" (it has one for {', '.join(others)}: --device {others[0]})" if others else ""
                raise ModelError(f"{self.folder} has no {kind} encoder for {self.target} (compiled with --skip-encoder "
                                 f"{kind}); run prompts with {medium} on another target of the folder{where}")
            self._encoders[kind] = abi, self._functions(self._module_file(entry), abi.signature)[0]
        return self._encoders[kind]

    def encode(self, kind: str, *inputs: np.ndarray) -> np.ndarray:
        """Run the `kind` encoder on `inputs` (in its arguments' order): its soft tokens [soft_tokens, hidden]
        as float32."""
        abi, function = self.encoder(kind)
        return self._read(function(**{a.name: x for a, x in zip(abi.args, inputs)}))[0]

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
            logits = self._prefill(input_ids=padded, per_layer_rows=self.per_layer_rows(padded),
                                   start=np.array([start + offset], np.int64), length=np.array([len(part)], np.int64),
                                   embeds=chunk_embeds, embeds_mask=chunk_mask)
        return self._read(logits).reshape(-1)

    def decode(self, token: int, position: int) -> np.ndarray:
        ids = np.array([[token]], dtype=np.int64)
        logits = self._decode(input_ids=ids, per_layer_rows=self.per_layer_rows(ids),
                              start=np.array([position], np.int64))
        return self._read(logits).reshape(-1)


def _check_module(path: Path) -> None:
    """ModelError if module file `path` is damaged. IREE verifies a module's FlatBuffer and bytecode when it
    loads it, but runs the device code inside (for the CPU, an ELF library) as it is: a flipped byte there
    crashes the process, or worse, computes something else. A .vmfb is a ZIP archive (the FlatBuffer, the
    constants, each executable) whose entries carry CRC-32s, which catch such damage even when g3n.json's
    sha256 was edited to match."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise ModelError(f"{path}: not a complete IREE module ({e}); recompile the folder") from None
    if damaged is not None:
        raise ModelError(f"{path}: damaged (its part {damaged} fails its checksum); recompile the folder")
