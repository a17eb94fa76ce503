"""Sliding-window specialisation of decode: the ring buffer's attention mask becomes a validity test.

Expects the exported `decode_step(input_ids, per_layer_rows, start i64[1], caches...)` (export.py's ABI),
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

from .ir import ops, vtensor, vtensor_type
from .pipeline import Pass, PassContext

FUNCTION = "decode_step"
START_ARGUMENT = 2


def _decode_step(module) -> ir.Operation | None:
    for op in ops(module, "func.func"):
        if ir.StringAttr(op.attributes["sym_name"]).value == FUNCTION:
            return op
    return None


def _ring_slots(func) -> int | None:
    """The sliding layers' slot count: the smallest cache in the signature (f32/bf16 [B, Hkv, S, Dh])."""
    slots = [vtensor(a)[0][2] for a in func.regions[0].blocks[0].arguments[START_ARGUMENT + 1:]
             if vtensor(a) and len(vtensor(a)[0]) == 4]
    return min(slots) if slots else None


def _is_sliding_mask_site(op, ring: int) -> bool:
    if op.name != "torch.aten.where.self":
        return False
    mask, scores = vtensor(op.operands[0]), vtensor(op.operands[1])
    return (mask is not None and scores is not None and mask == ((1, ring), "i1") and scores[1] == "f32"
            and scores[0][-2:] == (1, ring))


class SlidingWindowDecode(Pass):
    """Decode attention on sliding layers: the ring buffer's mask reduced to the slot-validity test."""

    name = "sliding-window"

    def run(self, module, ctx: PassContext) -> dict[str, int]:
        func = _decode_step(module)
        ring = _ring_slots(func) if func is not None else None
        if ring is None or ring > ctx.config.sliding_window:
            return {"matched": 0, "rewritten": 0}
        sites = [op for op in ops(func) if _is_sliding_mask_site(op, ring)]
        if not sites:
            return {"matched": 0, "rewritten": 0}
        entry = func.regions[0].blocks[0]
        start = entry.arguments[START_ARGUMENT]
        with ir.InsertionPoint.at_block_begin(entry), func.location:
            slots = ir.DenseElementsAttr.get(np.arange(ring, dtype=np.int64).reshape(1, ring),
                                             type=ir.IntegerType.get_signed(64))
            index = ir.Operation.create("torch.vtensor.literal", results=[vtensor_type((1, ring), "si64")],
                                        attributes={"value": slots}).result
            valid = ir.Operation.create("torch.aten.le.Tensor", results=[vtensor_type((1, ring), "i1")],
                                        operands=[index, start]).result
        for op in sites:
            op.operands[0] = valid
        return {"matched": len(sites), "rewritten": len(sites), "ring_slots": ring}
