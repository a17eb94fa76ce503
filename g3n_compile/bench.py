"""g3n-bench: speed, memory and size of compiled g3n modules at the real E2B/E4B shapes, next to PyTorch eager
on the same weights and the decode speed this machine's memory bandwidth allows.

    g3n-bench --markdown docs/benchmarks.md --plot docs/benchmarks.png     # E2B: int4 and bf16 CPU modules
    g3n-bench --model e4b --variants int4
    g3n-bench --model tiny-random --variants f32 --prompts 8 --contexts 0,16 --decode-tokens 4 --json -

Weights are random (random_checkpoint.py: speed does not depend on the values), written once into the
cache. Each measurement runs in a subprocess of its own (`--worker`), so that its peak RSS is its own and
its memory is given back before the next starts; the parent samples the RSS of the whole subprocess tree
(iree-compile included) for the host RAM a compile needs. Compiled folders are kept under --work with the
compile time and memory measured when they were built (--rebuild builds them again).

Engines: `g3n` (the compiled module through the runtime), `pytorch-eager` (g3n's own PyTorch model,
g3n_compile/model.py, weights memory-mapped in the checkpoint's dtype) and `transformers` (its
Gemma3nForCausalLM, same weights, when installed and when it fits in memory). For each:
- prefill: time to first token and prompt tokens/s, for random prompts of each length, after a warm-up;
- decode: tokens/s at context S = 1 / median time of one step at positions S, S+1, ... (greedy, each token
  fed back). g3n's module and eager model attend over fixed-size caches with a mask, so a step costs the
  same whatever the cache below S holds; transformers' cache grows, so it is prefilled to S (untimed) first;
- peak RSS and load time; for g3n also module and archive sizes, compile time, compile RAM and a
  per-dispatch profile of one decode step (decode_profile.py).
With the `int4` variant on the CPU, the int4 kernel is also measured alone (kernel_bench.py): the decode GB/s and
prefill GOP/s it reaches outside IREE, and the prefill tokens/s those rates allow.
Roofline: measured bandwidth (bandwidth.py) / bytes one decode token must read = every weight the engine
holds except the gathered PLE table (the tied embedding counted once, as the LM head) + the K/V entries of
the S cached positions each layer attends to, in the engine's cache dtype.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

VARIANTS = {  # name -> (quantization, weight dtype, passes disabled)
    "int4": ("int4", "auto", []),  # on x86-64 CPUs: g3n's int4 x int8 C kernel
    "int4-generic": ("int4", "auto", ["int4-cpu-kernel"]),  # IREE's own code for the int4 matmuls
    "bf16": ("none", "bfloat16", []),
    "f32": ("none", "float32", []),
}
PLE_TABLE = "embed_tokens_per_layer.weight"


class BenchError(RuntimeError):
    """A benchmark that cannot run; the message says why."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
                   "(kernel_bench.py: its decode GB/s, prefill GOP/s and the prefill ceiling they set)")
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
        return _worker(json.loads(args.worker))

    from .checkpoint import CheckpointError

    baselines = [] if args.baselines == "none" else [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in _ENGINES]
    if unknown:
        p.error(f"--baselines: unknown engine(s) {', '.join(unknown)} (available: {', '.join(_ENGINES)}, none)")
    if args.decode_tokens < 1:
        p.error("--decode-tokens must be at least 1")
    try:
        results = run(args, baselines)
    except (BenchError, CheckpointError) as e:
        print(f"g3n-bench: error: {e}", file=sys.stderr)
        return 1
    from .bench_report import markdown, update_document, write_plot

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
        _log(f"g3n-bench: tables written to {args.markdown}")
    if args.plot:
        _log(f"g3n-bench: {write_plot(results, args.plot)}")
    return 0


# ---- the run ----------------------------------------------------------------------------------------


