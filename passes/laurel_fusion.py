"""LAuReL fusion: LAuReL's left projection and q/k/v as one matmul over concatenated weights.

Matches, per decoder layer i and per function, the `torch.aten.mm(lhs, torch.aten.permute(W, [1, 0]))`
ops whose W is `layers.i.self_attn.{q,k,v}_proj.weight` or `layers.i.laurel.linear_left.weight`
(KV-shared layers have only q) and whose lhs are the same value up to `torch.aten.view` /
`torch.aten._to_copy` (each Linear reshapes, and with bf16 weights casts, the one normed input).

Leaves one `torch.aten.mm` by the transpose of a new parameter `layers.i.attn_laurel_in.weight`
(the rows of those weights stacked, built while the archive is written), followed by a
`torch.aten.slice.Tensor` per original result. One dispatch reads the normed input once instead of
four; the int4 pass (which runs later) then packs the fused weight like any other linear. The right
projection, post-norm and `(attn + laurel) / sqrt(2)` are elementwise tails IREE already fuses.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from iree.compiler import ir

from .ir import Builder, add_parameter, linear_weight, ops, parameters, producer, tensor_type, vtensor
from .pipeline import Pass, PassContext

MEMBER = re.compile(r"layers\.(\d+)\.(self_attn\.[qkv]_proj|laurel\.linear_left)\.weight")
ORDER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "laurel.linear_left")


def _root(value: ir.Value) -> ir.Value:
    op = producer(value)
    while op is not None and op.name in ("torch.aten.view", "torch.aten._to_copy"):
        value = op.operands[0]
        op = producer(value)
    return value


def _member(op, params):
    m = MEMBER.fullmatch(linear_weight(op, params) or "")
    return (int(m.group(1)), m.group(2), m.group(0)) if m else None


class LaurelFusion(Pass):
    """LAuReL left projection + q/k/v of a layer as one matmul over concatenated weights."""

    name = "laurel-fusion"

    def run(self, module, ctx: PassContext) -> dict[str, int]:
        params = parameters(module)
        groups = defaultdict(list)  # (function, layer, lhs root, lhs type) -> [(role, name, mm, position)]
        for f, func in enumerate(ops(module, "func.func")):
            for position, op in enumerate(ops(func)):
                hit = _member(op, params)
                if hit:
                    layer, role, name = hit
                    lhs = op.operands[0]
                    groups[(f, layer, _root(lhs), str(lhs.type))].append((role, name, op, position))
        fused, symbols = 0, {}
        for (_, layer, _, _), members in groups.items():
            roles = [m[0] for m in members]
            if "laurel.linear_left" not in roles or len(members) < 2 or len(set(roles)) != len(roles):
                continue
            members.sort(key=lambda m: ORDER.index(m[0]))
            names = tuple(m[1] for m in members)
            weights = [vtensor(producer(m[2].operands[1]).operands[0]) for m in members]
            shape, elem = (sum(w[0][0] for w in weights), weights[0][0][1]), weights[0][1]
            if names not in symbols:
                symbols[names] = add_parameter(module, f"layers.{layer}.attn_laurel_in.weight", shape, elem)
                ctx.derived.add(f"layers.{layer}.attn_laurel_in.weight", names, lambda *ws: torch.cat(ws, dim=0))
            earliest = min(members, key=lambda m: m[3])[2]
            _rewrite(earliest, [m[2] for m in members], symbols[names], shape, elem)
            fused += 1
        return {"matched": sum(len(m) for m in groups.values()), "fused_matmuls": fused}


def _rewrite(first, mms, symbol: str, shape, weight_elem: str) -> None:
    """Replace `mms` (in weight order) by one mm over the fused weight, placed at the earliest of
    them (`first`, whose lhs is then defined), and a slice per original result."""
    lhs = first.operands[0]
    m, (rows, k) = vtensor(lhs)[0][0], shape
    out_elem = vtensor(first.result)[1]
    build = Builder(first)
    loaded = build.op("util.global.load", [], [tensor_type(shape, weight_elem)],
                      {"global": ir.FlatSymbolRefAttr.get(symbol)}).result
    w = build.op("torch_c.from_builtin_tensor", [loaded],
                 [ir.Type.parse(f"!torch.vtensor<[{rows},{k}],{weight_elem}>")]).result
    wt = build.aten("permute", [w, build.ints([1, 0])], (k, rows), weight_elem)
    product = build.aten("mm", [lhs, wt], (m, rows), out_elem)
    start = 0
    for op in mms:
        width = vtensor(op.result)[0][1]
        part = build.aten("slice.Tensor", [product, build.int(1), build.int(start), build.int(start + width),
                                           build.int(1)], (m, width), out_elem)
        op.result.replace_all_uses_with(part)
        start += width
    for op in mms:
        op.erase()
