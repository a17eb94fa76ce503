"""LAuReL fusion: LAuReL's left projection and q/k/v as one matmul over concatenated weights.

Matches, per decoder layer i and per function, the `torch.aten.mm(lhs, torch.aten.permute(W, [1, 0]))`
ops whose W is `layers.i.self_attn.{q,k,v}_proj.weight` or `layers.i.laurel.linear_left.weight`
(KV-shared layers have only q) and whose lhs are the same value up to `torch.aten.view` /
`torch.aten._to_copy` / `torch.prims.convert_element_type` (each Linear reshapes, and with bf16 weights
casts, the one normed input).

Leaves one `torch.aten.mm` by the transpose of a new parameter `layers.i.attn_laurel_in.weight`
(the rows of those weights stacked, built while the archive is written), followed by a
`torch.aten.slice.Tensor` per original result. One dispatch reads the normed input once instead of
four; the int4 pass (which runs later) then packs the fused weight like any other linear. The right
projection, post-norm and `(attn + laurel) / sqrt(2)` are elementwise tails IREE fuses, but for the
post-norm's sum of squares, a reduction dispatch of its own; hence:

Also matches, per function, `add.Tensor(add.Tensor(active, An), add.Tensor(x, Ln))` with An and Ln the layer's
RMSNorms `post_attention_layernorm` (of the attention output a) and `laurel.post_laurel_norm` (of the right
projection l), as `passes.ir.rms_norm` reads them. Leaves one reduction for both norms' sums of squares,
`sum(where(row == 0, a*a, L*R), -1)` over the inputs broadcast to [*lead, rows, D] (L, R each row's factors), each
norm taking its slice (sum / D as mean.dim computes it), and the two adds on the new norms: one reduction dispatch
instead of two. Where h = that sum is read only as `div.Scalar(h, c)` and that quotient's RMSNorm N (the
pre-feedforward norm) exists, the same reduction gets six more rows from which N's sum of squares follows
(`ROWS`, `_merge_post_norms`), so N's own reduction goes, and the residual's reader of h / c gets an h built
apart, so that h fuses into N's scaling: 4 dispatches (reduction, h, reduction, N) become 2.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from iree.compiler import ir

from .ir import (Builder, Pattern, add_parameter, constant_float, constant_int, erase_with_checks, linear_weight,
                 ops, parameters, producer, rms_norm, users, vtensor)
from .pipeline import Pass, PassContext

MEMBER = re.compile(r"layers\.(\d+)\.(self_attn\.[qkv]_proj|laurel\.linear_left)\.weight")
ORDER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "laurel.linear_left")


def _root(value: ir.Value) -> ir.Value:
    op = producer(value)
    while op is not None and op.name in ("torch.aten.view", "torch.aten._to_copy", "torch.prims.convert_element_type"):
        value = op.operands[0]
        op = producer(value)
    return value


def _member(op, params):
    m = MEMBER.fullmatch(linear_weight(op, params) or "")
    return (int(m.group(1)), m.group(2), m.group(0)) if m else None


def _post_norms(op, params):
    """(op, add(active, An), add(x, Ln), An, Ln, next) if `op` adds those two, An and Ln one layer's post-attention
    and post-LAuReL RMSNorms over equal shapes and read only there (else the old norms would stay); else None.
    `next` is (div.Scalar(op, c), N) with N the RMSNorm of that quotient (the pre-feedforward norm), or None."""
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
    return (*sums, attn, laurel, _next_norm(op.result, params))


def _next_norm(h: ir.Value, params):
    """(div, N) if h's only reader is div = div.Scalar(h, c) and N an RMSNorm of div, else None."""
    readers = users(h)
    div = readers[0] if len(readers) == 1 else None
    if div is None or div.name != "torch.aten.div.Scalar" or constant_float(div.operands[1]) is None:
        return None
    for scaled in users(div.result):
        for weighted in users(scaled.result) if scaled.name == "torch.aten.mul.Tensor" else []:
            norm = rms_norm(weighted.result, params) if weighted.name == "torch.aten.mul.Tensor" else None
            if norm is not None and norm.x == div.result:
                return div, norm
    return None


# The rows of the merged reduction, as (left factor, right factor) over u = active + x, v1 = a * w_An, v2 = l * w_Ln.
ROWS = (("a", "a"), ("l", "l"), ("u", "u"), ("v1", "v1"), ("v2", "v2"), ("u", "v1"), ("u", "v2"), ("v1", "v2"))


