"""AltUp fusion: AltUp's router, coefficient and stream-mix matmuls become fused reductions.

AltUp (per decoder layer; n = `altup_num_inputs` = 4 streams, x [*lead, D] one of them) routes
    t = tanh(W_router @ (x * pow(mean(x^2) + eps, -0.5) * w_norm * scale))                 [*lead, n]
and mixes the streams with linears of contraction size n on t:
    predict  P[j] = H[j] + sum_i H[i] (W_pred @ t)[j*n + i]             (H, P [n, *lead, D]; x = H[active])
    correct  C[k] = P[k] + (y - P[active]) ((W_corr @ t)[k] + 1)                                  (x = y)

One-token sites (decode), f32 weights. Matches, in every function, the router
    tanh(view(mm(view(mul.Scalar(mul(mul(x, pow.Tensor_Scalar(add.Scalar(mean.dim(pow(x, 2), [-1]), eps), -0.5)),
         w_norm), scale)), permute(altup.modality_router.weight))))
with x of one token, feeding `mm(view(t), permute(W))` for W
  * `altup.prediction_coefs.weight`, then view, view, permute [0,1,3,2], expand, view into the rhs of a
    `bmm` whose lhs is view(expand(permute(H, [1,2,3,0]))), then view, permute [3,0,1,2], `add.Tensor(_, H)`;
  * `altup.correction_coefs.weight`, then view, `add.Scalar 1`, permute [2,0,1], `unsqueeze`
    (the `coefs + 1` factor, [n, *lead, 1]).
Leaves, with r = 0..n, the mask `last` = (r == n) and derived parameters (`layers.i.altup.{router,prediction,
correction}_folded`) R = [w_norm * W_router; 0] [n+1, D], A = [W_pred as [j, i, r]; I] and B = [W_corr, 1]:
    s = sum_d where(last, x*x, x * R)                  the norm's sum of squares and the n router dots [1, n+1]
    tau = tanh(s[r] * pow(s[n] / D + eps, -0.5) * scale), computed at its consumer's full shape
    P[j] = sum_{i,r} where(last, A[j,i,r] H[i], A[j,i,r] H[i] tau[r])           (r = n: the + H[j] term)
           over [j, i, 1, D, r], H broadcast in its own layout (IREE does not fuse a transpose of a concat)
    c[k] = sum_r where(last, B[k,r], B[k,r] tau[r])                (r = n: the + 1), replacing `coefs + 1`
IREE fuses elementwise producers into a reduction, not into a contraction (a mul-add-only body); the `where`,
which selects the identity term, keeps these reductions off the contraction path, so s broadcast, pow and tanh
fuse into the mix: router 1 dispatch, predict 1, correct 1 (plus its consumer): 2 + 2 per layer instead of 4 + 4.
The mix recomputes pow and tanh per term ((n+1) n per predicted element): negligible for one token, not for a
prefill chunk, which keeps the forms below. The replaced ops are erased with their `_assert_tensor_metadata` checks.
At those one-token correct sites, where C = innovation * c + P is read as C[active] (the per-layer input's gate)
and as `cat([C[:1], C[1:] + injected])` (the layer's output), C[active] gets its own mix over its row and the cat
becomes `where(k != active, C + injected, C)` (`SplitStreams`): C then has one reader and fuses into it, and the
gate's input is packed where it is computed: one dispatch fewer per layer.

Elsewhere (prefill chunks, bf16 weights, where the router input is cast), `torch.aten.mm(x [M, n], w [n, N])` and
`torch.aten.bmm(a [B, M, n], b [B, n, N])` contracting over n, found by their weights (the coefficient linears, and
the stream mix fed by the prediction coefficients: a small config's LAuReL rank or ring of keys can also be n), leave
the n-term sum unrolled, `a[..., :, 0, None] * b[..., None, 0, :]
+ ...` as `select.int` / `unsqueeze` / `mul.Tensor` / `add.Tensor`: elementwise work IREE fuses with the tanh,
+1 and innovation update around it instead of forming tiny matmul or reduction dispatches. The modality router,
`mm(x [T, D], permute(altup.modality_router.weight))`, leaves `sum.dim_IntList(mul(unsqueeze(x, -1),
unsqueeze(w^T, 0)), [-2])`, a plain reduction fused with the norm's scaling and the tanh; as a matmul it would be
data-tiled, a dispatch of its own to pack a 1 x D operand for an N = 4 product.

These forms also avoid IREE's SPIR-V miscompile of a tiny matmul fused into a broadcasting consumer (tiles of
[8, 8] over a 4-wide product: only rows 0, 8, 16, ... came out right).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from iree.compiler import ir

from .ir import (Builder, Pattern, add_parameter, chain_down, chain_up, constant_float, constant_int,
                 constant_ints, erase_with_checks, linear_weight, ops, parameters, producer, rms_norm, users, vtensor)
from .pipeline import Pass, PassContext


def _dims(op: ir.Operation) -> list[int] | None:
    return constant_ints(op.operands[1])


@dataclass
class Router:
    x: ir.Value
    norm_weight: str      # parameter names
    router_weight: str
    eps: float
    scale: float
    chain: list           # its ops, from the norm to the coefficient linear
    linear: ir.Operation  # mm(view(t), permute(W)): W a coefficient linear


def _router(mm: ir.Operation, params: dict) -> Router | None:
    name = linear_weight(mm, params)
    if name is None or not name.endswith("altup.modality_router.weight"):
        return None
    scaled = chain_up(mm.operands[0], "view", "mul.Scalar")
    norm = scaled and rms_norm(scaled[1].operands[0], params)
    after = chain_down(mm.result, "view", "tanh")
    if norm is None or after is None or math.prod(vtensor(norm.x)[0][:-1]) != 1:
        return None
    linear = chain_down(after[1].result, "view", "mm")
    if linear is None:
        return None
    return Router(norm.x, norm.weight, name, norm.eps, constant_float(scaled[1].operands[1]),
                  [*scaled, *norm.ops, mm, *after, *linear], linear[1])


def _predict_chain(linear: ir.Operation):
    """(H, the ops from the coefficient linear to P = add.Tensor(_, H)) for the predict mix, else None."""
    coefs = chain_down(linear.result, "view", "view", "permute", "expand", "view", "bmm")
    if coefs is None or _dims(coefs[2]) != [0, 1, 3, 2] or coefs[5].operands[1] != coefs[4].result:
        return None
    bmm = coefs[5]
    streams = chain_up(bmm.operands[0], "view", "expand", "permute")
    tail = chain_down(bmm.result, "view", "permute", "add.Tensor")
    if streams is None or tail is None or _dims(streams[2]) != [1, 2, 3, 0] or _dims(tail[1]) != [3, 0, 1, 2]:
        return None
    h, add = streams[2].operands[0], tail[2]
    if add.operands[1] != h or constant_int(add.operands[2]) != 1:
        return None
    return h, [*coefs, *streams, *tail]


def _correct_chain(linear: ir.Operation):
    """The ops from the coefficient linear to `unsqueeze(permute(coefs + 1))` [n, *lead, 1], else None."""
    chain = chain_down(linear.result, "view", "add.Scalar", "permute", "unsqueeze")
    if chain is None:
        return None
    _, plus, perm, unsqueeze = chain
    rank = len(vtensor(plus.result)[0])
    if (constant_float(plus.operands[1]) != 1.0 or constant_int(plus.operands[2]) != 1 or
            _dims(perm) != [rank - 1, *range(rank - 1)] or constant_int(unsqueeze.operands[1]) not in (rank, -1)):
        return None
    return chain


class _Emitter:
    """Builds the fused forms of one site before `anchor`; `declare(name, sources, fn, shape)` gives the symbol
    of derived parameter `name` = fn(*sources), declared once per module."""

    def __init__(self, anchor: ir.Operation, router: Router, n: int, declare):
        self.build, self.r, self.n, self.declare = Builder(anchor), router, n, declare
        self.sums = None
        self.d = vtensor(router.x)[0][-1]

    def param(self, name: str, sources, fn, shape) -> ir.Value:
        return self.build.parameter(self.declare(name, sources, fn, shape), shape, "f32")

    def last(self) -> ir.Value:
        return self.build.literal([False] * self.n + [True], "i1")

    def router_sums(self) -> ir.Value:
        """[1, n+1]: x . (w_norm * W_router[r]) for r < n, then x . x; every term at the full [1, n+1, D]. Built
        once per site."""
        if self.sums is None:
            self.sums = self._router_sums()
        return self.sums

    def _router_sums(self) -> ir.Value:
        b, n, d = self.build, self.n, self.d
        rows = self.param(self.r.router_weight.replace("modality_router.weight", "router_folded"),
                          (self.r.router_weight, self.r.norm_weight),
                          lambda w, g: torch.cat([w.float() * g.float(), torch.zeros(1, w.shape[1])]), (n + 1, d))
        x = b.aten("expand", [b.view(self.r.x, (1, 1, d)), b.ints([1, n + 1, d]), b.bool(False)], (1, n + 1, d))
        terms = b.aten("where.self", [b.view(self.last(), (n + 1, 1)), b.aten("mul.Tensor", [x, x], (1, n + 1, d)),
                                      b.aten("mul.Tensor", [x, rows], (1, n + 1, d))], (1, n + 1, d))
        return b.aten("sum.dim_IntList", [terms, b.ints([2]), b.bool(False), b.none()], (1, n + 1))

    def mix(self, weighted: ir.Value, dims: list[int]) -> ir.Value:
        """sum over `dims` of where(last, weighted, weighted * tau) (r the last axis), the router sums broadcast
        to weighted's shape before any arithmetic, so all of it fuses into the reduction."""
        b, n = self.build, self.n
        full = list(vtensor(weighted)[0])
        s = self.router_sums()

        def spread(v, width):  # [1, width] -> full
            return b.aten("expand", [b.view(v, [1] * (len(full) - 1) + [width]), b.ints(full), b.bool(False)], full)

        dots = spread(s, n + 1)
        squares = spread(b.aten("slice.Tensor", [s, b.int(1), b.int(n), b.int(n + 1), b.int(1)], (1, 1)), 1)
        mean = b.aten("div.Scalar", [squares, b.float(self.d)], full)
        rsqrt = b.aten("pow.Tensor_Scalar", [b.aten("add.Scalar", [mean, b.float(self.r.eps), b.int(1)], full),
                                             b.float(-0.5)], full)
        logits = b.aten("mul.Scalar", [b.aten("mul.Tensor", [dots, rsqrt], full), b.float(self.r.scale)], full)
        scaled = b.aten("mul.Tensor", [weighted, b.aten("tanh", [logits], full)], full)
        terms = b.aten("where.self", [self.last(), weighted, scaled], full)
        return b.aten("sum.dim_IntList", [terms, b.ints(dims), b.bool(False), b.none()],
                      [size for i, size in enumerate(full) if i not in dims])

    def predict(self, h: ir.Value, w_pred: str) -> ir.Value:
        """P [n, *lead, D] = sum_{i,r} where(last, A[j,i,r] H[i], A[j,i,r] H[i] tau[r]), at [j, i, 1, D, r]: H
        broadcast as it is laid out (a transpose of the concatenation that makes H would not fuse)."""
        b, n, d = self.build, self.n, self.d
        a = self.param(w_pred.replace("prediction_coefs.weight", "prediction_folded"), (w_pred,),
                       lambda w: torch.cat([w.float().reshape(n, n, n), torch.eye(n)[..., None]], -1), (n, n, n + 1))
        weighted = b.aten("mul.Tensor", [b.view(a, (n, n, 1, 1, n + 1)), b.view(h, (1, n, 1, d, 1))],
                          (n, n, 1, d, n + 1))
        return b.view(self.mix(weighted, [1, 4]), vtensor(h)[0])

    def correct(self, w_corr: str, shape, row: int | None = None) -> ir.Value:
        """`coefs + 1` [n, *lead, 1] = sum_r where(last, B[k,r], B[k,r] tau[r]); with `row`, that stream's alone,
        repeated over D ([*lead, D]: the mix at its consumer's shape, so that the two fuse)."""
        b, n = self.build, self.n
        coefs = self.param(w_corr.replace("correction_coefs.weight", "correction_folded"), (w_corr,),
                           lambda w: torch.cat([w.float(), torch.ones(n, 1)], -1), (n, n + 1))
        k, width = n, 1
        if row is not None:
            coefs = b.aten("slice.Tensor", [coefs, b.int(0), b.int(row), b.int(row + 1), b.int(1)], (1, n + 1))
            k, width = 1, self.d
        weighted = b.aten("expand", [b.view(coefs, (k, 1, n + 1)), b.ints([k, width, n + 1]), b.bool(False)],
                          (k, width, n + 1))
        return b.view(self.mix(weighted, [2]), shape)


