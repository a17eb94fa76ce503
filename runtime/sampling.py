"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling, with an
optional repetition penalty (as in transformers: positive logits divided, negative multiplied)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .errors import UserError


class SamplingError(UserError, ValueError):
    """A sampling parameter out of its range; the message names it."""


@dataclass(frozen=True)  # checked once, when made
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None

    def __post_init__(self):
        _check("temperature", self.temperature, _is_real(self.temperature) and self.temperature >= 0,
               "a finite number >= 0 (0: greedy)")
        _check("top_k", self.top_k, _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0: off)")
        _check("top_p", self.top_p, _is_real(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1] (1: off)")
        _check("repetition_penalty", self.repetition_penalty,
               _is_real(self.repetition_penalty) and self.repetition_penalty > 0, "a finite number > 0 (1: off)")
        _check("seed", self.seed, self.seed is None or _is_int(self.seed) and self.seed >= 0,
               "None or an integer >= 0 (numpy's random generators take no negative seeds)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise SamplingError(f"{name} must be {expected}, got {value!r}")


GREEDY = SamplingParams(temperature=0.0)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        p = self.params
        logits = logits.astype(np.float64)
        if p.repetition_penalty != 1.0 and history:
            seen = np.unique(np.asarray(history))
            seen = seen[(seen >= 0) & (seen < logits.size)]
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        logits = (logits - logits.max()) / p.temperature  # <= 0: a tiny temperature cannot overflow to inf - inf
        if p.top_k and p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits)
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, p.top_p)) + 1]  # smallest set reaching top_p
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))
