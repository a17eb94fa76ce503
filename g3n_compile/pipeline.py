"""checkpoint -> model -> export -> IREE -> output folder (`model.irpa`, `<target>.vmfb`, tokenizer, `g3n.json`)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from . import __version__
from .archive import ARCHIVE_ID, write_archive
from .checkpoint import Checkpoint, CheckpointError, text_model_for_export
from .export import PARAM_SCOPE, export_text_model
from .presets import resolve_checkpoint
from passes import PASSES, PassContext, PassError, run_passes
from passes.ir import parameters
# The output folder's format is defined once, by the runtime that reads it.
from runtime.module import MANIFEST, sha256_file

PLE_TABLE = "embed_tokens_per_layer.weight"
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


class CompileError(RuntimeError):
    """A compile request g3n cannot carry out; the message says why."""


QUANTIZATIONS = ("none", "int4")


def compile_model(model: str, target: str, out: Path, max_context: int = 2048, chunk: int = 128,
                  dtype: str = "auto", quant: str = "none", group_size: int = 32, disabled_passes=(),
                  dump_ir_after=(), dump_dir: Path | None = None, log=print) -> dict:
    """Compile checkpoint `model` (folder or preset name) for `target` into folder `out`. Weights are
    stored in `dtype` ("auto": as in the checkpoint), linear weights in int4 if `quant` says so;
    `disabled_passes`/`dump_ir_after`/`dump_dir` steer the pass pipeline (see passes/)."""
    from targets import TARGETS

    if target not in TARGETS:
        raise CompileError(f"unknown target {target!r} (available: {', '.join(TARGETS)})")
    target_mod = TARGETS[target]
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
    t_export = time.perf_counter() - t0

    log("g3n-compile: running passes")
    t0 = time.perf_counter()
    ctx = PassContext(cfg, target_mod, quant=quant, group_size=group_size)
    try:
        mlir, pass_report = run_passes(exported.mlir, ctx, PASSES, disabled=disabled_passes,
                                       dump_after=dump_ir_after, dump_dir=dump_dir, log=log)
    except PassError as e:
        raise CompileError(str(e)) from None
    from iree.compiler import ir
    with ir.Context():
        archived = sorted(name for name, _ in parameters(ir.Module.parse(mlir)).values())
    t_passes = time.perf_counter() - t0

    log(f"g3n-compile: writing {out / 'model.irpa'} ({_dtype_name(weight_dtype)} weights"
        f"{', int4 linears' if quant == 'int4' else ''})")
    t0 = time.perf_counter()
    source = ctx.derived.getter(lambda n: ckpt.tensor(stored_names[n]).to(weight_dtype))
    archive_id = write_archive(out / "model.irpa", archived + [PLE_TABLE], source, log=log)
    t_archive = time.perf_counter() - t0

    vmfb = out / f"{target}.vmfb"
    flags = target_mod.compile_flags(quant=quant)
    log(f"g3n-compile: compiling for {target} ({' '.join(flags)})")
    t0 = time.perf_counter()
    _iree_compile(mlir, vmfb, flags)
    t_compile = time.perf_counter() - t0

    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    manifest = _manifest(text, exported, target, target_mod, flags, out, vmfb, archive_id, folder, max_context,
                         len(archived) + 1)
    manifest["quantization"] = ({"weights": "int4", "group_size": group_size, "scheme": "symmetric, f16 scales",
                                 "layout": "W.int4 i8 [N, K/2] (low nibble = even k), W.int4_scale f16 [N, K/G]"}
                                if quant == "int4" else "none")
    manifest["passes"] = pass_report
    manifest["timings_s"] = {"export": round(t_export, 2), "passes": round(t_passes, 2), "archive": round(t_archive, 2),
                             "iree_compile": round(t_compile, 2), "total": round(time.perf_counter() - t_start, 2)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log(f"g3n-compile: done in {manifest['timings_s']['total']:.1f}s -> {out} "
        f"({vmfb.stat().st_size / 1e6:.2f} MB module, {(out / 'model.irpa').stat().st_size / 1e6:.1f} MB parameters)")
    return manifest


def _iree_compile(mlir: str, vmfb: Path, flags: list[str]) -> None:
    import iree.compiler as ic

    src = vmfb.with_suffix(".mlir")
    src.write_text(mlir)
    try:
        ic.compile_file(str(src), output_file=str(vmfb), input_type="torch", extra_args=flags)
    except ic.CompilerToolError as e:
        raise CompileError(f"iree-compile failed for {vmfb.name} (MLIR kept at {src}):\n{str(e)[-3000:]}") from None
    src.unlink()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _manifest(text, exported, target, target_mod, flags, out, vmfb, archive_id, folder, max_context,
              parameter_count) -> dict:
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
        "config": cfg.to_hf_dict(),
        "max_context": max_context,
        "prefill_chunk": c,
        "weight_dtype": _dtype_name(text.embed_tokens.weight.dtype),
        "activation_dtype": "float32",
        "functions": {
            "prefill": {"args": [arg("input_ids", "int64", (1, c)), arg("per_layer_rows", "float32", (1, c, rows)),
                                 arg("start", "int64", (1,)), arg("length", "int64", (1,))],
                        "results": [arg("logits", "float32", (1, 1, v))],
                        "doc": "tokens start..start+length-1 (the rest of the chunk is padding); logits of the last real one"},
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
        "parameters": {"file": "model.irpa", "scope": PARAM_SCOPE, "archive_id": archive_id,
                       "archive_id_entry": ARCHIVE_ID, "count": parameter_count},
        "targets": {target: {"file": vmfb.name, "driver": target_mod.DRIVER, "flags": flags,
                             "sha256": sha256_file(vmfb), "bytes": vmfb.stat().st_size}},
    }


__all__ = ["compile_model", "CompileError", "CheckpointError", "MANIFEST"]
