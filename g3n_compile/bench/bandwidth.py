"""This machine's streaming memory-read bandwidth: what bounds decode speed (every weight is read once per token).

Method: sum the 64-bit words of a buffer much larger than the last-level cache, with one OpenMP thread per
core, best of a few passes (the buffer is written first, so its pages exist). A C program compiled at run
time with `gcc -O3 -march=native -fopenmp` (vectorised loads, all cores) measures what the hardware gives;
without a C compiler, numpy's single-threaded sum stands in and says so (it reaches only part of it).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from .c_program import build_c_program

_SOURCE = Path(__file__).with_name("bandwidth.c")


def measure_bandwidth(nbytes: int = 2 << 30, passes: int = 5) -> dict:
    """{"gb_per_s", "threads", "buffer_bytes", "method"}: the best streaming-read rate over `passes`."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    try:
        exe = gcc and build_c_program("g3n-bandwidth", _SOURCE, gcc, ["-O3", "-march=native", "-fopenmp"])
    except subprocess.CalledProcessError:
        exe = None  # no OpenMP, say: numpy below
    if exe:
        out = subprocess.run([str(exe), str(nbytes), str(passes)], capture_output=True, text=True, check=True)
        seconds, threads, _ = out.stdout.split()
        return {"gb_per_s": nbytes / float(seconds) / 1e9, "threads": int(threads), "buffer_bytes": nbytes,
                "method": f"C (gcc -O3 -march=native -fopenmp): sum of uint64 over a {nbytes / 2**30:g} GiB "
                          f"buffer, {threads} OpenMP threads, best of {passes}"}
    return _numpy_bandwidth(nbytes, passes)


def _numpy_bandwidth(nbytes: int, passes: int) -> dict:
    a = np.arange(nbytes // 8, dtype=np.uint64)
    best = min(_timed(a.sum) for _ in range(passes))
    return {"gb_per_s": a.nbytes / best / 1e9, "threads": 1, "buffer_bytes": a.nbytes,
            "method": f"numpy sum of uint64 over a {nbytes / 2**30:g} GiB buffer, 1 thread, best of {passes} "
                      "(no C compiler found: this underestimates the machine's bandwidth)"}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
