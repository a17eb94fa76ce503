"""IREE's Vulkan (SPIR-V) backend: GPUs through their Vulkan driver, or Mesa's llvmpipe software device.

Never IREE's default Vulkan target (`vp_android_baseline_2022`): it declares 32-bit storage and
arithmetic only, so 8-bit inputs (int4 codes packed in u8) are read wrongly (every 4th byte), f16 gives NaN
and the model's int64 position arithmetic does not compile (`vector.broadcast` of i64 is
illegal). Replacing only its SPIR-V capabilities (`--iree-vulkan-target-features`) fixes the first two
but not the third. The default here, `llvmpipe`, describes the device llvmpipe really is; the other
names are IREE's own GPU descriptions.
"""

from .described import device_target_flag
from .supports import Supports

NAME = "vulkan"
DRIVER = "vulkan"
DESCRIPTION = "IREE vulkan-spirv: GPUs through Vulkan; llvmpipe (Mesa's CPU device) runs it anywhere"
ARCH_OPTION = "--vulkan-target"
DEFAULT_ARCH = "llvmpipe"
ARCHS = ("llvmpipe", "rdna3", "rdna2", "valhall", "ampere", "turing", "adreno")
# int4-pack's dequantize + grouped contraction compiles for prefill as well as decode here, for llvmpipe and IREE's GPU
# names alike, and matches the CPU module on llvmpipe.
SUPPORTS = Supports(dtypes=("float32", "float16", "bfloat16"), int4_generic="all", attention="decomposed (matmul + softmax)",
                    channel_sums_by_matmul=True,
                    # IREE 3.13's SPIR-V code for an elementwise dispatch that writes into a zero-padded buffer at
                    # an offset that is not a multiple of 4 (a 5x5 depthwise conv's pad of 2 at an even width)
                    # rounds its vector-of-4 stores down: every row lands 2 columns left. Fusing the padding into
                    # the consumer (the conv reads the pad itself) leaves no such write. Vision only: the CPU
                    # compile of this flag fails, and nothing else was checked with it.
                    encoder_flags={"vision": ("--iree-dispatch-creation-enable-fuse-padding-into-linalg-consumer-ops",)})


def accepts(arch: str) -> bool:
    return arch in ARCHS


def known_archs() -> tuple[str, ...]:
    return ARCHS


def compile_flags(arch: str = DEFAULT_ARCH, quant: str = "none") -> list[str]:
    """The same flags with or without int4 weights."""
    if arch == "llvmpipe":
        return [_llvmpipe()]
    return ["--iree-hal-target-device=vulkan", f"--iree-vulkan-target={arch}"]


def _llvmpipe() -> str:
    # Mesa 22.3 llvmpipe as its Vulkan driver reports it: shaderInt8/Int16/Int64/Float16, 8- and 16-bit
    # storage buffers, subgroups of 8 with arithmetic and shuffle, 1024 invocations per workgroup.
    return device_target_flag(
        "vulkan", "vulkan-spirv", "vulkan-spirv-fb", arch="llvmpipe", features="spirv:v1.3,cap:Shader",
        compute="fp32|fp16|int64|int32|int16|int8", storage="b64|b32|b16|b8", subgroup="shuffle|arithmetic",
        dot="none", mma=(), subgroup_size_choices=[8], max_workgroup_sizes=[1024, 1024, 1024],
        max_thread_count_per_workgroup=1024, max_workgroup_memory_bytes=32 * 1024,
        max_workgroup_counts=[65535, 65535, 65535])
