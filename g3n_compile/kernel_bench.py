"""The int4 x int8 CPU kernel alone (targets/cpu_kernels) at a model's shapes: the ceilings it sets on g3n's decode
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

from .c_program import build_c_program

_SOURCE = r"""
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#ifdef __AVX512VNNI__
#include <immintrin.h>
#endif

void KERNEL(const int8_t *, size_t, const float *, size_t, const uint8_t *, size_t, const uint16_t *, size_t, float *,
            size_t, size_t, size_t, size_t, size_t, size_t);
static size_t M, N, K, rows, threads;
static long peak_steps;
static int8_t *xq; static float *xd, *y; static uint8_t *w; static uint16_t *ws;
static atomic_size_t next_row;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static void *matmul_worker(void *unused) {
  for (size_t b; (b = atomic_fetch_add(&next_row, rows)) < N;) KERNEL(xq, 0, xd, 0, w, 0, ws, 0, y, 0, M, N, K, b, b + rows);
  return unused;
}

#define DPBUSD(a) a = _mm512_dpbusd_epi32(a, u, s);
static void *peak_worker(void *out) {  /* 8 independent chains, spelled out: an array would live in memory */
#ifdef __AVX512VNNI__
  __m512i u = _mm512_set1_epi8(3), s = _mm512_set1_epi8(-2), a0 = _mm512_set1_epi32(0), a1 = _mm512_set1_epi32(1),
          a2 = _mm512_set1_epi32(2), a3 = _mm512_set1_epi32(3), a4 = _mm512_set1_epi32(4), a5 = _mm512_set1_epi32(5),
          a6 = _mm512_set1_epi32(6), a7 = _mm512_set1_epi32(7);
  for (long n = 0; n < peak_steps; ++n) { DPBUSD(a0) DPBUSD(a1) DPBUSD(a2) DPBUSD(a3) DPBUSD(a4) DPBUSD(a5) DPBUSD(a6) DPBUSD(a7) }
  a0 = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                        _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
  *(int *)out = _mm512_reduce_add_epi32(a0);
#endif
  return out;
}

static double timed(void *(*fn)(void *)) {  /* one pass on all threads */
  pthread_t th[256]; int out[256];
  double t0 = now();
  next_row = 0;
  for (size_t i = 1; i < threads; ++i) pthread_create(&th[i], 0, fn, &out[i]);
  fn(&out[0]);
  for (size_t i = 1; i < threads; ++i) pthread_join(th[i], 0);
  return now() - t0;
}

int main(int argc, char **argv) {  /* peak THREADS STEPS | matmul THREADS M N K ROWS PASSES: prints seconds (best) */
  threads = atol(argv[2]);
  if (threads < 1 || threads > 256) return 1;
  if (argv[1][0] == 'p') { peak_steps = atol(argv[3]); printf("%.6f\n", timed(peak_worker)); return 0; }
  M = atol(argv[3]); N = atol(argv[4]); K = atol(argv[5]); rows = atol(argv[6]);
  int passes = atoi(argv[7]);
  xq = malloc(M * K); xd = malloc(M * K / 8); y = malloc(M * N * 4); w = malloc(N * K / 2); ws = malloc(N * K / 16);
  if (!xq || !xd || !y || !w || !ws) return 1;
  srand(1);
  for (size_t i = 0; i < M * K; ++i) xq[i] = (int8_t)rand();
  for (size_t i = 0; i < N * K / 2; ++i) w[i] = (uint8_t)rand();
  for (size_t i = 0; i < M * K / 32; ++i) xd[i] = 1e-3f * (rand() % 100);
  for (size_t i = 0; i < N * K / 32; ++i) ws[i] = 0x2000 + rand() % 512;  /* f16 around 0.008 */
  double best = timed(matmul_worker);
  for (int p = 1; p < passes; ++p) { double t = timed(matmul_worker); if (t < best) best = t; }
  printf("%.6f\n", best);
  return 0;
}
"""
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
    from passes.int4_cpu_kernel import rows_per_workgroup, supported
    from targets.cpu_kernels import KernelBuildError, isa_for, symbol

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
        if not supported(k):  # the pass leaves these to IREE's generic int4 code
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
    from targets.cpu_kernels import ISA_FLAGS, build_object, compiler, symbol

    try:
        return build_c_program("g3n-kernel-bench", _SOURCE, compiler(),
                               ["-O2", "-pthread", *ISA_FLAGS[isa], f"-DKERNEL={symbol(isa)}"], (build_object(isa),))
    except subprocess.CalledProcessError as e:
        raise KernelBenchError(f"building the kernel driver failed:\n{e.stderr.strip()}") from e
