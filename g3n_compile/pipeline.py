"""checkpoint -> model -> export -> passes -> IREE -> output folder (`model.irpa`, `<target>.vmfb` per target,
tokenizer, `g3n.json`), plus `<target>-audio.vmfb` / `<target>-vision.vmfb` when the checkpoint has those
towers (see multimodal.py; g3n's passes rewrite the text module only).

One export serves every target asked for; the passes run for each target. Compiling more targets into a
folder that already holds this checkpoint at the same settings keeps its `model.irpa` (and its archive
id) and its other targets' modules, as long as the archive holds every parameter the new modules load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from . import __version__
from .archive import ARCHIVE_ID, write_archive
from .checkpoint import Checkpoint, CheckpointError, text_model_for_export
from .export import PARAM_SCOPE, export_text_model
from .multimodal import (PREPROCESSOR_CONFIG, TOKEN_TABLE, archive_source, export_encoder, find_encoders,
                         token_table_entry)
from .presets import resolve_checkpoint
from passes import PASSES, PassContext, PassError, run_passes
from passes.ir import parameters
# The output folder's format is defined once, by the runtime that reads it.
from runtime.archive import ArchiveReader
from runtime.module import MANIFEST, sha256_file

PLE_TABLE = "embed_tokens_per_layer.weight"
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json", PREPROCESSOR_CONFIG)
# What every module in one folder shares with its model.irpa: a folder whose manifest matches on all of
# these (and whose archive is intact and complete) gets new targets without rewriting the archive.
SHARED_BUILD = ("format", "g3n_version", "source", "source_fingerprint", "config", "max_context", "prefill_chunk",
                "weight_dtype", "quantization", "activation_dtype", "functions", "per_layer_rows", "kv_cache",
                "encoders", "multimodal_tokens", "prompt_tokens")


class CompileError(RuntimeError):
    """A compile request g3n cannot carry out; the message says why."""


QUANTIZATIONS = ("none", "int4")


def resolve_targets(targets: str | list[str], archs: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """[(target name, architecture)] from names (or one comma-separated string) and per-target archs."""
    from targets import TARGETS

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
            raise CompileError(f"{module.ARCH_OPTION} {plan[name]!r} is not a known {name} architecture "
                               f"(known: {', '.join(module.ARCHS)})")
    return list(plan.items())


def compile_model(model: str, targets: str | list[str], out: Path, max_context: int = 2048, chunk: int = 128,
                  archs: dict[str, str] | None = None, dtype: str = "auto", quant: str = "none", group_size: int = 32,
                  disabled_passes=(), dump_ir_after=(), dump_dir: Path | None = None, log=print) -> dict:
    """Compile checkpoint `model` (folder or preset name) for `targets` ("cpu", "cpu,vulkan", ["cuda"]) into
    folder `out`; `archs` maps a target to its architecture (default: each target's DEFAULT_ARCH). Weights
    are stored in `dtype` ("auto": as in the checkpoint), linear weights in int4 if `quant` says so;
    `disabled_passes`/`dump_ir_after`/`dump_dir` steer the pass pipeline (see passes/). Returns the manifest."""
    from targets import TARGETS

    plan = resolve_targets(targets, archs)
    if quant not in QUANTIZATIONS:
        raise CompileError(f"unknown quantization {quant!r} (available: {', '.join(QUANTIZATIONS)})")
    if group_size < 2 or group_size % 2:
        raise CompileError(f"--group-size {group_size} must be an even number >= 2")
    folder = resolve_checkpoint(model)
    t_start = time.perf_counter()
    log(f"g3n-compile: reading {folder}")
    ckpt = Checkpoint(folder)
    if dtype != "auto" and dtype not in WEIGHT_DTYPES:
        raise CompileError(f"unknown weight dtype {dtype!r} (available: auto, {', '.join(WEIGHT_DTYPES)})")
    weight_dtype = ckpt.text_dtype() if dtype == "auto" else WEIGHT_DTYPES[dtype]
    if weight_dtype not in WEIGHT_DTYPES.values():
        raise CompileError(f"{folder}: weights stored as {weight_dtype}; choose --dtype float32 or bfloat16")
    text, stored_names = text_model_for_export(ckpt, weight_dtype)
    cfg = text.config
    if not 1 <= chunk <= max_context:
        raise CompileError(f"--chunk {chunk} must be between 1 and --max-context ({max_context})")
    if max_context > cfg.max_position_embeddings:
        raise CompileError(f"--max-context {max_context} exceeds the model's max_position_embeddings "
                           f"({cfg.max_position_embeddings})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    log(f"g3n-compile: exporting (prefill chunk {chunk}, max context {max_context})")
    t0 = time.perf_counter()
    exported = export_text_model(text, chunk, max_context, log=log)
    encoders = find_encoders(ckpt, weight_dtype)
    for encoder in encoders:
        t1 = time.perf_counter()
        export_encoder(encoder)
        log(f"  exported {encoder.kind} encoder ({_encoder_shape(encoder)}) in {time.perf_counter() - t1:.1f}s")
    t_export = time.perf_counter() - t0

    t0 = time.perf_counter()
    modules = {}  # target name -> (MLIR after its passes, their report, their context)
    for name, arch in plan:
        log(f"g3n-compile: running passes for {name}")
        ctx = PassContext(cfg, TARGETS[name], quant=quant, group_size=group_size, arch=arch)
        try:
            own_dump_dir = dump_dir / name if dump_dir is not None and len(plan) > 1 else dump_dir
            modules[name] = (*run_passes(exported.mlir, ctx, PASSES, disabled=disabled_passes,
                                         dump_after=dump_ir_after, dump_dir=own_dump_dir, log=log), ctx)
        except PassError as e:
            raise CompileError(str(e)) from None
    from iree.compiler import ir
    with ir.Context():
        archived = sorted({name for mlir, _, _ in modules.values()
                           for name, _ in parameters(ir.Module.parse(mlir)).values()} | {PLE_TABLE}
                          | {name for e in encoders for name in e.parameters}
                          | ({TOKEN_TABLE} if encoders else set()))
    t_passes = time.perf_counter() - t0

    # Compared with the g3n.json already in `out`, so in the form it reads back in (tuples as lists).
    manifest = json.loads(json.dumps(_manifest(text, exported, folder, max_context, quant, group_size)
                                     | _multimodal_manifest(ckpt, encoders, cfg)))
    previous, previous_entries = _previous_build(out)
    t0 = time.perf_counter()
    if previous is not None and all(previous.get(k) == manifest[k] for k in SHARED_BUILD) \
            and set(archived) <= previous_entries:
        log(f"g3n-compile: {out} already holds this build: keeping its model.irpa and its "
            f"{', '.join(previous['targets']) or 'no'} modules")
        manifest["parameters"], manifest["targets"] = previous["parameters"], previous["targets"]
        t_archive = None
    else:
        if previous is not None:
            _remove_modules(out, previous, log)
        log(f"g3n-compile: writing {out / 'model.irpa'} ({_dtype_name(weight_dtype)} weights"
            f"{', int4 linears' if quant == 'int4' else ''})")
        source = lambda n: ckpt.tensor(stored_names[n]).to(weight_dtype)
        for _, _, ctx in modules.values():  # each target's passes may derive tensors (int4 codes, fused weights)
            source = ctx.derived.getter(source)
        source = archive_source(ckpt, encoders, weight_dtype, source)
        archive_id = write_archive(out / "model.irpa", archived, source, log=log)
        manifest["parameters"] = {"file": "model.irpa", "scope": PARAM_SCOPE, "archive_id": archive_id,
                                  "archive_id_entry": ARCHIVE_ID, "count": len(archived)}
        t_archive = round(time.perf_counter() - t0, 2)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)

    for name, arch in plan:
        target = TARGETS[name]
        mlir, pass_report, _ = modules[name]
        vmfb = out / f"{name}.vmfb"
        flags = target.compile_flags(arch, quant=quant)
        log(f"g3n-compile: compiling for {name} ({target.ARCH_OPTION} {arch})")
        t0 = time.perf_counter()
        _iree_compile(mlir, vmfb, flags)
        entry = {"file": vmfb.name, "driver": target.DRIVER, "arch": arch, "flags": flags,
                 "sha256": sha256_file(vmfb), "bytes": vmfb.stat().st_size,
                 "compile_s": round(time.perf_counter() - t0, 2), "passes": pass_report, "encoders": {}}
        log(f"g3n-compile: {name}: {vmfb.stat().st_size / 1e6:.2f} MB module in {entry['compile_s']:.1f}s")
        for encoder in encoders:
            module = out / f"{name}-{encoder.kind}.vmfb"
            encoder_flags = target.compile_flags(arch)  # the towers are not quantized
            log(f"g3n-compile: compiling the {encoder.kind} encoder for {name}")
            t1 = time.perf_counter()
            try:
                _iree_compile(encoder.mlir, module, encoder_flags)
            except CompileError as e:
                # Known for vision on Vulkan (IREE 3.13's SPIR-V codegen of the conv + norm dispatches): the
                # text module still serves; prompts with that medium need another target's module.
                module.with_suffix(".mlir").unlink(missing_ok=True)
                reason = next((line for line in str(e).splitlines() if "error:" in line), "").strip()
                log(f"g3n-compile: warning: the {encoder.kind} encoder does not compile for {name}; the {name} "
                    f"module takes no {'images' if encoder.kind == 'vision' else 'audio'} ({reason[:200]})")
                continue
            entry["encoders"][encoder.kind] = {"file": module.name, "flags": encoder_flags,
                                               "sha256": sha256_file(module), "bytes": module.stat().st_size,
                                               "compile_s": round(time.perf_counter() - t1, 2)}
            log(f"g3n-compile: {name}: {module.stat().st_size / 1e6:.2f} MB {encoder.kind} module in "
                f"{entry['encoders'][encoder.kind]['compile_s']:.1f}s")
        manifest["targets"][name] = entry
        manifest["timings_s"] = {"export": round(t_export, 2), "passes": round(t_passes, 2), "archive": t_archive,
                                 "total": round(time.perf_counter() - t_start, 2)}
        _write_json(out / MANIFEST, manifest)  # after each module: the folder is usable at every step
    log(f"g3n-compile: done in {manifest['timings_s']['total']:.1f}s -> {out} "
        f"({', '.join(manifest['targets'])}; {(out / 'model.irpa').stat().st_size / 1e6:.1f} MB parameters)")
    return manifest


def _previous_build(out: Path) -> tuple[dict | None, set[str]]:
    """The manifest already in `out` and its archive's entry names, if that archive is there and is the
    one the manifest names."""
    try:
        previous = json.loads((out / MANIFEST).read_text())
        params = previous["parameters"]
        archive = ArchiveReader(out / params["file"])
        stored = archive.bytes(params["archive_id_entry"]).decode()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None, set()
    return (previous, set(archive.entries)) if stored == params["archive_id"] else (None, set())


def _remove_modules(out: Path, previous: dict, log) -> None:
    """Another build is being written over this folder: its modules would not match the new archive."""
    files = [t["file"] for t in previous["targets"].values()]
    files += [e["file"] for t in previous["targets"].values() for e in t.get("encoders", {}).values()]
    stale = [out / f for f in files if (out / f).is_file()]
    if stale:
        log(f"g3n-compile: {out} held a different build; removing its modules ({', '.join(p.name for p in stale)})")
    for path in stale:
        path.unlink()


def _source_fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of the checkpoint's config and weight files."""
    files = sorted({folder / "config.json", *folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")})
    listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _iree_compile(mlir: str, vmfb: Path, flags: list[str]) -> None:
    import iree.compiler as ic

    src = vmfb.with_suffix(".mlir")
    src.write_text(mlir)
    partial = vmfb.with_name(vmfb.name + ".partial")  # a failed compile leaves the previous module intact
    try:
        ic.compile_file(str(src), output_file=str(partial), input_type="torch", extra_args=flags)
    except ic.CompilerToolError as e:
        raise CompileError(f"iree-compile failed for {vmfb.name} (MLIR kept at {src}):\n{str(e)[-3000:]}") from None
    os.replace(partial, vmfb)
    src.unlink()


def _encoder_shape(encoder) -> str:
    abi = encoder.abi
    size = f"{abi['frames']} frames" if encoder.kind == "audio" else f"{abi['image_size']}x{abi['image_size']} pixels"
    return f"{size} -> {abi['soft_tokens']} soft tokens"


def _multimodal_manifest(ckpt: Checkpoint, encoders: list, cfg) -> dict:
    """The encoders' ABIs (by kind), the multimodal token table and the processor's token ids: empty for a
    text-only checkpoint."""
    if not encoders:
        return {"encoders": {}, "multimodal_tokens": None, "prompt_tokens": None}
    from .config import ConfigError
    from .multimodal import PromptTokens

    try:
        tokens = PromptTokens.from_hf_dict(ckpt.raw_config, cfg.vocab_size)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.folder}: {e}") from None
    return {"encoders": {e.kind: e.abi for e in encoders},
            "multimodal_tokens": token_table_entry(encoders, cfg.hidden_size),
            "prompt_tokens": tokens.to_hf_dict()}


def _manifest(text, exported, folder: Path, max_context: int, quant: str, group_size: int) -> dict:
    """Everything but `parameters` and `targets`, which depend on what the folder already holds."""
    cfg = text.config
    rows = cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
    c, v = exported.chunk, cfg.vocab_size
    tok_cfg = {}
    if (folder / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()

    def arg(name, dtype, shape):
        return {"name": name, "dtype": dtype, "shape": list(shape)}

    return {
        "format": "g3n-module", "g3n_version": __version__,
        "source": str(folder),
        "source_fingerprint": _source_fingerprint(folder),
        "config": cfg.to_hf_dict(),
        "max_context": max_context,
        "prefill_chunk": c,
        "weight_dtype": _dtype_name(text.embed_tokens.weight.dtype),
        "quantization": ({"weights": "int4", "group_size": group_size, "scheme": "symmetric, f16 scales",
                          "layout": "W.int4 i8 [N, K/2] (low nibble = even k), W.int4_scale f16 [N, K/G]"}
                         if quant == "int4" else "none"),
        "activation_dtype": "float32",
        "functions": {
            "prefill": {"args": [arg("input_ids", "int64", (1, c)), arg("per_layer_rows", "float32", (1, c, rows)),
                                 arg("start", "int64", (1,)), arg("length", "int64", (1,)),
                                 arg("embeds", "float32", (1, c, cfg.hidden_size)), arg("embeds_mask", "bool", (1, c))],
                        "results": [arg("logits", "float32", (1, 1, v))],
                        "doc": "tokens start..start+length-1 (the rest of the chunk is padding); logits of the last real "
                               "one. Where embeds_mask is True, embeds replaces the token's embedding (soft tokens, "
                               "multimodal token ids)"},
            "decode": {"args": [arg("input_ids", "int64", (1, 1)), arg("per_layer_rows", "float32", (1, 1, rows)),
                                arg("start", "int64", (1,))],
                       "results": [arg("logits", "float32", (1, 1, v))],
                       "doc": "one token at position start"},
        },
        "per_layer_rows": {"parameter": PLE_TABLE, "dtype": _dtype_name(text.embed_tokens_per_layer.weight.dtype),
                           "shape": [cfg.vocab_size_per_layer_input, rows],
                           "rule": "row = id if 0 <= id < shape[0] else 0; gathered on the host, passed as float32"},
        "kv_cache": {
            "storage": "module globals kv_cache_0.. (k, v per KV-owning layer), updated in place",
            "layers": [{"layer": layer, "kind": cfg.layer_types[layer],
                        "slots": exported.cache_shapes[2 * i][2],
                        "ring": cfg.is_sliding(layer), "shape": list(exported.cache_shapes[2 * i])}
                       for i, layer in enumerate(cfg.kv_layers)],
            "shared": {str(i): cfg.kv_source(i) for i in range(cfg.num_hidden_layers) if cfg.kv_source(i) != i},
        },
        "tokenizer": {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
                      "add_bos_token": tok_cfg.get("add_bos_token", True), "chat_template": template},
        "stop_token_ids": list(cfg.eos_token_id),
        "parameters": None,
        "targets": {},
    }


__all__ = ["compile_model", "CompileError", "CheckpointError", "MANIFEST"]
