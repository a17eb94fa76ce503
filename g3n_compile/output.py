"""The output folder, written atomically.

A compile writes every new file into a hidden sibling folder (`.NAME.partial-XXXX`, made before the long
steps, so an unwritable `-o` fails at once) and moves them into the folder only when all of them are
complete: a failed, interrupted or mistyped compile leaves the folder exactly as it was, and a process that
has the folder loaded keeps the files it opened (`os.replace` gives the new file a new inode; the old one
lives on under the reader's memory map). The manifest moves in last, so a reader sees the old build or the
new one; files of the old build that the new manifest no longer names are removed after it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from runtime.abi import MANIFEST
from runtime.errors import UserError


class OutputFolderError(UserError, OSError):
    """`-o` names something g3n-compile cannot write a folder into; the message says what."""


class StagedFolder:
    """`with StagedFolder(out) as stage:` write into `stage.path`, then `stage.commit(...)`; leaving the block
    without a commit (an error, Ctrl-C) removes the staged files and leaves `out` untouched."""

    def __init__(self, out: Path):
        """`out` has passed `check_output_folder` (the driver checks it before the export)."""
        self.out = Path(out)
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.resolve().name}.partial-",
                                              dir=self.out.resolve().parent))
        except OSError as e:
            raise OutputFolderError(f"-o {self.out}: cannot write next to it ({e.strerror})") from None

    def __enter__(self) -> "StagedFolder":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, stale: list[str] = ()) -> None:
        """Move the staged files into the folder (the manifest last), then remove `stale` files there."""
        self.out.mkdir(exist_ok=True)
        mode = 0o666 & ~_umask()  # as any other file the user creates (IREE writes its archive 0640)
        staged = sorted(self.path.iterdir(), key=lambda p: (p.name == MANIFEST, p.name))
        for path in staged:
            os.chmod(path, mode)
            os.replace(path, self.out / path.name)
        for name in stale:
            (self.out / name).unlink(missing_ok=True)


def check_output_folder(out: Path) -> None:
    """`out` is a folder or nothing yet, not under a file, and a folder g3n-compile can write into."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"-o {out}: is a file, not a folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise OutputFolderError(f"-o {out}: {existing} is a file, so no folder can be made under it")
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputFolderError(f"-o {out}: cannot create its parent folder ({e.strerror})") from None
    for folder in {out.absolute().parent, *([out.absolute()] if out.is_dir() else [])}:
        try:  # a real write: permission bits say nothing for root, or on a read-only mount
            os.rmdir(tempfile.mkdtemp(prefix=".g3n-write-test-", dir=folder))
        except OSError as e:
            raise OutputFolderError(f"-o {out}: cannot write into {folder} ({e.strerror})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
