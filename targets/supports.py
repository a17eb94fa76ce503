"""What a target can run, declared next to its flags so passes and `g3n-compile --list-targets` can ask."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Supports:
    dtypes: tuple[str, ...]  # weight dtypes its kernels read and compute correctly
    int4_generic: str  # where the generic-linalg int4 matmul (int4-pack's dequantize + grouped contraction) compiles: "all" M, or "matvec" (M=1)
    attention: str  # the attention form it runs
    encoders: tuple[str, ...] = ("audio", "vision")  # the towers whose encoders compile for it
    encoder_flags: dict | None = None  # encoder kind -> extra iree-compile flags for that encoder
    channel_sums_by_matmul: bool = False  # export the vision tower's channel norms as matmuls (model/vision.py)
    int4_kernel: object | None = None  # g3n's int4 x int8 C kernel (targets/int4_kernel), where the target links it

    def describe(self) -> str:
        return (f"dtypes {'/'.join(self.dtypes)}; int4 linalg form: {self.int4_generic}; "
                f"attention: {self.attention}; encoders: {', '.join(self.encoders) or 'none'}"
                + ("; int4 x int8 C kernel" if self.int4_kernel is not None else ""))
