"""g3n-bench: speed, memory and size of compiled g3n modules at the real E2B/E4B shapes, next to PyTorch eager
on the same weights and the decode speed this machine's memory bandwidth allows.

    g3n-bench --markdown docs/benchmarks.md --plot docs/benchmarks.png     # E2B: int4 and bf16 CPU modules
    g3n-bench --model e4b --variants int4
    g3n-bench --model tiny-random --variants f32 --prompts 8 --contexts 0,16 --decode-tokens 4 --json -

Weights are random (checkpoint/random_weights.py: speed does not depend on the values), written once into the
cache. Each measurement runs in a subprocess of its own (processes.py), so that its peak RSS is its own and
its memory is given back before the next starts; the parent samples the RSS of the whole subprocess tree
(iree-compile included) for the host RAM a compile needs. Compiled folders are kept under --work with the
compile time and memory measured when they were built (--rebuild builds them again).

Engines: `g3n` (the compiled module through the runtime), `pytorch-eager` (g3n's own PyTorch model,
g3n_compile/model/text.py, weights memory-mapped in the checkpoint's dtype) and `transformers` (its
Gemma3nForCausalLM, same weights, when installed and when it fits in memory). For each:
- prefill: time to first token and prompt tokens/s, for random prompts of each length, after a warm-up;
- decode: tokens/s at context S = 1 / median time of one step at positions S, S+1, ... (greedy, each token
  fed back). g3n's module and eager model attend over fixed-size caches with a mask, so a step costs the
  same whatever the cache below S holds; transformers' cache grows, so it is prefilled to S (untimed) first;
- peak RSS and load time; for g3n also module and archive sizes, compile time, compile RAM and a
  per-dispatch profile of one decode step (decode_profile.py).
With the `int4` variant on the CPU, the int4 kernel is also measured alone (kernel.py): the decode GB/s and
prefill GOP/s it reaches outside IREE, and the prefill tokens/s those rates allow.
Roofline (roofline.py): measured bandwidth (bandwidth.py) / bytes one decode token must read = every weight the engine
holds except the gathered PLE table (the tied embedding counted once, as the LM head) + the K/V entries of
the S cached positions each layer attends to, in the engine's cache dtype.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from runtime.errors import run_cli

from .. import __version__
from ..checkpoint import Checkpoint, cache_root, resolve_checkpoint
from ..checkpoint.random_weights import ensure_random_checkpoint
from ..model.config import PRESETS
from ..model.text import Gemma3nTextModel
from . import BenchError, log
from .bandwidth import measure_bandwidth
from .decode_profile import profile_decode
from .engines import ENGINES, worker
from .kernel import KernelBenchError, measure_kernel
from .processes import mem_available, run_worker
from .report import markdown, update_document, write_plot
from .roofline import add_roofline, archive_weight_bytes

VARIANTS = {  # name -> (quantization, weight dtype, passes disabled)
    "int4": ("int4", "auto", []),  # on x86-64 CPUs: g3n's int4 x int8 C kernel
    "int4-generic": ("int4", "auto", ["int4-cpu-kernel"]),  # IREE's own code for the int4 matmuls
    "bf16": ("none", "bfloat16", []),
    "f32": ("none", "float32", []),
}
PLE_TABLE = "embed_tokens_per_layer.weight"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {bad or text!r} (available: {', '.join(VARIANTS)})")
    return names


def main(argv: list[str] | None = None) -> int:
    return run_cli("g3n-bench", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog="g3n-bench",
        description="Benchmark g3n against PyTorch eager and the memory-bandwidth bound on random weights with real "
                    "Gemma 3n shapes: prefill/decode speed, memory, sizes, compile cost.")
    p.add_argument("--model", default="e2b", help="e2b or e4b (random weights, written once into the cache), "
                   "tiny-random, or a checkpoint folder (default: e2b)")
    p.add_argument("--target", default="cpu", help="IREE target (default: cpu)")
    p.add_argument("--variants", type=_names, default=["int4", "bf16"],
                   help=f"compiled weight formats, comma-separated, from {', '.join(VARIANTS)} (default: int4,bf16)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (default: 32)")
    p.add_argument("--chunk", type=int, default=128, help="prefill chunk of the compiled module (default: 128)")
    p.add_argument("--prompts", type=_ints, default=[128, 512, 2048], help="prompt lengths (default: 128,512,2048)")
    p.add_argument("--contexts", type=_ints, default=[0, 1024, 4096], help="decode contexts (default: 0,1024,4096)")
    p.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed per context (default: 16)")
    p.add_argument("--baselines", default="pytorch-eager,transformers",
                   help="comparison engines, comma-separated: pytorch-eager, transformers, or none "
                        "(default: both)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-dispatch profile of a decode step")
    p.add_argument("--no-kernel", action="store_true", help="skip measuring the int4 CPU kernel alone "
                   "(bench/kernel.py: its decode GB/s, prefill GOP/s and the prefill ceiling they set)")
    p.add_argument("--bandwidth-gib", type=float, default=2.0, help="buffer of the bandwidth test (default: 2 GiB)")
    p.add_argument("--work", type=Path, help="where compiled modules are kept (default: <g3n cache>/bench)")
    p.add_argument("--rebuild", action="store_true", help="compile again even if a compiled folder is kept")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-': standard output)")
    p.add_argument("--markdown", metavar="FILE", type=Path,
                   help="write the tables into FILE (between g3n-bench markers; text outside them is kept)")
    p.add_argument("--plot", metavar="FILE.png", type=Path, help="plot tokens/s vs context and the roofline "
                   "(needs matplotlib: pip install 'g3n[bench]')")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    baselines = [] if args.baselines == "none" else [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in ENGINES]
    if unknown:
        p.error(f"--baselines: unknown engine(s) {', '.join(unknown)} (available: {', '.join(ENGINES)}, none)")
    if args.decode_tokens < 1:
        p.error("--decode-tokens must be at least 1")
    results = run(args, baselines)
    table = markdown(results)
    if args.json:
        text = json.dumps(results, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    else:
        print(table)
    if args.markdown:
        update_document(args.markdown, results["model"]["name"], table)
        log(f"g3n-bench: tables written to {args.markdown}")
    if args.plot:
        log(f"g3n-bench: {write_plot(results, args.plot)}")
    return 0


# ---- the run ----------------------------------------------------------------------------------------


def run(args, baselines: list[str]) -> dict:
    folder = ensure_random_checkpoint(args.model, cache_root(), log=log) if args.model in PRESETS \
        else resolve_checkpoint(args.model)
    cfg = Checkpoint(folder).config
    max_context = max(max(args.prompts) + 1, max(args.contexts) + args.decode_tokens)
    if not 1 <= args.chunk <= max_context:
        raise BenchError(f"--chunk {args.chunk} must be between 1 and the module's context ({max_context} = the "
                         "longest prompt or context plus the decode steps)")
    if max_context > cfg.max_position_embeddings:
        raise BenchError(f"prompts/contexts need {max_context} positions, the model has {cfg.max_position_embeddings}")
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": _command(),
               "machine": _machine(), "versions": _versions(),
               "model": {"name": args.model, "checkpoint": str(folder), "config": cfg.to_hf_dict(),
                         "checkpoint_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))},
               "settings": {"target": args.target, "prompts": args.prompts, "contexts": args.contexts,
                            "decode_tokens": args.decode_tokens, "max_context": max_context, "chunk": args.chunk,
                            "group_size": args.group_size},
               "runs": []}
    log(f"g3n-bench: measuring memory bandwidth ({args.bandwidth_gib:g} GiB buffer)")
    results["bandwidth"] = measure_bandwidth(int(args.bandwidth_gib * 2**30))
    log(f"  {results['bandwidth']['gb_per_s']:.1f} GB/s")
    if "int4" in args.variants and args.target == "cpu" and not args.no_kernel:
        log("g3n-bench: measuring the int4 CPU kernel alone")
        try:
            results["kernel"] = measure_kernel(cfg, args.chunk, log=log)
        except KernelBenchError as e:
            results["kernel"] = {"error": str(e)}
            log(f"  skipped: {e}")
    measure = {"prompts": args.prompts, "contexts": args.contexts, "steps": args.decode_tokens,
               "max_context": max_context, "checkpoint": str(folder), "vocab": cfg.vocab_size_per_layer_input}
    work = args.work or cache_root() / "bench"
    for variant in args.variants:
        out = work / f"{folder.name}-{args.target}-{variant}-g{args.group_size}-c{args.chunk}-ctx{max_context}"
        build = _compiled(folder, out, args, variant, max_context)
        log(f"g3n-bench: measuring g3n {variant}")
        row = run_worker({"kind": "g3n", "folder": str(out), **measure})
        row.update(engine="g3n", variant=variant, target=args.target, compile=build,
                   sizes={"vmfb_bytes": (out / f"{args.target}.vmfb").stat().st_size,
                          "irpa_bytes": (out / "model.irpa").stat().st_size},
                   weight_bytes=archive_weight_bytes(out), kv_bytes_per_element=4)
        if not args.no_profile:
            position = args.contexts[len(args.contexts) // 2]
            log(f"g3n-bench: profiling one decode step of g3n {variant} at position {position}")
            row["profile"] = profile_decode(out, position)
        results["runs"].append(row)
    for engine in baselines:
        results["runs"].append(_baseline(engine, folder, cfg, measure))
    for row in results["runs"]:
        add_roofline(row, cfg, results["bandwidth"]["gb_per_s"])
    results["machine"]["load_average_end"] = list(os.getloadavg())
    return results


def _compiled(folder: Path, out: Path, args, variant: str, max_context: int) -> dict:
    """Compile (unless kept from an earlier run); the compile's own figures, measured when it was built."""
    record = out / "bench-compile.json"
    if record.is_file() and (out / "g3n.json").is_file() and not args.rebuild:
        log(f"g3n-bench: using the module compiled earlier in {out}")
        return {**json.loads(record.read_text()), "reused": True}
    quant, dtype, disabled = VARIANTS[variant]
    log(f"g3n-bench: compiling {folder.name} for {args.target} ({variant}) into {out}")
    built = run_worker({"kind": "compile", "checkpoint": str(folder), "out": str(out), "target": args.target,
                         "quant": quant, "dtype": dtype, "disabled": disabled, "group_size": args.group_size,
                         "chunk": args.chunk, "max_context": max_context})
    built.update(date=datetime.datetime.now().isoformat(timespec="seconds"), g3n_commit=_commit())
    record.write_text(json.dumps(built, indent=1))
    return {**built, "reused": False}


