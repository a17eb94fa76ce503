"""IREE's llvm-cpu backend: code for the host CPU, or for a named LLVM CPU (`--cpu-features`)."""

from .int4_kernel import KERNEL
from .supports import Supports

NAME = "cpu"
DRIVER = "local-task"
DESCRIPTION = "IREE llvm-cpu: x86-64/aarch64 code, multithreaded on the host"
ARCH_OPTION = "--cpu-features"
DEFAULT_ARCH = "host"
# Examples: any CPU name LLVM knows for the host's architecture is accepted (iree-compile lists them).
ARCHS = ("host", "generic", "x86-64-v2", "x86-64-v3", "x86-64-v4", "znver4", "sapphirerapids")
SUPPORTS = Supports(dtypes=("float32", "float16", "bfloat16"), int4_generic="all", attention="decomposed (matmul + softmax)",
                    int4_kernel=KERNEL)


def accepts(arch: str) -> bool:
    """Any LLVM CPU name (letters, digits, - and _); iree-compile rejects unknown ones with the list."""
    return bool(arch) and arch.replace("-", "").replace("_", "").isalnum()


def compile_flags(arch: str = DEFAULT_ARCH, quant: str = "none") -> list[str]:
    flags = [
        "--iree-hal-target-device=local",
        "--iree-hal-local-target-device-backends=llvm-cpu",
        f"--iree-llvmcpu-target-cpu={arch}",  # "host": the features of the CPU compiling it
    ]
    if quant == "int4":
        # IREE 3.13 cannot data-tile the grouped int4 contraction (vectors over its limit); of the flags
        # measured on its int4 matvec, these two made it fastest.
        return flags + ["--iree-dispatch-creation-block-matmul-producer-fusion=false",
                        "--iree-llvmcpu-reassociate-fp-reductions=true"]
    # Pack weights once (in an initializer) for data-tiled matmuls, IREE's fastest f32/bf16 matvec and matmul.
    return flags + ["--iree-opt-data-tiling"]
