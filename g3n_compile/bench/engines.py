"""The engines g3n-bench times, each in a worker process: `g3n` (the compiled module through the runtime),
`pytorch-eager` (g3n's own PyTorch model, weights memory-mapped in the checkpoint's dtype) and `transformers`
(its Gemma3nForCausalLM, same weights); and the compile step, measured the same way."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runtime import ModelError, load

from ..checkpoint import Checkpoint, CheckpointError, load_text_model
from ..compile import CompileError, compile_model
from . import BenchError, log
from .processes import self_max_rss


def worker(task: dict) -> int:
    """Run one measurement; its result is the last line of standard output."""
    try:
        print(json.dumps(WORKERS[task["kind"]](task)))
    except (BenchError, CheckpointError, CompileError, ModelError) as e:
        print(f"g3n-bench: error: {e}", file=sys.stderr)
        return 1
    return 0


def _work_compile(task: dict) -> dict:
    manifest = compile_model(task["checkpoint"], task["target"], Path(task["out"]), max_context=task["max_context"],
                             chunk=task["chunk"], dtype=task["dtype"], quant=task["quant"],
                             disabled_passes=task["disabled"], group_size=task["group_size"], log=lambda msg: log("  " + msg))
    timings = dict(manifest.timings_s, iree_compile=manifest.targets[task["target"]].compile_s)
    return {"timings_s": timings, "self_max_rss_bytes": self_max_rss()}


class _Compiled:
    """The compiled module through g3n's runtime."""

    def __init__(self, task: dict):
        self.llm = load(task["folder"])

    def prefill(self, ids: list[int]) -> tuple[float, float]:
        timings = self.llm.generate(ids, max_new_tokens=1).timings
        return timings["prefill_s"], timings["ttft_s"]

    def decode(self, context: int, steps: int) -> list[float]:
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
        torch.set_grad_enabled(False)
        self.model = load_text_model(task["checkpoint"], Checkpoint(task["checkpoint"]).text_dtype())
        self.caches = self.model.init_caches(1, task["max_context"])

    def _step(self, ids: list[int], start: int) -> int:
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
        # transformers is an optional extra ('g3n[bench]'), imported only when this engine runs.
        from transformers import Gemma3nForCausalLM, Gemma3nTextConfig
        from transformers.initialization import no_init_weights

        torch.set_grad_enabled(False)
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
            self._call(prompt(context, self.vocab))
        token, times = 2, []
        for _ in range(steps):
            t0 = time.perf_counter()
            token = self._call([token])
            times.append(time.perf_counter() - t0)
        return times


def prompt(length: int, vocab: int, seed: int = 0) -> list[int]:
    """Random token ids (none of the special ids 0-2), the same for every engine."""
    return np.random.default_rng(seed).integers(3, vocab, size=length).tolist()


def measure(engine_cls, task: dict) -> dict:
    vocab = task["vocab"]
    t0 = time.perf_counter()
    engine = engine_cls(task)
    load_s = time.perf_counter() - t0
    engine.prefill(prompt(min(16, max(task["prompts"])), vocab, seed=1))  # warm-up: first-call costs
    engine.decode(0, 2)
    prefill = []
    for tokens in task["prompts"]:
        prefill_s, ttft_s = engine.prefill(prompt(tokens, vocab))
        prefill.append({"tokens": tokens, "ttft_s": ttft_s, "tokens_per_s": tokens / prefill_s})
        log(f"  prefill {tokens:5d} tokens: TTFT {ttft_s:.2f}s, {tokens / prefill_s:.1f} tok/s")
    decode = []
    for context in task["contexts"]:
        times = engine.decode(context, task["steps"])
        median = statistics.median(times)
        decode.append({"context": context, "tokens_per_s": 1 / median, "step_ms_median": 1e3 * median,
                       "step_ms_mean": 1e3 * statistics.fmean(times)})
        log(f"  decode at context {context:5d}: {1 / median:.2f} tok/s (median step {1e3 * median:.1f} ms)")
    return {"load_s": load_s, "prefill": prefill, "decode": decode, "self_max_rss_bytes": self_max_rss()}


WORKERS = {
    "compile": _work_compile,
    "g3n": lambda task: measure(_Compiled, task),
    "pytorch-eager": lambda task: measure(_PyTorchEager, task),
    "transformers": lambda task: measure(_Transformers, task),
}


def _transformers_missing() -> str | None:
    return None if importlib.util.find_spec("transformers") else "transformers is not installed (pip install 'g3n[bench]')"


# Baseline engine -> why it cannot run here (None: it can).
ENGINES = {"pytorch-eager": lambda: None, "transformers": _transformers_missing}