def _split_site(coefs: ir.Value, active: int):
    """The ops of `SplitStreams`' form around fused `coefs`, or None (nothing changed) unless the IR has it."""
    mul = users(coefs)
    mul = mul[0] if len(mul) == 1 and mul[0].name == "torch.aten.mul.Tensor" else None
    add = users(mul.result) if mul else []
    add = add[0] if len(add) == 1 and add[0].name == "torch.aten.add.Tensor" else None
    if add is None or active != 0:
        return None
    shape = vtensor(add.result)[0]
    readers = users(add.result)
    picks = [op for op in readers if op.name == "torch.aten.select.int" and constant_int(op.operands[1]) == 0
             and constant_int(op.operands[2]) == active]
    heads = [op for op in readers if op.name == "torch.aten.slice.Tensor" and _slice_args(op) == [0, 0, 1, 1]]
    tails = [op for op in readers if op.name == "torch.aten.slice.Tensor" and _slice_args(op)[:2] == [0, 1]
             and (_slice_args(op)[2] or 0) >= shape[0] and _slice_args(op)[3] == 1]
    if len(picks) + len(heads) + len(tails) != len(readers) or len(heads) != 1 or len(tails) != 1 or not picks:
        return None
    injections, parts = users(tails[0].result), users(heads[0].result)
    if (len(injections) != 1 or injections[0].name != "torch.aten.add.Tensor" or len(parts) != 1 or
            injections[0].operands[0] != tails[0].result or constant_int(injections[0].operands[2]) != 1):
        return None
    injected, parts = injections[0], parts[0]
    cat = users(parts.result)
    if (parts.name != "torch.prim.ListConstruct" or list(parts.operands) != [heads[0].result, injected.result] or
            len(cat) != 1 or cat[0].name != "torch.aten.cat" or constant_int(cat[0].operands[1]) != 0):
        return None
    innovation = chain_up(mul.operands[0], "unsqueeze", "sub.Tensor")
    if innovation is None or constant_int(innovation[1].operands[2]) != 1:
        return None
    y, own = innovation[1].operands[0], innovation[1].operands[1]
    return add, shape, picks, heads, tails, injected, parts, cat, y, own