def run(args, baselines: list[str]) -> dict:
    from .checkpoint import Checkpoint
    from .config import PRESETS
    from .presets import cache_root, resolve_checkpoint
    from .random_checkpoint import ensure_random_checkpoint

    folder = ensure_random_checkpoint(args.model, cache_root(), log=_log) if args.model in PRESETS \
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
    _log(f"g3n-bench: measuring memory bandwidth ({args.bandwidth_gib:g} GiB buffer)")
    from .bandwidth import measure_bandwidth

    results["bandwidth"] = measure_bandwidth(int(args.bandwidth_gib * 2**30))
    _log(f"  {results['bandwidth']['gb_per_s']:.1f} GB/s")
    if "int4" in args.variants and args.target == "cpu" and not args.no_kernel:
        from .kernel_bench import KernelBenchError, measure_kernel

        _log("g3n-bench: measuring the int4 CPU kernel alone")
        try:
            results["kernel"] = measure_kernel(cfg, args.chunk, log=_log)
        except KernelBenchError as e:
            results["kernel"] = {"error": str(e)}
            _log(f"  skipped: {e}")
    measure = {"prompts": args.prompts, "contexts": args.contexts, "steps": args.decode_tokens,
               "max_context": max_context, "checkpoint": str(folder), "vocab": cfg.vocab_size_per_layer_input}
    work = args.work or cache_root() / "bench"
    for variant in args.variants:
        out = work / f"{folder.name}-{args.target}-{variant}-g{args.group_size}-c{args.chunk}-ctx{max_context}"
        build = _compiled(folder, out, args, variant, max_context)
        _log(f"g3n-bench: measuring g3n {variant}")
        row = _subprocess({"kind": "g3n", "folder": str(out), **measure})
        row.update(engine="g3n", variant=variant, target=args.target, compile=build,
                   sizes={"vmfb_bytes": (out / f"{args.target}.vmfb").stat().st_size,
                          "irpa_bytes": (out / "model.irpa").stat().st_size},
                   weight_bytes=_archive_weight_bytes(out), kv_bytes_per_element=4)
        if not args.no_profile:
            from .decode_profile import profile_decode

            position = args.contexts[len(args.contexts) // 2]
            _log(f"g3n-bench: profiling one decode step of g3n {variant} at position {position}")
            row["profile"] = profile_decode(out, position)
        results["runs"].append(row)
    for engine in baselines:
        results["runs"].append(_baseline(engine, folder, cfg, measure))
    for row in results["runs"]:
        _add_roofline(row, cfg, results["bandwidth"]["gb_per_s"])
    results["machine"]["load_average_end"] = list(os.getloadavg())
    return results


def _compiled(folder: Path, out: Path, args, variant: str, max_context: int) -> dict:
    """Compile (unless kept from an earlier run); the compile's own figures, measured when it was built."""
    record = out / "bench-compile.json"
    if record.is_file() and (out / "g3n.json").is_file() and not args.rebuild:
        _log(f"g3n-bench: using the module compiled earlier in {out}")
        return {**json.loads(record.read_text()), "reused": True}
    quant, dtype, disabled = VARIANTS[variant]
    _log(f"g3n-bench: compiling {folder.name} for {args.target} ({variant}) into {out}")
    built = _subprocess({"kind": "compile", "checkpoint": str(folder), "out": str(out), "target": args.target,
                         "quant": quant, "dtype": dtype, "disabled": disabled, "group_size": args.group_size,
                         "chunk": args.chunk, "max_context": max_context})
    built.update(date=datetime.datetime.now().isoformat(timespec="seconds"), g3n_commit=_commit())
    record.write_text(json.dumps(built, indent=1))
    return {**built, "reused": False}


def _baseline(engine: str, folder: Path, cfg, measure: dict) -> dict:
    from .model import Gemma3nTextModel

    import torch

    with torch.device("meta"):
        params = dict(Gemma3nTextModel(cfg).named_parameters())
    dtype = _checkpoint_dtype(folder)
    weight_bytes = sum(p.numel() for n, p in params.items() if n != PLE_TABLE) * dtype.itemsize
    variant = {torch.bfloat16: "bf16", torch.float32: "f32", torch.float16: "f16"}[dtype]
    row = {"engine": engine, "variant": variant, "target": "cpu", "weight_bytes": weight_bytes,
           "kv_bytes_per_element": 4 if engine == "pytorch-eager" else dtype.itemsize}
    missing = _ENGINES[engine]()
    if missing:
        return {**row, "skipped": missing}
    # The weights stay memory-mapped: they must fit in the page cache (else every token reads the disk),
    # next to the engine's working memory (activations, caches; about 2 GB at E4B).
    need = weight_bytes + (2 << 30)
    available = _mem_available()
    if available is not None and available < need:
        return {**row, "skipped": f"needs about {need / 1e9:.1f} GB of free memory, {available / 1e9:.1f} GB available"}
    _log(f"g3n-bench: measuring {engine}")
    return {**row, **_subprocess({"kind": engine, **measure})}


def _checkpoint_dtype(folder: Path):
    from .checkpoint import Checkpoint

    return Checkpoint(folder).text_dtype()


def _archive_weight_bytes(out: Path) -> int:
    """Bytes of every parameter in the archive a decode step reads: all but the PLE table (gathered on the host)
    and the audio/vision encoders' weights and token table; with an int4 LM head, the embedding table it
    copies is only gathered from."""
    from runtime.archive import ArchiveReader
    from runtime.module import MANIFEST

    from .multimodal import ENCODER_PARAMETER_PREFIXES, TOKEN_TABLE

    manifest = json.loads((out / MANIFEST).read_text())
    entries = ArchiveReader(out / "model.irpa").entries
    skip = {manifest["per_layer_rows"]["parameter"], manifest["parameters"]["archive_id_entry"], TOKEN_TABLE}
    if {"embed_tokens.weight.int4", "embed_tokens.weight.q4_0"} & set(entries):  # generic / C-kernel layout
        skip.add("embed_tokens.weight")
    return sum(length for name, (_, length) in entries.items()
               if name not in skip and not name.startswith(ENCODER_PARAMETER_PREFIXES))


def kv_bytes_read(cfg, context: int, bytes_per_element: int) -> int:
    """K and V bytes one decode step at `context` must read: every layer attends to its KV source's
    cache, the last `sliding_window` positions for sliding layers, all of them for full ones."""
    per_position = 2 * cfg.num_key_value_heads * cfg.head_dim * bytes_per_element
    return sum(per_position * (min(context, cfg.sliding_window) if cfg.is_sliding(i) else context)
               for i in range(cfg.num_hidden_layers))


def _add_roofline(row: dict, cfg, gb_per_s: float) -> None:
    for d in row.get("decode", []):
        d["bytes_per_token"] = row["weight_bytes"] + kv_bytes_read(cfg, d["context"], row["kv_bytes_per_element"])
        d["roofline_tokens_per_s"] = gb_per_s * 1e9 / d["bytes_per_token"]
        d["roofline_fraction"] = d["tokens_per_s"] / d["roofline_tokens_per_s"]


# ---- subprocesses and their memory ------------------------------------------------------------------


def _subprocess(task: dict) -> dict:
    """Run a worker; its result, its peak RSS and the peak RSS of its whole process tree (sampled)."""
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen([sys.executable, "-m", "g3n_compile.bench", "--worker", json.dumps(task)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    sampler = _TreeMemory(proc.pid)
    sampler.start()
    out, _ = proc.communicate()
    sampler.stop()
    if proc.returncode:
        raise BenchError(f"the {task['kind']} step failed (exit code {proc.returncode}; its error is printed above)")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_bytes"] = max(result.pop("self_max_rss_bytes"), sampler.peak_rss)
    result["peak_anon_bytes"] = sampler.peak_anon
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


class _TreeMemory:
    """Samples the summed RSS (and its anonymous part) of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_anon = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._done.set()
        self._thread.join()

    def _sample(self):
        while not self._done.wait(self.interval):
            rss = anon = 0
            for pid in _descendants(self.pid):
                fields = _status(pid)
                rss += fields.get("VmRSS", 0)
                anon += fields.get("RssAnon", 0)
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)


def _descendants(root: int) -> list[int]:
    children = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _status(pid: int) -> dict[str, int]:
    """Memory fields (bytes) of /proc/<pid>/status."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in lines) if v.strip().endswith("kB")}


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---- workers (each in its own process) --------------------------------------------------------------


def _worker(task: dict) -> int:
    """Run one measurement; its result is the last line of standard output."""
    from runtime.module import ModelError

    from .checkpoint import CheckpointError
    from .pipeline import CompileError

    try:
        print(json.dumps(_WORKERS[task["kind"]](task)))
    except (BenchError, CheckpointError, CompileError, ModelError) as e:
        print(f"g3n-bench: error: {e}", file=sys.stderr)
        return 1
    return 0


def _work_compile(task: dict) -> dict:
    from .pipeline import compile_model

    manifest = compile_model(task["checkpoint"], task["target"], Path(task["out"]), max_context=task["max_context"],
                             chunk=task["chunk"], dtype=task["dtype"], quant=task["quant"],
                             disabled_passes=task["disabled"], group_size=task["group_size"], log=lambda msg: _log("  " + msg))
    timings = dict(manifest["timings_s"], iree_compile=manifest["targets"][task["target"]]["compile_s"])
    return {"timings_s": timings, "self_max_rss_bytes": _self_max_rss()}


class _Compiled:
    """The compiled module through g3n's runtime."""

    def __init__(self, task: dict):
        from runtime import load

        self.llm = load(task["folder"])

    def prefill(self, ids: list[int]) -> tuple[float, float]:
        timings = self.llm.generate(ids, max_new_tokens=1).timings
        return timings["prefill_s"], timings["ttft_s"]

    def decode(self, context: int, steps: int) -> list[float]:
        import numpy as np

        token, times = 2, []
        for position in range(context, context + steps):
            t0 = time.perf_counter()
            token = int(np.argmax(self.llm.model.decode(token, position)))
            times.append(time.perf_counter() - t0)
        return times


class _PyTorchEager:
    """g3n's PyTorch model (the export source), weights memory-mapped in the checkpoint's dtype, with the
    same fixed-size caches as the compiled module; a prompt is one `step` call."""

    def __init__(self, task: dict):
        import torch

        from .checkpoint import load_text_model

        torch.set_grad_enabled(False)
        self.torch = torch
        self.model = load_text_model(task["checkpoint"], _checkpoint_dtype(Path(task["checkpoint"])))
        self.caches = self.model.init_caches(1, task["max_context"])

    def _step(self, ids: list[int], start: int) -> int:
        torch = self.torch
        x = torch.tensor([ids], dtype=torch.int64)
        logits, self.caches = self.model.step(x, self.model.per_layer_rows(x), torch.tensor([start]),
                                              torch.tensor([len(ids)]), self.caches)
        return int(logits[0, -1].argmax())

    def prefill(self, ids: list[int]) -> tuple[float, float]:
        t0 = time.perf_counter()
        self._step(ids, 0)
        return time.perf_counter() - t0, time.perf_counter() - t0

    def decode(self, context: int, steps: int) -> list[float]:
        token, times = 2, []
        for position in range(context, context + steps):
            t0 = time.perf_counter()
            token = self._step([token], position)
            times.append(time.perf_counter() - t0)
        return times


class _Transformers:
    """transformers' Gemma3nForCausalLM on the same weights, memory-mapped (assigned, not copied), with its
    default attention and growing cache; prompts are prefilled in one call keeping only the last logits."""

    def __init__(self, task: dict):
        import torch
        from transformers import Gemma3nForCausalLM, Gemma3nTextConfig
        from transformers.initialization import no_init_weights

        from .checkpoint import Checkpoint

        torch.set_grad_enabled(False)
        self.torch = torch
        ckpt = Checkpoint(task["checkpoint"])
        dtype = ckpt.text_dtype()
        hf = {k: v for k, v in ckpt.config.to_hf_dict().items() if k not in ("architectures", "model_type")}
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # as from_pretrained builds a model of that dtype
        try:
            with no_init_weights():  # its storage is never written, so it costs no memory
                self.model = Gemma3nForCausalLM(Gemma3nTextConfig(**hf)).eval()
        finally:
            torch.set_default_dtype(default)
        prefix = ckpt.text_prefix()
        wanted = self.model.state_dict()
        weights = {"model." + n[len(prefix):]: ckpt.tensor(n) for n in ckpt.location
                   if n.startswith(prefix) and "model." + n[len(prefix):] in wanted}
        missing = set(wanted) - set(weights) - {"lm_head.weight"}
        if missing:
            raise BenchError(f"transformers' model has parameters the checkpoint lacks: {sorted(missing)[:5]}")
        self.model.load_state_dict(weights, strict=False, assign=True)
        self.model.lm_head.weight = self.model.model.embed_tokens.weight
        self.cache, self.vocab = None, task["vocab"]

    def _call(self, ids: list[int]) -> int:
        torch = self.torch
        out = self.model(torch.tensor([ids]), past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def prefill(self, ids: list[int]) -> tuple[float, float]:
        self.cache = None
        t0 = time.perf_counter()
        self._call(ids)
        return time.perf_counter() - t0, time.perf_counter() - t0

    def decode(self, context: int, steps: int) -> list[float]:
        self.cache = None
        if context:
            self._call(_prompt(context, self.vocab))
        token, times = 2, []
        for _ in range(steps):
            t0 = time.perf_counter()
            token = self._call([token])
            times.append(time.perf_counter() - t0)
        return times


def _prompt(length: int, vocab: int, seed: int = 0) -> list[int]:
    """Random token ids (none of the special ids 0-2), the same for every engine."""
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, size=length).tolist()


def _measure(engine_cls, task: dict) -> dict:
    vocab = task["vocab"]
    t0 = time.perf_counter()
    engine = engine_cls(task)
    load_s = time.perf_counter() - t0
    engine.prefill(_prompt(min(16, max(task["prompts"])), vocab, seed=1))  # warm-up: first-call costs
    engine.decode(0, 2)
    prefill = []
    for tokens in task["prompts"]:
        prefill_s, ttft_s = engine.prefill(_prompt(tokens, vocab))
        prefill.append({"tokens": tokens, "ttft_s": ttft_s, "tokens_per_s": tokens / prefill_s})
        _log(f"  prefill {tokens:5d} tokens: TTFT {ttft_s:.2f}s, {tokens / prefill_s:.1f} tok/s")
    decode = []
    for context in task["contexts"]:
        times = engine.decode(context, task["steps"])
        median = statistics.median(times)
        decode.append({"context": context, "tokens_per_s": 1 / median, "step_ms_median": 1e3 * median,
                       "step_ms_mean": 1e3 * statistics.fmean(times)})
        _log(f"  decode at context {context:5d}: {1 / median:.2f} tok/s (median step {1e3 * median:.1f} ms)")
    return {"load_s": load_s, "prefill": prefill, "decode": decode, "self_max_rss_bytes": _self_max_rss()}


def _self_max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_WORKERS = {
    "compile": _work_compile,
    "g3n": lambda task: _measure(_Compiled, task),
    "pytorch-eager": lambda task: _measure(_PyTorchEager, task),
    "transformers": lambda task: _measure(_Transformers, task),
}


def _transformers_missing() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("transformers") else "transformers is not installed (pip install 'g3n[bench]')"


# Baseline engine -> why it cannot run here (None: it can).
_ENGINES = {"pytorch-eager": lambda: None, "transformers": _transformers_missing}


# ---- where and with what ----------------------------------------------------------------------------


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
    import importlib.metadata as md

    from . import __version__

    versions = {"g3n": __version__, "g3n_commit": _commit(), "python": platform.python_version()}
    for package in ("torch", "iree-base-compiler", "iree-base-runtime", "numpy", "transformers"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return versions


def _commit() -> str | None:
    """The g3n source's git commit (with '+dirty' for uncommitted changes), when run from a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    sys.exit(main())
