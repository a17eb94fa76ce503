"""AltUp fusion: AltUp's coefficient matmuls become broadcast-multiply-reduce.

Matches (in every function) `torch.aten.mm(x [M, n], w [n, N])` and `torch.aten.bmm(a [B, M, n],
b [B, n, N])` whose contraction size is the AltUp stream count n (`altup_num_inputs`, 4): the
prediction and correction coefficient linears on the router output ([T, n] x [n, n*n], [T, n] x [n, n])
and the stream mix of `predict` ([B*T, D, n] x [B*T, n, n]). No other Gemma 3n matmul contracts over n.

Leaves `torch.aten.sum.dim_IntList(torch.aten.mul.Tensor(unsqueeze(a, -1), unsqueeze(b, -3)), [-2])`:
elementwise work plus a 4-term reduction, which IREE fuses with the surrounding elementwise ops
(tanh, +1, the innovation update) instead of forming tiny matmul dispatches. The same form avoids
IREE's SPIR-V miscompile of a tiny matmul fused into a broadcasting consumer (toolchain notes §2).
"""

from __future__ import annotations

from .ir import Builder, ops, vtensor
from .pipeline import Pass, PassContext


def _match(op, n: int) -> bool:
    if op.name not in ("torch.aten.mm", "torch.aten.bmm"):
        return False
    a, b = vtensor(op.operands[0]), vtensor(op.operands[1])
    return a is not None and b is not None and a[0][-1] == n and b[0][-2] == n


def _rewrite(op) -> None:
    a, b = op.operands[0], op.operands[1]
    shape, elem = vtensor(op.result)
    k = vtensor(a)[0][-1]
    build = Builder(op)
    rank = len(shape)
    lhs = build.unsqueeze(a, rank)                          # [..., M, n, 1]
    rhs = build.unsqueeze(b, rank - 2)                      # [..., 1, n, N]
    product = build.aten("mul.Tensor", [lhs, rhs], [*shape[:-1], k, shape[-1]], elem)
    total = build.aten("sum.dim_IntList", [product, build.ints([rank - 1]), build.bool(False), build.none()],
                       shape, elem)
    op.result.replace_all_uses_with(total)
    op.erase()


class AltUpFusion(Pass):
    """AltUp coefficient matmuls (contraction over the stream count) as broadcast-multiply-reduce."""

    name = "altup-fusion"

    def run(self, module, ctx: PassContext) -> dict[str, int]:
        n = ctx.config.altup_num_inputs
        sites = [op for op in ops(module) if _match(op, n)]
        for op in sites:
            _rewrite(op)
        return {"matched": len(sites), "rewritten": len(sites)}
