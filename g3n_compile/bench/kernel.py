"""The int4 x int8 CPU kernel alone (targets/int4_kernel) at a model's shapes: the ceilings it sets on g3n's decode
and prefill speed, with IREE, the rest of the module and the Python runtime taken away.

A small C driver linked with the very object IREE links calls the kernel the way IREE's workgroups do (rows in
`rows_per_workgroup` ranges, taken by one thread per core from a shared counter), best of several passes:
- decode: one activation row against a weight matrix far larger than the caches (the vocabulary head's rows at
  the model's width), as GB/s of weights read; compare with bandwidth.py's streaming read;
- prefill: `chunk` activation rows against each of the model's dominant linears (MLP gate/up/down, the fused
  q/k/v/LAuReL-left, the attention output), as GOP/s (2 per multiply-add). The prefill ceiling is the tokens/s
  those linears alone would allow at those rates (the rest of the model's int4 linears are ~1 % of the ops);
- peak: the dot-product instruction alone (8 independent `vpdpbusd` chains per core, AVX-512 VNNI only).
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

from targets.int4_kernel.build import ISA_FLAGS, KernelBuildError, build_object, compiler, isa_for, symbol
from targets.int4_kernel.layout import rows_per_workgroup, takes

from .c_program import build_c_program

_SOURCE = Path(__file__).with_name("kernel_driver.c")
PEAK_STEPS = 50_000_000  # per thread, 8 vpdpbusd each


class KernelBenchError(RuntimeError):
    """The kernel or its driver could not be built or run."""


def prefill_shapes(cfg) -> list[tuple[str, int, int, int]]:
    """(name, N, K, calls per token) of the int4 linears that carry nearly all of a prefill's multiply-adds."""
    d, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    owners = cfg.num_hidden_layers - cfg.num_kv_shared_layers
    calls = Counter()
    for layer, inter in enumerate(cfg.intermediate_size):
        calls["mlp.gate/up", inter, d] += 2
        calls["mlp.down", d, inter] += 1
        calls["o", d, q] += 1
        if layer < owners:
            calls["q/k/v/laurel-left", q + 2 * kv + cfg.laurel_rank, d] += 1
        else:
            calls["q/laurel-left (KV-shared layers)", q + cfg.laurel_rank, d] += 1
    return [(*shape, count) for shape, count in calls.items()]


def measure_kernel(cfg, chunk: int, threads: int | None = None, log=print) -> dict:
    """The kernel's decode GB/s, prefill GOP/s per shape and ceiling, and the instruction peak, on this machine."""
    try:
        isa = isa_for("host")
        if isa is None:
            raise KernelBenchError("g3n's int4 CPU kernel is x86-64 only")
        exe = _driver(isa)
    except KernelBuildError as e:
        raise KernelBenchError(str(e)) from e
    threads = threads or os.cpu_count() or 1
    d, vocab = cfg.hidden_size, cfg.vocab_size
    log(f"  int4 kernel ({symbol(isa)}), {threads} threads: decode [1 x {d}] x [{vocab} x {d}]")
    seconds = _run(exe, "matmul", threads, 1, vocab, d, rows_per_workgroup(vocab), 5)
    result = {"isa": isa, "threads": threads, "chunk": chunk,
              "decode": {"n": vocab, "k": d, "gb_per_s": vocab * d * (0.5 + 2 / 32) / seconds / 1e9}}
    prefill, ops, time = [], 0.0, 0.0
    for name, n, k, calls in prefill_shapes(cfg):
        if not takes(k):  # the pass leaves these to IREE's generic int4 code
            log(f"  prefill {name}: K = {k} is not a kernel shape, skipped")
            continue
        log(f"  prefill [{chunk} x {k}] x [{n} x {k}] ({name})")
        seconds = _run(exe, "matmul", threads, chunk, n, k, rows_per_workgroup(n), 5)
        prefill.append({"name": name, "n": n, "k": k, "calls_per_token": calls, "gop_per_s": 2 * chunk * n * k / seconds / 1e9})
        ops, time = ops + 2 * n * k * calls, time + seconds / chunk * calls
    result["prefill"] = prefill
    result["prefill_gop_per_token"] = ops / 1e9
    result["prefill_ceiling_tokens_per_s"] = 1 / time
    if isa == "avx512vnni":
        result["peak_gop_per_s"] = threads * PEAK_STEPS * 8 * 128 / _run(exe, "peak", threads, PEAK_STEPS) / 1e9
    return result


def _run(exe: Path, *args) -> float:
    done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise KernelBenchError(f"the kernel driver failed ({' '.join(map(str, args))}): exit code {done.returncode}")
    return float(done.stdout)


def _driver(isa: str) -> Path:
    """The driver linked with the kernel object IREE links."""
    try:
        return build_c_program("g3n-kernel-bench", _SOURCE, compiler(),
                               ["-O2", "-pthread", *ISA_FLAGS[isa], f"-DKERNEL={symbol(isa)}"], (build_object(isa),))
    except subprocess.CalledProcessError as e:
        raise KernelBenchError(f"building the kernel driver failed:\n{e.stderr.strip()}") from e
