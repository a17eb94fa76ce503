"""g3n's int4 x int8 CPU matmul kernel as one unit: the C source (int4_matmul.c), its operand layouts (layout.py),
its build with the system C compiler (build.py) and the MLIR it is called with (mlir.py).

The int4-cpu-kernel pass reaches it only through `Int4Kernel`, which the CPU target declares
(`targets.cpu.SUPPORTS.int4_kernel`)."""

from __future__ import annotations

import torch

from . import layout, mlir
from .build import KernelBuildError, build_object, isa_for, symbol


class Int4Kernel:
    """What a pass needs to call the kernel: which CPUs and shapes it takes, its weight order, its MLIR."""

    group = layout.GROUP
    weight_suffix = ".q4_0"  # archive name of a weight in the kernel's order: W.q4_0 (its scales: int4-pack's)
    Error = KernelBuildError  # no C compiler, or it failed

    def isa(self, arch: str) -> str | None:
        """The variant for LLVM CPU `arch` (AVX-512 VNNI, AVX2 or scalar), None off x86-64."""
        return isa_for(arch)

    def takes(self, k: int) -> bool:
        return layout.takes(k)

    def weight_order(self, codes: torch.Tensor) -> torch.Tensor:
        """Signed codes int8 [N, K] (-8..7) -> the kernel's weight bytes, i8 [N, K/2]."""
        return layout.weight_order(codes)

    def function(self, name: str, m: int, k: int, n: int, elem: str) -> str:
        """Private function `name`(x [M, K] elem, weights i8 [N, K/2], scales f16 [N, K/32]) -> [M, N] elem."""
        return mlir.quantize_and_call(name, mlir.export_name(m, k, n), m, k, n, elem)

    def executable(self, isa: str, shapes: list[tuple[int, int, int]]) -> str:
        """The `stream.executable` the functions dispatch, for these (M, K, N), carrying the `isa` variant."""
        return mlir.executable(symbol(isa), build_object(isa), shapes)


KERNEL = Int4Kernel()
