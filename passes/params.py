"""Archive tensors that passes derive from checkpoint tensors (int4 codes and scales, fused weights).

A pass that replaces parameter `w` by new ones records how to compute each from the originals; the
pipeline computes them one at a time while it writes `model.irpa`, so derived weights never need the
whole model in memory either. A recipe may make several tensors at once (int4 codes and their scales):
its last result is kept, so the archive (written in name order, where such siblings sit together)
computes it once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Get = Callable[[str], torch.Tensor]


@dataclass
class DerivedParameters:
    # name -> (the recipe's output names, its source names, fn(*sources) -> one tensor per output name)
    recipes: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[..., tuple[torch.Tensor, ...]]]] = \
        field(default_factory=dict)

    def add(self, name: str, sources: tuple[str, ...], fn: Callable[..., torch.Tensor]) -> None:
        self.add_many((name,), sources, lambda *ws: (fn(*ws),))

    def add_many(self, names: tuple[str, ...], sources: tuple[str, ...],
                 fn: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        for name in names:
            self.recipes[name] = (tuple(names), tuple(sources), fn)

    def getter(self, get: Get) -> Get:
        """`get` extended with the derived names (which may build on each other)."""
        last: dict[tuple[str, ...], tuple[torch.Tensor, ...]] = {}

        def resolve(name: str) -> torch.Tensor:
            if name not in self.recipes:
                return get(name)
            names, sources, fn = self.recipes[name]
            if names not in last:
                last.clear()
                last[names] = fn(*(resolve(s) for s in sources))
            return last[names][names.index(name)]
        return resolve
