"""Building int4_matmul.c with the system C compiler, one variant per instruction set.

IREE links the object into the module's CPU executables (mlir.py); tests load the same source as a shared
library. Objects are cached by (source, compiler, flags) in $G3N_CACHE/kernels (default ~/.cache/g3n/kernels).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("int4_matmul.c")
ISAS = ("avx512vnni", "avx2", "scalar")  # best first
# The compiler macros an instruction set needs, and the flags that enable it.
REQUIRES = {"avx512vnni": ("__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512VNNI__", "__F16C__", "__FMA__"),
            "avx2": ("__AVX2__", "__FMA__", "__F16C__"), "scalar": ()}
ISA_FLAGS = {"avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"],
             "avx2": ["-mavx2", "-mfma", "-mf16c"], "scalar": []}
# An object IREE can link: position independent, no libc calls, no stack protector or unwind tables.
COMMON_FLAGS = ["-O3", "-std=c11", "-ffreestanding", "-fPIC", "-fno-stack-protector", "-fno-builtin",
                "-fno-tree-loop-distribute-patterns", "-fno-asynchronous-unwind-tables", "-fno-exceptions"]


class KernelBuildError(RuntimeError):
    """No C compiler, or it failed on the kernel source."""


def symbol(isa: str) -> str:
    return f"g3n_q4_matmul_{isa}"


def compiler() -> str:
    for name in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise KernelBuildError("no C compiler found (tried $CC, gcc, cc, clang): int4 on the CPU links g3n's int4 kernel, "
                           "built from C source at compile time. Install one (Debian/Ubuntu: apt install gcc), "
                           "or compile with --disable-pass int4-cpu-kernel to use IREE's generic int4 code.")


def isa_for(arch: str) -> str | None:
    """The best kernel variant for code compiled for LLVM CPU `arch` ("host": this machine), or None
    where none applies (not x86-64). A CPU name the C compiler does not know gets the scalar variant."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    march = {"host": "native", "generic": "x86-64"}.get(arch, arch)
    probe = subprocess.run([compiler(), f"-march={march}", "-dM", "-E", "-x", "c", os.devnull],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return "scalar"
    defined = {line.split()[1] for line in probe.stdout.splitlines() if line.startswith("#define ")}
    return next(isa for isa in ISAS if all(m in defined for m in REQUIRES[isa]))


def _build(isa: str, kind: str) -> Path:
    if isa not in ISAS:
        raise KernelBuildError(f"unknown int4 kernel variant {isa!r} (known: {', '.join(ISAS)})")
    cc = compiler()
    flags = COMMON_FLAGS + ISA_FLAGS[isa] + [f"-DG3N_ISA={isa}", f"-DG3N_ISA_{isa}"]
    flags += ["-shared"] if kind == "so" else ["-c"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, *flags]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("G3N_CACHE") or Path.home() / ".cache" / "g3n") / "kernels"
    out = cache / f"int4_matmul-{isa}-{key}.{kind}"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
    if done.returncode != 0:
        raise KernelBuildError(f"{cc} failed on {SOURCE} ({isa}):\n{done.stderr.strip()}")
    tmp.replace(out)  # atomic: concurrent compiles never see a half-written object
    return out


def build_object(isa: str) -> Path:
    """The kernel as a relocatable object for IREE (`hal.executable.objects`)."""
    return _build(isa, "o")


def build_shared(isa: str) -> Path:
    """The kernel as a shared library (tests call it through ctypes)."""
    return _build(isa, "so")


def host_isas() -> list[str]:
    """The variants this machine can run, best first."""
    best = isa_for("host")
    return list(ISAS[ISAS.index(best):]) if best else []
