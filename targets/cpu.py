"""IREE's llvm-cpu backend for the host CPU."""

NAME = "cpu"
DRIVER = "local-task"


def compile_flags(cpu: str = "host", quant: str = "none") -> list[str]:
    flags = [
        "--iree-hal-target-device=local",
        "--iree-hal-local-target-device-backends=llvm-cpu",
        f"--iree-llvmcpu-target-cpu={cpu}",
    ]
    if quant == "int4":
        # IREE 3.13 cannot data-tile the grouped int4 contraction (vectors over its limit); these two
        # flags are what makes its int4 matvec fastest (iree-cpu-microbench.md).
        return flags + ["--iree-dispatch-creation-block-matmul-producer-fusion=false",
                        "--iree-llvmcpu-reassociate-fp-reductions=true"]
    # Pack weights once (in an initializer) for data-tiled matmuls: iree-cpu-microbench.md.
    return flags + ["--iree-opt-data-tiling"]