def _merge_post_norms(op, left, right, attn, laurel, after) -> None:
    """h = (active + An) + (x + Ln) with both norms' sums of squares in one reduction, built at h. With `after`
    (h / c and its norm N), the same reduction also gives N's sum of squares: with s1, s2 the two norms' rsqrt
    factors, h = u + s1 v1 + s2 v2, so sum(h^2) = u.u + s1^2 v1.v1 + s2^2 v2.v2 + 2 (s1 u.v1 + s2 u.v2 + s1 s2 v1.v2)
    (ROWS). N then needs no reduction of its own. Each row's factors are masked sums of the four inputs broadcast
    to [*lead, rows, D] (so no input is read twice through a materialised intermediate), and h computes its
    rsqrt factors at [*lead, D], apart from the [*lead, 1] ones of N's sum (which CSE would otherwise share, making
    them a dispatch of their own)."""
    build = Builder(op)
    shape = vtensor(attn.x)[0]
    lead, d = len(shape) - 1, shape[-1]
    keep = [*shape[:-1], 1]
    rows = ROWS if after else ROWS[:2]
    full = [*shape[:-1], len(rows), d]
    g1, g2 = attn.ops[0].operands[1], laurel.ops[0].operands[1]

    def mul(x, y, out=shape):
        return build.aten("mul.Tensor", [x, y], out)

    def add(x, y, out=shape):
        return build.aten("add.Tensor", [x, y, build.int(1)], out)

    def spread(v):
        return build.aten("expand", [build.unsqueeze(v, lead), build.ints(full), build.bool(False)], full)

    def mask(pick):
        return build.view(build.literal([pick(row) for row in range(len(rows))], "i1"), (len(rows), 1))

    def where(m, x, y, out=(len(rows), d)):
        return build.aten("where.self", [m, x, y], out)

    zero, one = build.literal([0.0], "f32"), build.literal([1.0], "f32")
    inputs = {"active": spread(left.operands[0]), "x": spread(right.operands[0]), "a": spread(attn.x),
              "l": spread(laurel.x)}

    def factor(side):
        """[*lead, rows, D]: each row's `side` factor (0 left, 1 right) as masks times the inputs."""
        names = [pair[side] for pair in rows]
        u = mask(lambda r: names[r] == "u")
        a = where(mask(lambda r: names[r] == "a"), one, where(mask(lambda r: names[r] == "v1"), g1, zero))
        l = where(mask(lambda r: names[r] == "l"), one, where(mask(lambda r: names[r] == "v2"), g2, zero))
        own = add(mul(a, inputs["a"], full), mul(l, inputs["l"], full), full)
        return where(u, add(inputs["active"], inputs["x"], full), own, full)

    # Row 0 apart: a select in the body keeps IREE from taking the reduction for a contraction, which would not
    # fuse the factors' arithmetic.
    terms = where(mask(lambda r: r == 0), mul(inputs["a"], inputs["a"], full), mul(factor(0), factor(1), full), full)
    sums = build.aten("sum.dim_IntList", [terms, build.ints([lead + 1]), build.bool(False), build.none()],
                      [*shape[:-1], len(rows)])

    def total(k, out=keep):
        row = build.aten("slice.Tensor", [sums, build.int(lead), build.int(k), build.int(k + 1), build.int(1)], keep)
        return row if out == keep else build.aten("expand", [row, build.ints(out), build.bool(False)], out)

    def rsqrt(sum_of_squares, count, eps, out=keep, scaled=False):
        """pow(sum / count + eps, -0.5); `scaled` multiplies by 1 / count instead: other ops, which CSE keeps apart."""
        mean = build.aten("mul.Scalar" if scaled else "div.Scalar",
                          [sum_of_squares, build.float(1 / count if scaled else count)], out)
        return build.aten("pow.Tensor_Scalar", [build.aten("add.Scalar", [mean, build.float(eps), build.int(1)], out),
                                                build.float(-0.5)], out)

    def residual(scaled=False):
        """h, its factors computed at [*lead, D] (so that they fuse into h's reader)."""
        return add(add(left.operands[0], mul(mul(attn.x, rsqrt(total(0, shape), d, attn.eps, shape, scaled)), g1)),
                   add(right.operands[0], mul(mul(laurel.x, rsqrt(total(1, shape), d, laurel.eps, shape, scaled)), g2)))

    h = residual()
    if after:
        div, norm = after
        dot = {f"{x}.{y}": total(k) for k, (x, y) in enumerate(ROWS)}
        s1, s2 = rsqrt(dot["a.a"], d, attn.eps), rsqrt(dot["l.l"], d, laurel.eps)
        cross = add(mul(s1, dot["u.v1"], keep), add(mul(s2, dot["u.v2"], keep),
                                                     mul(mul(s1, s2, keep), dot["v1.v2"], keep), keep), keep)
        square = add(add(add(dot["u.u"], mul(mul(s1, s1, keep), dot["v1.v1"], keep), keep),
                         mul(mul(s2, s2, keep), dot["v2.v2"], keep), keep), add(cross, cross, keep), keep)
        c = constant_float(div.operands[1])
        norm.ops[2].result.replace_all_uses_with(rsqrt(square, d * c * c, norm.eps))
        # The layer's residual reads h / c too: from an h of its own, so that h, read by N alone, fuses into it.
        later = [use for use in div.result.uses if use.owner.operation not in (norm.ops[1], norm.ops[-1])]
        if later:
            again = build.aten("div.Scalar", [residual(scaled=True), build.float(c)], shape)
            for use in later:
                use.owner.operation.operands[use.operand_number] = again
        erase_with_checks(norm.ops[2:])
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