def _split(found, emit: _Emitter, w_corr: str, active: int) -> None:
    add, shape, picks, heads, tails, injected, parts, cat, y, own = found
    for pick in picks:
        b = emit.build = Builder(pick)
        lead = vtensor(pick.result)[0]
        coef = emit.correct(w_corr, lead, row=active)
        # y + -P[active], not y - P[active] (the same value): CSE would share C's and make it a dispatch of its own.
        step = b.aten("add.Tensor", [y, b.aten("neg", [own], lead), b.int(1)], lead)
        pick.result.replace_all_uses_with(b.aten("add.Tensor", [b.aten("mul.Tensor", [step, coef], lead), own,
                                                                b.int(1)], lead))
    build = Builder(cat[0])
    later = build.view(build.literal([k != active for k in range(shape[0])], "i1"), [shape[0]] + [1] * (len(shape) - 1))
    plus = build.aten("add.Tensor", [add.result, injected.operands[1], build.int(1)], shape)
    cat[0].result.replace_all_uses_with(build.aten("where.self", [later, plus, add.result], shape))
    erase_with_checks([cat[0], parts, injected, *heads, *tails, *picks])


def _slice_args(op: ir.Operation) -> list[int | None]:
    """slice.Tensor's (dim, start, end, step) as ints (None where not constant)."""
    return [constant_int(v) for v in op.operands[1:5]]


