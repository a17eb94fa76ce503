"""Archive tensors that passes derive from checkpoint tensors (int4 codes and scales, fused weights).

A pass that replaces parameter `w` by new ones records how to compute each from the originals; the
pipeline computes them one at a time while it writes `model.irpa`, so derived weights never need the
whole model in memory either."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Get = Callable[[str], torch.Tensor]


@dataclass
class DerivedParameters:
    recipes: dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]] = field(default_factory=dict)

    def add(self, name: str, sources: tuple[str, ...], fn: Callable[..., torch.Tensor]) -> None:
        self.recipes[name] = (tuple(sources), fn)

    def getter(self, get: Get) -> Get:
        """`get` extended with the derived names (which may build on each other)."""
        def resolve(name: str) -> torch.Tensor:
            if name not in self.recipes:
                return get(name)
            sources, fn = self.recipes[name]
            return fn(*(resolve(s) for s in sources))
        return resolve
