"""IREE's CUDA backend: NVIDIA GPUs by compute capability (`--cuda-arch sm_80|sm_89|sm_90...`).

The module carries PTX, which the CUDA driver compiles for the GPU at load time.
"""

from .described import device_target_flag
from .supports import Supports

NAME = "cuda"
DRIVER = "cuda"
DESCRIPTION = "IREE cuda: NVIDIA GPUs (PTX for one compute capability and newer)"
ARCH_OPTION = "--cuda-arch"
DEFAULT_ARCH = "sm_80"
ARCHS = ("sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_120")
SUPPORTS = Supports(dtypes=("float32", "float16", "bfloat16"), int4_generic="all", attention="decomposed (matmul + softmax)")


def accepts(arch: str) -> bool:
    return arch in ARCHS


def known_archs() -> tuple[str, ...]:
    return ARCHS


def compile_flags(arch: str = DEFAULT_ARCH, quant: str = "none") -> list[str]:
    """The same flags with or without int4 weights."""
    if arch == "sm_90":
        return [_hopper()]
    return ["--iree-hal-target-device=cuda", f"--iree-cuda-target={arch}"]


def _hopper() -> str:
    # IREE 3.13 knows no Hopper: `--iree-cuda-target=sm_90` fails with "missing GPU target in
    # #hal.executable.target". Described here as IREE describes Ampere (IREE has no wgmma intrinsics to
    # add), with Hopper's 227 KiB of shared memory per block and PTX ISA 7.8, the first with sm_90.
    return device_target_flag(
        "cuda", "cuda", "cuda-nvptx-fb", arch="sm_90", features="+ptx78",
        compute="fp64|fp32|fp16|int64|int32|int16|int8", storage="b64|b32|b16|b8", subgroup="shuffle|arithmetic",
        dot="dp4xi8toi32", mma=("NV_MMA_SYNC_F32_16x8x16_F16", "NV_MMA_SYNC_F16_16x8x16_F16",
                                "NV_MMA_SYNC_F32_16x8x16_BF16", "NV_WMMA_F32_16x16x16_F16", "NV_WMMA_F16_16x16x16_F16"),
        subgroup_size_choices=[32], max_workgroup_sizes=[1024, 1024, 1024], max_thread_count_per_workgroup=1024,
        max_workgroup_memory_bytes=227 * 1024, max_workgroup_counts=[2147483647, 65535, 65535])
