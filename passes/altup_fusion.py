"""AltUp fusion: AltUp's router and coefficient matmuls become broadcast-multiply-reduce.

Matches (in every function) `torch.aten.mm(x [M, n], w [n, N])` and `torch.aten.bmm(a [B, M, n],
b [B, n, N])` whose contraction size is the AltUp stream count n (`altup_num_inputs`, 4): the
prediction and correction coefficient linears on the router output ([T, n] x [n, n*n], [T, n] x [n, n])
and the stream mix of `predict` ([B*T, D, n] x [B*T, n, n]). No other Gemma 3n matmul contracts over n.
These leave the n-term sum unrolled, `a[..., :, 0, None] * b[..., None, 0, :] + ... (n terms)` as
`torch.aten.select.int` / `unsqueeze` / `mul.Tensor` / `add.Tensor`: elementwise work only,
which IREE fuses with the surrounding elementwise ops (tanh, +1, the innovation update) instead of
forming tiny matmul or reduction dispatches.

Also matches the modality router, `torch.aten.mm(x [T, D], permute(altup.modality_router.weight, [1, 0]))`
(D -> n): it leaves `torch.aten.sum.dim_IntList(mul(unsqueeze(x, -1), unsqueeze(w^T, 0)), [-2])`, a
plain reduction that IREE fuses with the router norm's scaling and the tanh after it. As a matmul it
would be data-tiled, which costs a dispatch of its own to pack a 1 x D operand for an N = 4 product.

The same forms avoid IREE's SPIR-V miscompile of a tiny matmul fused into a broadcasting consumer
(toolchain notes §2).
"""

from __future__ import annotations

from .ir import Builder, linear_weight, ops, parameters, vtensor
from .pipeline import Pass, PassContext


def _match(op, n: int) -> bool:
    if op.name not in ("torch.aten.mm", "torch.aten.bmm"):
        return False
    a, b = vtensor(op.operands[0]), vtensor(op.operands[1])
    return a is not None and b is not None and a[0][-1] == n and b[0][-2] == n


def _is_router(op, params: dict) -> bool:
    name = linear_weight(op, params)
    return name is not None and name.endswith("altup.modality_router.weight")


def _rewrite(op, unroll: bool) -> None:
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


class AltUpFusion(Pass):
    """AltUp router and coefficient matmuls as broadcast-multiply-reduce."""

    name = "altup-fusion"

    def run(self, module, ctx: PassContext) -> dict[str, int]:
        n, params = ctx.config.altup_num_inputs, parameters(module)
        mixes = [op for op in ops(module) if _match(op, n)]
        routers = [op for op in ops(module) if _is_router(op, params)]
        for op in mixes:
            _rewrite(op, unroll=True)
        for op in routers:
            _rewrite(op, unroll=False)
        return {"matched": len(mixes) + len(routers), "rewritten": len(mixes) + len(routers), "routers": len(routers)}