def _mm_as_sum(op, unroll: bool) -> None:
    a, b = op.operands[0], op.operands[1]
    shape, elem = vtensor(op.result)
    k = vtensor(a)[0][-1]
    build = Builder(op)
    rank = len(shape)
    if unroll:  # sum_i a[..., :, i, None] * b[..., None, i, :]: all elementwise, so no reduction dispatch
        total = None
        for i in range(k):
            column = build.unsqueeze(build.aten("select.int", [a, build.int(rank - 1), build.int(i)],
                                                shape[:-1], elem), rank - 1)        # [..., M, 1]
            row = build.unsqueeze(build.aten("select.int", [b, build.int(rank - 2), build.int(i)],
                                             [*shape[:-2], shape[-1]], elem), rank - 2)  # [..., 1, N]
            term = build.aten("mul.Tensor", [column, row], shape, elem)
            total = term if total is None else build.aten("add.Tensor", [total, term, build.int(1)], shape, elem)
    else:  # sum(a[..., :, :, None] * b[..., None, :, :], -2)
        product = build.aten("mul.Tensor", [build.unsqueeze(a, rank), build.unsqueeze(b, rank - 2)],
                             [*shape[:-1], k, shape[-1]], elem)
        total = build.aten("sum.dim_IntList", [product, build.ints([rank - 1]), build.bool(False), build.none()],
                           shape, elem)
    op.result.replace_all_uses_with(total)
    op.erase()