def _baseline(engine: str, folder: Path, cfg, measure: dict) -> dict:
    with torch.device("meta"):
        params = dict(Gemma3nTextModel(cfg).named_parameters())
    dtype = Checkpoint(folder).text_dtype()
    weight_bytes = sum(p.numel() for n, p in params.items() if n != PLE_TABLE) * dtype.itemsize
    variant = {torch.bfloat16: "bf16", torch.float32: "f32", torch.float16: "f16"}[dtype]
    row = {"engine": engine, "variant": variant, "target": "cpu", "weight_bytes": weight_bytes,
           "kv_bytes_per_element": 4 if engine == "pytorch-eager" else dtype.itemsize}
    missing = ENGINES[engine]()
    if missing:
        return {**row, "skipped": missing}
    # The weights stay memory-mapped: they must fit in the page cache (else every token reads the disk),
    # next to the engine's working memory (activations, caches; about 2 GB at E4B).
    need = weight_bytes + (2 << 30)
    available = mem_available()
    if available is not None and available < need:
        return {**row, "skipped": f"needs about {need / 1e9:.1f} GB of free memory, {available / 1e9:.1f} GB available"}
    log(f"g3n-bench: measuring {engine}")
    return {**row, **run_worker({"kind": engine, **measure})}


def _command() -> str:
    return "g3n-bench " + " ".join(sys.argv[1:])


def _machine() -> dict:
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "load_average_start": list(os.getloadavg())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["memory_bytes"] = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except OSError:
        pass
    return info


def _versions() -> dict:
    versions = {"g3n": __version__, "g3n_commit": _commit(), "python": platform.python_version()}
    for package in ("torch", "iree-base-compiler", "iree-base-runtime", "numpy", "transformers"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return versions


def _commit() -> str | None:
    """The g3n source's git commit (with '+dirty' for uncommitted changes), when run from a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


