"""Small C programs g3n-bench builds at run time (bandwidth.c, kernel_driver.c), cached in the temp folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path


def build_c_program(name: str, source: Path, cc: str, flags: list[str], inputs: tuple[Path, ...] = ()) -> Path:
    """`source` compiled with `cc flags source inputs` into <temp>/<name>-<hash of all of it>, built once; raises
    CalledProcessError (its stderr kept) when the compiler fails."""
    digest = hashlib.sha256("\0".join([source.read_text(), cc, *flags]).encode())
    for path in inputs:
        digest.update(path.read_bytes())
    exe = Path(tempfile.gettempdir()) / f"{name}-{digest.hexdigest()[:12]}"
    if exe.is_file():
        return exe
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / name
        subprocess.run([cc, *flags, str(source), *map(str, inputs), "-o", str(built)], capture_output=True, text=True,
                       check=True)
        os.replace(built, exe)  # atomic: a concurrent build never leaves half a program
    return exe