class InputProjections(Pattern):
    """A layer's q/k/v projections and LAuReL's left projection, reading one normed input, as one matmul over their
    concatenated weights (`layers.i.attn_laurel_in.weight`, declared once and shared by every function)."""

    name = "input-projections"

    def __init__(self):
        self.symbols = {}

    def candidates(self, module) -> list:
        """Per function and layer, the linears by the member weights that read one root value (in IR order)."""
        self.module, params = module, parameters(module)
        groups = defaultdict(list)  # (function, layer, lhs root, lhs type) -> [(role, name, mm, position)]
        for f, func in enumerate(ops(module, "func.func")):
            for position, op in enumerate(ops(func)):
                hit = _member(op, params)
                if hit:
                    layer, role, name = hit
                    lhs = op.operands[0]
                    groups[(f, layer, _root(lhs), str(lhs.type))].append((role, name, op, position))
        return [(key[1], members) for key, members in groups.items()]

    def match(self, group, ctx):
        layer, members = group
        roles = [m[0] for m in members]
        if "laurel.linear_left" not in roles or len(members) < 2 or len(set(roles)) != len(roles):
            return None
        return layer, sorted(members, key=lambda m: ORDER.index(m[0]))

    def rewrite(self, site, ctx) -> None:
        layer, members = site
        names = tuple(m[1] for m in members)
        weights = [vtensor(producer(m[2].operands[1]).operands[0]) for m in members]
        shape, elem = (sum(w[0][0] for w in weights), weights[0][0][1]), weights[0][1]
        if names not in self.symbols:
            fused = f"layers.{layer}.attn_laurel_in.weight"
            self.symbols[names] = add_parameter(self.module, fused, shape, elem)
            ctx.derived.add(fused, names, lambda *ws: torch.cat(ws, dim=0))
        earliest = min(members, key=lambda m: m[3])[2]
        _rewrite(earliest, [m[2] for m in members], self.symbols[names], shape, elem)


class PostNorms(Pattern):
    """`add.Tensor(add.Tensor(active, An), add.Tensor(x, Ln))`, An and Ln a layer's post-attention and post-LAuReL
    RMSNorms: both norms' sums of squares (and the pre-feedforward norm's, where it follows) in one reduction."""

    name = "post-norms"

    def candidates(self, module) -> list:
        self.params = parameters(module)
        return ops(module, "torch.aten.add.Tensor")

    def match(self, op, ctx):
        return _post_norms(op, self.params)

    def rewrite(self, site, ctx) -> None:
        _merge_post_norms(*site)


class LaurelFusion(Pass):
    """LAuReL left projection + q/k/v of a layer as one matmul over concatenated weights."""

    name = "laurel-fusion"

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        return [InputProjections(), PostNorms()]

    def expected(self, ctx: PassContext) -> dict[str, int]:
        """Both, once per layer in every function."""
        sites = ctx.config.num_hidden_layers * len(ctx.functions)
        return {"input-projections": sites, "post-norms": sites}
