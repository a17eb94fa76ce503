"""The int4 kernel's data layouts: the one description of how its operands are ordered (int4_matmul.c reads them
so, `weight_order` writes the weights, mlir.py's quantize dispatch writes the activations).

    y[m, n] = sum_g f16(ws[n, g]) * xd[m, g] * sum_{k in group g} (w[n, k] - 8) * xq[m, k]

Weights: 4-bit codes, GROUP = 32 per group (g = k / 32), one f16 scale per group, no zero point; stored unsigned
(code + 8), so the weights are vpdpbusd's u8 operand and the -8 applies once per group as -8 * sum(xq).
Activations: int8 with one f32 scale per group (llama.cpp's Q8_0), quantized by a dispatch before the kernel.
A 32-bit lane of a vector holds 4 consecutive k of ONE group, and the 16 lanes of a 64-byte vector hold 16
different groups, so `vpdpbusd` leaves each group's dot product in its own lane and the group scales apply with
one multiply per 16 groups (no horizontal sums). With G = K/32 groups per row, a row is cut into B superblocks
of S = min(G, SUPERBLOCK) groups (`takes` requires K % 512 == 0 or K < 512, so G % S == 0):
  w  u8 [N][B][4][S][4]: byte (b, c, s, i) holds code + 8 of k = 32(bS + s) + 4c + i in its low nibble and of
                         k + 16 in its high nibble;
  xq s8 [M][B][8][S][4]: element (b, j, s, i) is x at k = 32(bS + s) + 4j + i (j < 4 pairs with the low nibbles
                         of chunk c = j, j >= 4 with the high ones);
  ws f16 [N][G], xd f32 [M][G], y f32 [M][N]: natural order.
"""

from __future__ import annotations

import torch

GROUP = 32
SUPERBLOCK = 16  # groups per superblock: one 64-byte vector of 4-byte lanes
MAX_K = 32768  # MAX_GROUPS * GROUP in int4_matmul.c: the per-call group sums live on the stack
WORKGROUPS = 128  # most workgroups per matmul: enough to balance 2..16 workers, few enough to cost nothing


def takes(k: int) -> bool:
    """Whether the kernel computes a K-deep product (whole superblocks, or one partial one)."""
    return k % GROUP == 0 and (k % (GROUP * SUPERBLOCK) == 0 or k < GROUP * SUPERBLOCK) and k <= MAX_K


def superblock(k: int) -> int:
    return min(k // GROUP, SUPERBLOCK)


def weight_order(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes (int8 [N, K], -8..7) as the kernel reads them: i8 [N, K/2], [N][B][4][S][4] bytes."""
    n, k = codes.shape
    s = superblock(k)
    u = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(n, k // (GROUP * s), s, 2, 4, 4)  # [n, b, s, half, c, i]
    return (u[:, :, :, 0] | (u[:, :, :, 1] << 4)).permute(0, 1, 3, 2, 4).reshape(n, k // 2).view(torch.int8)


def rows_per_workgroup(n: int) -> int:
    """Rows per workgroup: a multiple of 16 giving at most WORKGROUPS of them."""
    return max(16, (-(-n // WORKGROUPS) + 15) // 16 * 16)
