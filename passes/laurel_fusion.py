"""LAuReL fusion: LAuReL's left projection and q/k/v as one matmul over concatenated weights.

Matches, per decoder layer i and per function, the `torch.aten.mm(lhs, torch.aten.permute(W, [1, 0]))`
ops whose W is `layers.i.self_attn.{q,k,v}_proj.weight` or `layers.i.laurel.linear_left.weight`
(KV-shared layers have only q) and whose lhs are the same value up to `torch.aten.view` /
`torch.aten._to_copy` (each Linear reshapes, and with bf16 weights casts, the one normed input).

Leaves one `torch.aten.mm` by the transpose of a new parameter `layers.i.attn_laurel_in.weight`
(the rows of those weights stacked, built while the archive is written), followed by a
`torch.aten.slice.Tensor` per original result. One dispatch reads the normed input once instead of
four; the int4 pass (which runs later) then packs the fused weight like any other linear. The right
projection, post-norm and `(attn + laurel) / sqrt(2)` are elementwise tails IREE fuses, but for the
post-norm's sum of squares, a reduction dispatch of its own; hence:

Also matches, per function, `add.Tensor(add.Tensor(active, An), add.Tensor(x, Ln))` with An and Ln the layer's
RMSNorms `post_attention_layernorm` (of the attention output a) and `laurel.post_laurel_norm` (of the right
projection l), as `passes.ir.rms_norm` reads them. Leaves one reduction for both norms' sums of squares,
`sum(where([true, false], a*a, l*l), -1)` over both inputs broadcast to [*lead, 2, D], each norm taking its slice
(sum / D as mean.dim computes it), and the two adds on the new norms: one reduction dispatch instead of two.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from iree.compiler import ir

from .ir import (Builder, add_parameter, constant_int, erase_with_checks, linear_weight, ops, parameters, producer,
                 rms_norm, users, vtensor)
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
        residuals = [site for site in (_post_norms(op, params) for op in ops(module, "torch.aten.add.Tensor")) if site]
        for site in residuals:
            _merge_post_norms(*site)
        return {"matched": sum(len(m) for m in groups.values()), "fused_matmuls": fused,
                "merged_post_norms": len(residuals)}


def _post_norms(op, params):
    """(op, add(active, An), add(x, Ln), An, Ln) if `op` adds those two, An and Ln one layer's post-attention
    and post-LAuReL RMSNorms over equal shapes and read only there (else the old norms would stay); else None."""
    sums = [op, producer(op.operands[0]), producer(op.operands[1])]
    if not all(s is not None and s.name == "torch.aten.add.Tensor" and constant_int(s.operands[2]) == 1 for s in sums):
        return None
    if any(len(users(v)) != 1 for s in sums[1:] for v in (s.result, s.operands[1])):
        return None
    attn, laurel = rms_norm(sums[1].operands[1], params), rms_norm(sums[2].operands[1], params)
    if attn is None or laurel is None or vtensor(attn.x) != vtensor(laurel.x):
        return None
    layer = attn.weight.removesuffix("post_attention_layernorm.weight")
    if layer == attn.weight or laurel.weight != layer + "laurel.post_laurel_norm.weight":
        return None
    return (*sums, attn, laurel)


def _merge_post_norms(op, left, right, attn, laurel) -> None:
    """h = (active + An) + (x + Ln) with both norms' sums of squares in one reduction, built at h."""
    build = Builder(op)
    shape = vtensor(attn.x)[0]
    lead, d = len(shape) - 1, shape[-1]
    pair = [*shape[:-1], 2, d]
    a, r = (build.aten("expand", [build.unsqueeze(n.x, lead), build.ints(pair), build.bool(False)], pair)
            for n in (attn, laurel))
    squares = build.aten("where.self", [build.view(build.literal([True, False], "i1"), (2, 1)),
                                        build.aten("mul.Tensor", [a, a], pair), build.aten("mul.Tensor", [r, r], pair)],
                         pair)
    sums = build.aten("sum.dim_IntList", [squares, build.ints([lead + 1]), build.bool(False), build.none()],
                      [*shape[:-1], 2])
    keep = [*shape[:-1], 1]

    def normed(norm, k):
        mean = build.aten("div.Scalar", [build.aten("slice.Tensor", [sums, build.int(lead), build.int(k),
                                                                     build.int(k + 1), build.int(1)], keep),
                                         build.float(d)], keep)
        rsqrt = build.aten("pow.Tensor_Scalar", [build.aten("add.Scalar", [mean, build.float(norm.eps), build.int(1)],
                                                            keep), build.float(-0.5)], keep)
        weight = norm.ops[0].operands[1]
        return build.aten("mul.Tensor", [build.aten("mul.Tensor", [norm.x, rsqrt], shape), weight], shape)

    def add(x, y):
        return build.aten("add.Tensor", [x, y, build.int(1)], shape)

    h = add(add(left.operands[0], normed(attn, 0)), add(right.operands[0], normed(laurel, 1)))
    op.result.replace_all_uses_with(h)
    erase_with_checks([op, left, right, *attn.ops, *laurel.ops])


def _rewrite(first, mms, symbol: str, shape, weight_elem: str) -> None:
    """Replace `mms` (in weight order) by one mm over the fused weight, placed at the earliest of
    them (`first`, whose lhs is then defined), and a slice per original result."""
    lhs = first.operands[0]
    m, (rows, k) = vtensor(lhs)[0][0], shape
    out_elem = vtensor(first.result)[1]
    build = Builder(first)
    w = build.parameter(symbol, shape, weight_elem)
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
