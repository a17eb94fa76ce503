"""IREE's llvm-cpu backend for the host CPU."""

NAME = "cpu"
DRIVER = "local-task"


def compile_flags(cpu: str = "host") -> list[str]:
    return [
        "--iree-hal-target-device=local",
        "--iree-hal-local-target-device-backends=llvm-cpu",
        f"--iree-llvmcpu-target-cpu={cpu}",
        # Pack weights once (in an initializer) for data-tiled matmuls: iree-cpu-microbench.md.
        "--iree-opt-data-tiling",
    ]
