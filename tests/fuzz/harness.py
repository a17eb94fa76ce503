"""The fuzz tier's harness: seeded mutations of a valid input, each fed to a reader that must either accept
it or raise one of its user-facing errors, within a time and memory bound, leaving the input file as it was.

    report = fuzz("wav", valid_bytes, read, errors=(AudioError,), cases=200, seed=0)
    report.check()   # fails the test on any other outcome, listing the first few

Memory is what Python and numpy allocate (tracemalloc sees numpy's buffers), measured per case.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# G3N_FUZZ_SCALE scales every fuzz test's case count (default 1: the counts the tests name).
SCALE = float(os.environ.get("G3N_FUZZ_SCALE", "1"))
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF)
INTERESTING_WORDS = (0, 1, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2_000_003, 1 << 20)
# What a structured JSON mutation puts in place of an entry: wrong types, zero, negative, huge, non-finite.
REPLACEMENTS = ("text", True, None, [], {}, [1, 2], 0, -1, -(2 ** 63), 2 ** 31, 2 ** 63, 10 ** 18, 1e308,
                float("nan"), float("inf"), 0.5, -0.5)


def mutate(data: bytes, rng: random.Random, hot: int | None = None) -> bytes:
    """One seeded mutation of `data`: bit flips, interesting bytes or 32-bit words, truncation, insertion,
    deletion or duplication; `hot` bytes at the start (a header) are hit more often."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        span = hot if hot and rng.random() < 0.7 else len(buf)
        if not buf:
            buf += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            continue
        at = rng.randrange(max(1, min(span, len(buf))))
        kind = rng.randrange(7)
        if kind == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[at] = rng.choice(INTERESTING)
        elif kind == 2 and at + 4 <= len(buf):
            buf[at:at + 4] = rng.choice(INTERESTING_WORDS).to_bytes(4, "little")
        elif kind == 3:
            del buf[rng.randrange(len(buf) + 1):]
        elif kind == 4:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32)))
        elif kind == 5:
            del buf[at:at + rng.randrange(1, 64)]
        else:
            buf[at:at] = buf[at:at + rng.randrange(1, 256)]
    return bytes(buf)


def json_paths(node, at=()):
    """Every key/index path into a JSON document."""
    yield at
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from json_paths(child, at + (key,))


def mutate_json(doc, rng: random.Random) -> bytes:
    """`doc` with one entry, at any depth, dropped, (a number) nudged by one, made a 5000-digit integer (over
    Python's int() limit: the reader must refuse it cleanly), or replaced by a REPLACEMENTS value."""
    doc = copy.deepcopy(doc)
    at = rng.choice([p for p in json_paths(doc) if p])
    parent = doc
    for key in at[:-1]:
        parent = parent[key]
    value, roll = parent[at[-1]], rng.random()
    if roll < 0.25:
        del parent[at[-1]]
    elif roll < 0.45 and type(value) in (int, float):
        parent[at[-1]] = value + rng.choice((-1, 1))
    elif roll < 0.55:
        parent[at[-1]] = "HUGE"
        return json.dumps(doc).replace('"HUGE"', "9" * 5000).encode()
    else:
        parent[at[-1]] = rng.choice(REPLACEMENTS)
    return json.dumps(doc).encode()


@dataclass
class FuzzReport:
    name: str
    cases: int = 0
    accepted: int = 0
    clean_errors: int = 0
    peak_mb: float = 0.0
    slowest_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"fuzz {self.name}: {self.cases} cases, {self.accepted} accepted, {self.clean_errors} clean errors, "
                f"{len(self.failures)} failures; peak {self.peak_mb:.1f} MB, slowest {self.slowest_s:.2f} s")

    def check(self) -> None:
        print(self.summary())
        assert not self.failures, f"{self.summary()}\n" + "\n".join(self.failures[:10])


def fuzz(name: str, cases: list[tuple[str, Callable[[], object]]], errors: tuple[type[BaseException], ...],
         max_mb: float = 256, max_s: float = 10, one_line: bool = True,
         unchanged: list[Path] = ()) -> FuzzReport:
    """Run each (label, call) case: it must return, or raise one of `errors` with a one-line message, within
    `max_s` seconds and `max_mb` MB of new allocations; the files `unchanged` must keep their bytes."""
    before = {p: Path(p).read_bytes() for p in unchanged}
    report = FuzzReport(name)
    for label, call in cases:
        report.cases += 1
        tracemalloc.start()
        t0 = time.perf_counter()
        outcome = None
        try:
            call()
            report.accepted += 1
        except errors as e:
            report.clean_errors += 1
            if one_line and ("\n" in str(e) or not str(e).strip()):
                outcome = f"{label}: {type(e).__name__} not one line: {str(e)[:300]!r}"
        except BaseException as e:  # noqa: BLE001 - every other outcome is the finding
            if isinstance(e, KeyboardInterrupt):
                raise
            outcome = f"{label}: {type(e).__name__}: {str(e)[:300]}"
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        report.peak_mb = max(report.peak_mb, peak)
        report.slowest_s = max(report.slowest_s, elapsed)
        if outcome is None and peak > max_mb:
            outcome = f"{label}: allocated {peak:.0f} MB (bound {max_mb:.0f})"
        if outcome is None and elapsed > max_s:
            outcome = f"{label}: took {elapsed:.1f} s (bound {max_s:.0f})"
        if outcome:
            report.failures.append(outcome)
    for p, data in before.items():
        if Path(p).read_bytes() != data:
            report.failures.append(f"{p}: changed by the fuzz cases")
    return report


def count(n: int) -> int:
    """A test's case count, scaled by G3N_FUZZ_SCALE."""
    return max(1, int(n * SCALE))