class _FoldedParameters:
    """The derived parameters the one-token forms read (`layers.i.altup.{router,prediction,correction}_folded`),
    each declared once per module and computed while the archive is written; shared by the patterns of one run."""

    def __init__(self):
        self.module, self.symbols = None, {}

    def bind(self, module) -> dict:
        """Use `module`; returns its parameters (global symbol -> archive name)."""
        self.module = module
        return parameters(module)

    def declare(self, ctx, name: str, sources, fn, shape) -> str:
        if name not in self.symbols:
            self.symbols[name] = add_parameter(self.module, name, shape, "f32")
            ctx.derived.add(name, sources, fn)
        return self.symbols[name]


class _OneTokenRouter(Pattern):
    """A one-token router feeding the coefficient linear `COEFFICIENTS`, followed by what `chain` matches."""

    COEFFICIENTS = ""

    def __init__(self, folded: _FoldedParameters):
        self.folded = folded

    def candidates(self, module) -> list:
        self.params = self.folded.bind(module)
        return ops(module, "torch.aten.mm")

    def chain(self, linear: ir.Operation):
        raise NotImplementedError

    def match(self, mm, ctx):
        router = _router(mm, self.params)
        weight = router and linear_weight(router.linear, self.params)
        if weight is None or not weight.endswith(self.COEFFICIENTS):
            return None
        found = self.chain(router.linear)
        return (router, weight, found) if found else None


class OneTokenPredict(_OneTokenRouter):
    """Router + predict of one token: one masked reduction for the router's sums, one for the stream mix."""

    name = "one-token-predict"
    COEFFICIENTS = "altup.prediction_coefs.weight"

    def chain(self, linear):
        return _predict_chain(linear)

    def rewrite(self, site, ctx) -> None:
        router, weight, (streams, chain) = site
        emit = _Emitter(chain[-1], router, ctx.config.altup_num_inputs,
                        lambda *a: self.folded.declare(ctx, *a))
        chain[-1].result.replace_all_uses_with(emit.predict(streams, weight))
        erase_with_checks([*router.chain, *chain])  # so the matmuls later patterns see are those not fused


class OneTokenCorrect(_OneTokenRouter):
    """Router + correct of one token: `coefs + 1` as one masked reduction over the router's sums. Keeps, for
    `SplitStreams`, each fused `coefs + 1` with the emitter that built it."""

    name = "one-token-correct"
    COEFFICIENTS = "altup.correction_coefs.weight"

    def __init__(self, folded: _FoldedParameters):
        super().__init__(folded)
        self.fused = []

    def chain(self, linear):
        return _correct_chain(linear)

    def rewrite(self, site, ctx) -> None:
        router, weight, chain = site
        emit = _Emitter(chain[-1], router, ctx.config.altup_num_inputs,
                        lambda *a: self.folded.declare(ctx, *a))
        coefs = emit.correct(weight, vtensor(chain[-1].result)[0])
        chain[-1].result.replace_all_uses_with(coefs)
        erase_with_checks([*router.chain, *chain])
        self.fused.append((coefs, emit, weight))


