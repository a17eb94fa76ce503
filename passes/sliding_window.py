"""Sliding-window specialisation of decode: the ring buffer's attention mask becomes a validity test.

Expects the exported `decode_step(<decode's ABI arguments: runtime/abi.py>, caches...)`, with `start` i64[1],
whose sliding layers keep a ring of R = min(sliding_window, max_context) cache slots (the smallest
cache in the signature) and attend with
`torch.aten.where.self(mask i1[1, R], scores f32[..., 1, R], fill)`, where the model computes `mask`
from each slot's position: causal, inside the window, and written at all.

The step writes position `start` to slot `start % R` before it attends, so the ring then holds
positions max(0, start - R + 1) .. start: every written slot is causal and inside the window (R <= the
window). The mask is therefore just "slot s has been written", s <= start. Leaves, once at the top of
`decode_step`, `torch.aten.le.Tensor(torch.vtensor.literal([[0, 1, .., R-1]]), start)` as the mask of
every sliding layer's `where` (KV-shared layers included); the position arithmetic per layer (ring
slot positions, remainders, window and causal comparisons) goes dead. Full-attention layers (R' =
max_context > R slots) and prefill are unchanged. The attention itself is already the one-query form
(matmul, `where`, softmax, matmul; no fused attention op) that IREE turns into a matvec + softmax.
"""

from __future__ import annotations

import numpy as np
from iree.compiler import ir

from runtime.abi import step_symbol

from .ir import Pattern, ops, vtensor, vtensor_type
from .pipeline import Pass, PassContext

FUNCTION = "decode"


def _step_function(module) -> ir.Operation | None:
    for op in ops(module, "func.func"):
        if ir.StringAttr(op.attributes["sym_name"]).value == step_symbol(FUNCTION):
            return op
    return None


def ring_slots(func, abi_args: int) -> int | None:
    """The sliding layers' slot count: the smallest cache in the signature (f32/bf16 [B, Hkv, S, Dh]), which
    follows the ABI's `abi_args` arguments."""
    slots = [vtensor(a)[0][2] for a in func.regions[0].blocks[0].arguments[abi_args:]
             if vtensor(a) and len(vtensor(a)[0]) == 4]
    return min(slots) if slots else None


class RingMask(Pattern):
    """`torch.aten.where.self(mask i1[1, R], scores f32[..., 1, R], fill)` in decode_step, R the ring's slots: its
    mask becomes `slots <= start`, built once at the top of the function."""

    name = "ring-mask"

    def __init__(self):
        self.valid = None

    def candidates(self, module) -> list:
        self.func = _step_function(module)
        return ops(self.func) if self.func is not None else []

    def match(self, op, ctx: PassContext):
        if self.func is None or op.name != "torch.aten.where.self":
            return None
        ring = ring_slots(self.func, len(ctx.functions[FUNCTION].args))
        if ring is None or ring > ctx.config.sliding_window:
            return None
        mask, scores = vtensor(op.operands[0]), vtensor(op.operands[1])
        if (mask is not None and scores is not None and mask == ((1, ring), "i1") and scores[1] == "f32"
                and scores[0][-2:] == (1, ring)):
            return op, ring
        return None

    def rewrite(self, site, ctx: PassContext) -> None:
        op, ring = site
        if self.valid is None:
            entry = self.func.regions[0].blocks[0]
            start = entry.arguments[ctx.functions[FUNCTION].index("start")]
            with ir.InsertionPoint.at_block_begin(entry), self.func.location:
                slots = ir.DenseElementsAttr.get(np.arange(ring, dtype=np.int64).reshape(1, ring),
                                                 type=ir.IntegerType.get_signed(64))
                index = ir.Operation.create("torch.vtensor.literal", results=[vtensor_type((1, ring), "si64")],
                                            attributes={"value": slots}).result
                self.valid = ir.Operation.create("torch.aten.le.Tensor", results=[vtensor_type((1, ring), "i1")],
                                                 operands=[index, start]).result
        op.operands[0] = self.valid


class SlidingWindowDecode(Pass):
    """Decode attention on sliding layers: the ring buffer's mask reduced to the slot-validity test."""

    name = "sliding-window"

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        return [RingMask()]

    def expected(self, ctx: PassContext) -> dict[str, int]:
        """Every sliding layer's attention (KV-shared ones included: they read their source's mask); where the
        context is no longer than the window, the full layers' caches have the ring's size, so every layer."""
        c = ctx.config
        layers = c.num_hidden_layers if ctx.max_context <= c.sliding_window else \
            sum(c.is_sliding(i) for i in range(c.num_hidden_layers))
        return {"ring-mask": layers}
