"""IREE's llvm-cpu backend: code for the host CPU, or for a named LLVM CPU (`--cpu-features`)."""

import functools
import subprocess
import tempfile
from pathlib import Path

from iree.compiler.tools.binaries import find_tool

from .int4_kernel import KERNEL
from .supports import Supports

NAME = "cpu"
DRIVER = "local-task"
DESCRIPTION = "IREE llvm-cpu: x86-64/aarch64 code, multithreaded on the host"
ARCH_OPTION = "--cpu-features"
DEFAULT_ARCH = "host"
# Examples: any CPU name LLVM knows for the host's architecture is accepted (`known_cpus`).
ARCHS = ("host", "generic", "x86-64-v2", "x86-64-v3", "x86-64-v4", "znver4", "sapphirerapids")
SUPPORTS = Supports(dtypes=("float32", "float16", "bfloat16"), int4_generic="all", attention="decomposed (matmul + softmax)",
                    int4_kernel=KERNEL)


def accepts(arch: str) -> bool:
    """`host`, or a CPU name LLVM knows for the host's architecture. Checked before any work: iree-compile
    itself only warns about an unknown name, ignores it and then fails (or builds for a baseline CPU)."""
    return arch == "host" or arch in known_cpus()


def known_archs() -> tuple[str, ...]:
    return ("host", *sorted(known_cpus()))


@functools.cache
def known_cpus() -> frozenset[str]:
    """The CPU names iree-compile's LLVM lists for the host's architecture (`--iree-llvmcpu-target-cpu=help`)."""
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.mlir"
        empty.write_text("module {}")
        listing = subprocess.run([find_tool("iree-compile"), "--iree-hal-target-device=local",
                                  "--iree-hal-local-target-device-backends=llvm-cpu",
                                  "--iree-llvmcpu-target-cpu=help", str(empty), "-o", str(Path(tmp) / "x")],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120).stdout
    section = listing.partition("Available CPUs for this target:")[2].partition("Available features")[0]
    names = frozenset(line.split()[0] for line in section.splitlines() if " - Select the " in line)
    if not names:
        raise RuntimeError(f"iree-compile did not list its CPUs (output began: {listing[:200]!r})")
    return names


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
    # Data tiling from GlobalOptimization, not `--iree-opt-data-tiling`: in IREE 3.13 that flag picks the
    # DispatchCreation path, whose encodings reach the matmuls' fused elementwise consumers, and two of its
    # codegen bugs stop modules g3n exports (issue 18; minimal dispatches in tests/test_cpu_targets.py):
    # - an i1 operand of the consumer is packed with an i1 padding value into its i8 storage: prefill's
    #   attention mask before the softmax when each KV head has one query head ("'linalg.pack' op expected
    #   padding_value has 'i8' but got: 'i1'", "failed to configure executables"; with a key count that
    #   needs no padding, "'iree_codegen.load_from_buffer' op ... element types must match"), on every CPU;
    # - a consumer with two results (the audio conformer's residual sum and its clamp, after a 750-row
    #   matmul) gets an unpack tiled to whole rows of outer tiles, vector<1x376x16xf32> (24 KB) at AVX2's
    #   8x8 tiles: over the limit of 512 native vectors (16 KB at 32 bytes; 8 KB for SSE2), "One or more
    #   operations with large vector sizes", so the audio encoder failed without AVX-512 (32 KB allowed).
    # The GlobalOptimization path packs weights in initializers too and runs the same mmt4d kernels (decode
    # and prefill measured at the same speed on this host).
    return flags + ["--iree-global-opt-data-tiling"]