class SplitStreams(Pattern):
    """At a one-token correct site, C = innovation * coefs + P [n, *lead, D] read as C[active] (the per-layer
    input's gate) and as cat([C[:1], C[1:] + injected]) (the layer's output): IREE materialises C for its two
    readers, and the gate's input again to pack it for the matmul. Rewritten: C[active] from its own coefficient
    (a mix over that row, so no op is shared with C's), and the output as where(k > 0, C + injected, C): C's only
    reader, which it then fuses into. One dispatch fewer per layer. Needs active = 0. Runs after all predict
    sites: a split replaces the streams a later layer's predict site reads."""

    name = "split-streams"

    def __init__(self, correct: OneTokenCorrect):
        self.correct = correct

    def candidates(self, module) -> list:
        return self.correct.fused

    def match(self, fused, ctx):
        coefs, emit, weight = fused
        found = _split_site(coefs, ctx.config.altup_active_idx)
        return (found, emit, weight) if found else None

    def rewrite(self, site, ctx) -> None:
        found, emit, weight = site
        _split(found, emit, weight, ctx.config.altup_active_idx)


class StreamMix(Pattern):
    """`mm(x [M, n], w [n, N])` / `bmm(a [B, M, n], b [B, n, N])` contracting over the n streams (the coefficient
    linears and the stream mix where the one-token forms do not apply): the n-term sum unrolled into elementwise
    products and adds."""

    name = "stream-mix"
    COEFFICIENTS = ("altup.prediction_coefs.weight", "altup.correction_coefs.weight")
    RESHAPES = ("torch.aten.view", "torch.aten.expand", "torch.aten.permute", "torch.prims.convert_element_type")

    def candidates(self, module) -> list:
        self.params = parameters(module)
        return ops(module, "torch.aten.mm") + ops(module, "torch.aten.bmm")

    def match(self, op, ctx):
        # By the weights, not by the contraction size alone: a small config's LAuReL rank or ring of keys can be n.
        if op.name == "torch.aten.mm":
            name = linear_weight(op, self.params)
            return op if name is not None and name.endswith(self.COEFFICIENTS) else None
        source = producer(op.operands[1])  # the mix's coefficients: the prediction linear, reshaped (and cast)
        while source is not None and source.name in self.RESHAPES:
            source = producer(source.operands[0])
        name = source is not None and source.name == "torch.aten.mm" and linear_weight(source, self.params)
        return op if name and name.endswith(self.COEFFICIENTS[0]) else None

    def rewrite(self, op, ctx) -> None:
        _mm_as_sum(op, unroll=True)


class RouterReduction(Pattern):
    """`mm(x [T, D], permute(altup.modality_router.weight))` where the one-token forms do not apply: a
    multiply-reduce, fused with the norm's scaling and the tanh (as a matmul it would be data-tiled: a dispatch of
    its own to pack a 1 x D operand for an N = 4 product)."""

    name = "router-reduction"

    def candidates(self, module) -> list:
        self.params = parameters(module)
        return ops(module, "torch.aten.mm")

    def match(self, op, ctx):
        name = linear_weight(op, self.params)
        return op if name is not None and name.endswith("altup.modality_router.weight") else None

    def rewrite(self, op, ctx) -> None:
        _mm_as_sum(op, unroll=False)


class AltUpFusion(Pass):
    """AltUp router, coefficient and stream-mix matmuls as fused reductions."""

    name = "altup-fusion"

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        folded = _FoldedParameters()
        correct = OneTokenCorrect(folded)
        return [OneTokenPredict(folded), correct, SplitStreams(correct), StreamMix(), RouterReduction()]

    def expected(self, ctx: PassContext) -> dict[str, int]:
        """Per layer: in each one-token function with f32 weights (bf16 linears cast the router's input, which the
        one-token forms do not take), one predict, one correct and one split (active stream 0); in every other
        function the three coefficient/mix contractions and the two routers."""
        layers = ctx.config.num_hidden_layers
        fused = len(ctx.one_token_functions()) if ctx.weight_dtype == "float32" else 0
        other = len(ctx.functions) - fused
        return {"one-token-predict": layers * fused, "one-token-correct": layers * fused,
                "split-streams": layers * fused if ctx.config.altup_active_idx == 0 else 0,
                "stream-mix": 3 * layers * other, "router-reduction": 2 * layers * other}
