"""The compile driver: checkpoint -> model -> export -> passes -> IREE -> output folder.

The folder holds `model.irpa` (every weight), `<target>.vmfb` per target (code only), `<target>-audio.vmfb` /
`<target>-vision.vmfb` when the checkpoint has those towers (g3n's passes rewrite the text module only), the
tokenizer files and `g3n.json` (runtime/abi.py's `Manifest`).

One export serves every target asked for; the passes run for each target. Compiling more targets into a
folder that already holds this checkpoint at the same settings keeps its `model.irpa` (and its archive
id) and its other targets' modules, as long as the archive holds every parameter the new modules load.
Every option is checked before the export, and the folder changes only when the whole compile has
succeeded (`output.StagedFolder`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import iree.compiler as ic
import torch
from iree.compiler import ir

from passes import PASSES, PassContext, PassError, check_pass_names, run_passes
from passes.int4_pack import LAYOUT as INT4_LAYOUT
from passes.ir import parameters
from runtime.abi import (CacheLayer, EncoderModule, KvCache, Manifest, ManifestError, Parameters,
                         PerLayerRows, TargetModule, TokenizerInfo, TokenTable, sha256_file)
from runtime.archive import ARCHIVE_ID, ArchiveReader
from runtime.errors import UserError
from targets import TARGETS

from . import __version__
from .archive import write_archive
from .checkpoint import Checkpoint, CheckpointError, resolve_checkpoint
from .checkpoint.load import text_model_for_export
from .checkpoint.preflight import check_checkpoint
from .checkpoint.towers import PREPROCESSOR_CONFIG, Tower, find_towers, token_ids, token_table, tower_configs
from .export.encoders import ExportedEncoder, export_encoder
from .export.program import PARAM_SCOPE
from .export.text import ExportedText, export_text_model
from .model.config import ConfigError, TextConfig
from .model.multimodal_config import prompt_tokens
from .model.vision import sum_channels_by_matmul
from .output import StagedFolder, check_output_folder

PLE_TABLE = "embed_tokens_per_layer.weight"
TOKEN_TABLE = "multimodal_token_embeddings"
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("none", "int4")
ENCODER_MEDIA = {"audio": "audio", "vision": "images"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json", PREPROCESSOR_CONFIG)


class CompileError(UserError, RuntimeError):
    """A compile request g3n cannot carry out; the message says why."""


def resolve_targets(targets: str | list[str], archs: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """[(target name, architecture)] from names (or one comma-separated string) and per-target archs."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    archs = archs or {}
    for name in [*names, *archs]:
        if name not in TARGETS:
            raise CompileError(f"unknown target {name!r} (available: {', '.join(TARGETS)})")
    unused = [TARGETS[name].ARCH_OPTION for name in archs if name not in names]
    if unused:
        raise CompileError(f"{', '.join(unused)} given, but the target is not among {', '.join(names)}")
    if not names:
        raise CompileError("no target given")
    plan = {}
    for name in names:
        module = TARGETS[name]
        plan[name] = archs.get(name, module.DEFAULT_ARCH)
        if not module.accepts(plan[name]):
            close = difflib.get_close_matches(plan[name], module.known_archs(), n=4, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise CompileError(f"{module.ARCH_OPTION} {plan[name]!r} is not a known {name} architecture "
                               f"({hint}examples: {', '.join(module.ARCHS)})")
    return list(plan.items())


def compile_model(model: str, targets: str | list[str], out: Path, max_context: int = 2048, chunk: int = 128,
                  archs: dict[str, str] | None = None, dtype: str = "auto", quant: str = "none", group_size: int = 32,
                  disabled_passes=(), dump_ir_after=(), dump_dir: Path | None = None, skip_encoders=(),
                  log=print) -> Manifest:
    """Compile checkpoint `model` (folder or preset name) for `targets` ("cpu", "cpu,vulkan", ["cuda"]) into
    folder `out`; `archs` maps a target to its architecture (default: each target's DEFAULT_ARCH). Weights
    are stored in `dtype` ("auto": as in the checkpoint), linear weights in int4 if `quant` says so;
    `disabled_passes`/`dump_ir_after`/`dump_dir` steer the pass pipeline (see passes/). An encoder that does
    not compile for a target is an error unless its kind is in `skip_encoders` (the modules of this compile
    then take no such media). Returns the manifest."""
    plan = resolve_targets(targets, archs)
    if quant not in QUANTIZATIONS:
        raise CompileError(f"unknown quantization {quant!r} (available: {', '.join(QUANTIZATIONS)})")
    if group_size < 2 or group_size % 2:
        raise CompileError(f"--group-size {group_size} must be an even number >= 2")
    if dtype != "auto" and dtype not in WEIGHT_DTYPES:
        raise CompileError(f"unknown weight dtype {dtype!r} (available: auto, {', '.join(WEIGHT_DTYPES)})")
    unknown = sorted(set(skip_encoders) - set(ENCODER_MEDIA))
    if unknown:
        raise CompileError(f"--skip-encoder {unknown[0]!r}: the encoders are {', '.join(ENCODER_MEDIA)}")
    try:
        check_pass_names(PASSES, disabled_passes, dump_ir_after)
    except PassError as e:
        raise CompileError(str(e)) from None
    out = Path(out)
    check_output_folder(out)
    folder = resolve_checkpoint(model)
    t_start = time.perf_counter()
    log(f"g3n-compile: reading {folder}")
    ckpt = Checkpoint(folder)
    check_checkpoint(ckpt)  # every fault that shows without tensor data, before the long export
    weight_dtype = ckpt.text_dtype() if dtype == "auto" else WEIGHT_DTYPES[dtype]
    if weight_dtype not in WEIGHT_DTYPES.values():
        raise CompileError(f"{folder}: weights stored as {weight_dtype}; choose --dtype float32 or bfloat16")
    text, stored_names = text_model_for_export(ckpt, weight_dtype)
    _check_encoders(ckpt, plan, skip_encoders)
    cfg = text.config
    if not 1 <= chunk <= max_context:
        raise CompileError(f"--chunk {chunk} must be between 1 and --max-context ({max_context})")
    if max_context > cfg.max_position_embeddings:
        raise CompileError(f"--max-context {max_context} exceeds the model's max_position_embeddings "
                           f"({cfg.max_position_embeddings})")
    with StagedFolder(out) as stage:  # `out` changes only once everything below has succeeded
        manifest, stale = _build(ckpt, text, stored_names, weight_dtype, plan, stage.path, out, max_context, chunk,
                                 quant, group_size, disabled_passes, dump_ir_after, dump_dir, skip_encoders, t_start,
                                 log)
        stage.commit(stale)
    log(f"g3n-compile: done in {manifest.timings_s['total']:.1f}s -> {out} "
        f"({', '.join(manifest.targets)}; {(out / 'model.irpa').stat().st_size / 1e6:.1f} MB parameters)")
    return manifest


def _build(ckpt: Checkpoint, text, stored_names: dict[str, str], weight_dtype: torch.dtype,
           plan: list[tuple[str, str]], stage: Path, out: Path, max_context: int, chunk: int, quant: str,
           group_size: int, disabled_passes, dump_ir_after, dump_dir: Path | None, skip_encoders, t_start: float,
           log) -> tuple[Manifest, list[str]]:
    """Export, run the passes and compile every target, writing the new files into `stage`; returns the
    manifest and the files of `out`'s previous build that the new one no longer uses."""
    cfg = text.config
    log(f"g3n-compile: exporting (prefill chunk {chunk}, max context {max_context})")
    t0 = time.perf_counter()
    exported = export_text_model(text, chunk, max_context, log=log)
    towers = find_towers(ckpt, weight_dtype)
    forms = _encoder_forms(towers, plan, skip_encoders)
    for (kind, _), form in forms.items():
        log(f"  exported {kind} encoder ({_encoder_shape(form)})")
    encoders = list({kind: form for (kind, _), form in forms.items()}.values())  # one per tower: the same ABI
    t_export = time.perf_counter() - t0

    t0 = time.perf_counter()
    modules = {}  # target name -> (MLIR after its passes, their report, their context)
    for name, arch in plan:
        log(f"g3n-compile: running passes for {name}")
        ctx = PassContext(cfg, TARGETS[name], exported.functions, max_context, quant=quant, group_size=group_size,
                          arch=arch, weight_dtype=_dtype_name(weight_dtype))
        try:
            own_dump_dir = dump_dir / name if dump_dir is not None and len(plan) > 1 else dump_dir
            modules[name] = (*run_passes(exported.mlir, ctx, PASSES, disabled=disabled_passes,
                                         dump_after=dump_ir_after, dump_dir=own_dump_dir, log=log), ctx)
        except PassError as e:
            raise CompileError(str(e)) from None
    with ir.Context():
        archived = sorted({name for mlir, _, _ in modules.values()
                           for name, _ in parameters(ir.Module.parse(mlir)).values()} | {PLE_TABLE}
                          | {name for e in encoders for name in e.parameters}
                          | ({TOKEN_TABLE} if encoders else set()))
    t_passes = time.perf_counter() - t0

    manifest = _manifest(ckpt, text, exported, towers, encoders, max_context, quant, group_size)
    previous, previous_entries = _previous_build(out)
    t0 = time.perf_counter()
    if previous is not None and previous.same_build(manifest) and set(archived) <= previous_entries:
        log(f"g3n-compile: {out} already holds this build: keeping its model.irpa and its "
            f"{', '.join(previous.targets) or 'no'} modules")
        manifest.parameters, manifest.targets = previous.parameters, dict(previous.targets)
        t_archive = None
    else:
        if previous is not None:
            log(f"g3n-compile: {out} holds a different build; it is replaced once this compile has succeeded")
        log(f"g3n-compile: writing model.irpa ({_dtype_name(weight_dtype)} weights"
            f"{', int4 linears' if quant == 'int4' else ''})")
        source = lambda n: ckpt.tensor(stored_names[n]).to(weight_dtype)
        for _, _, ctx in modules.values():  # each target's passes may derive tensors (int4 codes, fused weights)
            source = ctx.derived.getter(source)
        source = _archive_source(ckpt, towers, weight_dtype, source)
        archive_id = write_archive(stage / "model.irpa", archived, source, log=log)
        manifest.parameters = Parameters("model.irpa", PARAM_SCOPE, archive_id, ARCHIVE_ID, len(archived))
        t_archive = round(time.perf_counter() - t0, 2)
    for name in TOKENIZER_FILES:
        if (ckpt.folder / name).is_file():
            shutil.copyfile(ckpt.folder / name, stage / name)

    for name, arch in plan:
        target = TARGETS[name]
        mlir, pass_report, _ = modules[name]
        vmfb = stage / f"{name}.vmfb"
        flags = target.compile_flags(arch, quant=quant)
        log(f"g3n-compile: compiling for {name} ({target.ARCH_OPTION} {arch})")
        t0 = time.perf_counter()
        _iree_compile(mlir, vmfb, flags)
        compile_s = round(time.perf_counter() - t0, 2)
        log(f"g3n-compile: {name}: {vmfb.stat().st_size / 1e6:.2f} MB module in {compile_s:.1f}s")
        compiled = {}
        for kind in (e.kind for e in encoders):
            if kind in skip_encoders:
                log(f"g3n-compile: {name}: no {kind} encoder (--skip-encoder {kind})")
                continue
            encoder = forms[kind, _form(target, kind)]
            module = stage / f"{name}-{encoder.kind}.vmfb"
            # The towers are not quantized; some targets need flags of their own for one encoder.
            encoder_flags = target.compile_flags(arch) + list((target.SUPPORTS.encoder_flags or {}).get(kind, ()))
            log(f"g3n-compile: compiling the {encoder.kind} encoder for {name}")
            t1 = time.perf_counter()
            try:
                _iree_compile(encoder.mlir, module, encoder_flags)
            except CompileError as e:
                raise CompileError(f"the {encoder.kind} encoder does not compile for {name} ({target.ARCH_OPTION} "
                                   f"{arch}): {e}. To build the {name} module without "
                                   f"{ENCODER_MEDIA[encoder.kind]}, pass --skip-encoder {encoder.kind}") from None
            compiled[encoder.kind] = EncoderModule(module.name, tuple(encoder_flags), sha256_file(module),
                                                   module.stat().st_size, round(time.perf_counter() - t1, 2))
            log(f"g3n-compile: {name}: {module.stat().st_size / 1e6:.2f} MB {encoder.kind} module in "
                f"{compiled[encoder.kind].compile_s:.1f}s")
        manifest.targets[name] = TargetModule(vmfb.name, target.DRIVER, arch, tuple(flags), sha256_file(vmfb),
                                              vmfb.stat().st_size, compile_s, tuple(pass_report), compiled)
    manifest.timings_s = {"export": round(t_export, 2), "passes": round(t_passes, 2), "archive": t_archive,
                          "total": round(time.perf_counter() - t_start, 2)}
    manifest.write(stage)
    return manifest, sorted(_module_files(previous) - _module_files(manifest)) if previous else []


def _form(target, kind: str) -> bool:
    """Which export form of encoder `kind` `target` compiles: whether its channel norms sum by matmul."""
    return kind == "vision" and target.SUPPORTS.channel_sums_by_matmul


def _encoder_forms(towers: list[Tower], plan: list[tuple[str, str]], skip_encoders
                   ) -> dict[tuple[str, bool], ExportedEncoder]:
    """Each tower exported in every form the targets of `plan` compile ((kind, form) -> export)."""
    forms = {}
    for tower in towers:
        wanted = {_form(TARGETS[name], tower.kind) for name, _ in plan} if tower.kind not in skip_encoders else {False}
        for form in sorted(wanted):
            sum_channels_by_matmul(tower.model, form)
            forms[tower.kind, form] = export_encoder(tower.kind, tower.model, tower.preprocessing)
    return forms


def _check_encoders(ckpt: Checkpoint, plan: list[tuple[str, str]], skip_encoders) -> None:
    """Before the export: every tower the checkpoint has compiles for every target asked for, or is skipped."""
    for kind, _, _ in tower_configs(ckpt):
        for name, _ in plan:
            supports = TARGETS[name].SUPPORTS
            if kind not in supports.encoders and kind not in skip_encoders:
                raise CompileError(f"the {name} target cannot take the checkpoint's {kind} encoder; pass "
                                   f"--skip-encoder {kind} to build the {name} module without {ENCODER_MEDIA[kind]} "
                                   f"(prompts with {ENCODER_MEDIA[kind]} then need another target of the folder)")


def _module_files(manifest: Manifest) -> set[str]:
    return {f for t in manifest.targets.values() for f in (t.file, *(e.file for e in t.encoders.values()))}


def _archive_source(ckpt: Checkpoint, towers: list[Tower], dtype: torch.dtype,
                    text_source: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """The archive's tensor getter: the towers' weights from the checkpoint in `dtype`, the token table
    computed, everything else from `text_source`."""
    stored = {name: s for t in towers for name, s in t.stored_names.items()}

    def get(name: str) -> torch.Tensor:
        if name == TOKEN_TABLE:
            return token_table(ckpt, towers, dtype)
        if name in stored:
            return ckpt.tensor(stored[name]).to(dtype)
        return text_source(name)

    return get


def _previous_build(out: Path) -> tuple[Manifest | None, set[str]]:
    """The manifest already in `out` and its archive's entry names, if that archive is there and is the
    one the manifest names."""
    try:
        previous = Manifest.read(out)
        archive = ArchiveReader(out / previous.parameters.file)
        stored = archive.bytes(previous.parameters.archive_id_entry).decode()
    except (OSError, ManifestError, AttributeError, KeyError, RuntimeError, UnicodeDecodeError):
        return None, set()
    return (previous, set(archive.entries)) if stored == previous.parameters.archive_id else (None, set())


def _source_fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of the checkpoint's config and weight files."""
    files = sorted({folder / "config.json", *folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")})
    listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _iree_compile(mlir: str, vmfb: Path, flags: list[str]) -> None:
    """Compile `mlir` into `vmfb`. On failure the MLIR and iree-compile's whole output are kept in the
    temporary folder for a bug report, and the error carries IREE's first error line."""
    src = vmfb.with_suffix(".mlir")
    src.write_text(mlir)
    try:
        ic.compile_file(str(src), output_file=str(vmfb), input_type="torch", extra_args=flags)
    except ic.CompilerToolError as e:
        kept = Path(tempfile.mkdtemp(prefix=f"g3n-failed-{vmfb.stem}-"))
        shutil.move(src, kept / src.name)
        (kept / "iree-compile.log").write_text(str(e))
        first = next((line.strip() for line in str(e).splitlines() if "error:" in line.lower()),
                     str(e).strip().splitlines()[-1] if str(e).strip() else "no output")
        raise CompileError(f"iree-compile failed for {vmfb.name}: {first[:400]} (MLIR and full log kept in "
                           f"{kept})") from None
    src.unlink()


def _encoder_shape(encoder: ExportedEncoder) -> str:
    abi = encoder.abi
    size = f"{abi.frames} frames" if encoder.kind == "audio" else f"{abi.image_size}x{abi.image_size} pixels"
    return f"{size} -> {abi.soft_tokens} soft tokens"


def _tokenizer(folder: Path, cfg: TextConfig) -> TokenizerInfo:
    tok_cfg = {}
    if (folder / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return TokenizerInfo(cfg.bos_token_id, cfg.pad_token_id, tok_cfg.get("add_bos_token", True), template)


def _manifest(ckpt: Checkpoint, text, exported: ExportedText, towers: list[Tower], encoders: list[ExportedEncoder],
              max_context: int, quant: str, group_size: int) -> Manifest:
    """Everything but `parameters` and `targets`, which depend on what the folder already holds."""
    cfg = text.config
    rows = cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
    layers = tuple(CacheLayer(layer, cfg.layer_types[layer], exported.cache_shapes[2 * i][2], cfg.is_sliding(layer),
                              exported.cache_shapes[2 * i]) for i, layer in enumerate(cfg.kv_layers))
    shared = {str(i): cfg.kv_source(i) for i in range(cfg.num_hidden_layers) if cfg.kv_source(i) != i}
    manifest = Manifest(
        g3n_version=__version__, source=str(ckpt.folder), source_fingerprint=_source_fingerprint(ckpt.folder),
        config=cfg.to_hf_dict(), max_context=max_context,
        prefill_chunk=exported.functions["prefill"].arg("input_ids").shape[1],
        weight_dtype=_dtype_name(text.embed_tokens.weight.dtype),
        quantization=({"weights": "int4", "group_size": group_size, "scheme": "symmetric, f16 scales",
                       "layout": INT4_LAYOUT}
                      if quant == "int4" else "none"),
        activation_dtype="float32", functions=exported.functions,
        per_layer_rows=PerLayerRows(PLE_TABLE, _dtype_name(text.embed_tokens_per_layer.weight.dtype),
                                    (cfg.vocab_size_per_layer_input, rows)),
        kv_cache=KvCache(KvCache.STORAGE, layers, shared), tokenizer=_tokenizer(ckpt.folder, cfg),
        stop_token_ids=tuple(cfg.eos_token_id))
    if encoders:
        try:
            manifest.prompt_tokens = prompt_tokens(ckpt.raw_config, cfg.vocab_size)
        except ConfigError as e:
            raise CheckpointError(f"{ckpt.folder}: {e}") from None
        first, count = token_ids(towers)
        manifest.encoders = {e.kind: e.abi for e in encoders}
        manifest.multimodal_tokens = TokenTable(TOKEN_TABLE, first, "float32", (count, cfg.hidden_size))
    return manifest


__all__ = ["compile_model", "CompileError", "CheckpointError"]
