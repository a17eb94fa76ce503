"""What `--model` / `load_model` accept: a checkpoint folder, or a built-in name."""

from __future__ import annotations

import os
from pathlib import Path

from ..model.config import PRESETS
from .folder import CheckpointError
from .tiny_random import NAME as TINY_RANDOM, ensure_tiny_random


def cache_root() -> Path:
    """Where g3n keeps generated checkpoints: $G3N_CACHE, else ~/.cache/g3n."""
    return Path(os.environ.get("G3N_CACHE") or Path.home() / ".cache" / "g3n")


def resolve_checkpoint(path_or_preset: str | os.PathLike) -> Path:
    name = str(path_or_preset)
    if name == TINY_RANDOM:
        return ensure_tiny_random(cache_root())
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name in PRESETS:
        raise CheckpointError(f"'{name}' names the real {name.upper()} shapes, but g3n ships no {name.upper()} weights: "
                              f"pass the folder of a downloaded checkpoint (Hugging Face layout)")
    raise CheckpointError(f"{name}: no such checkpoint folder (or use the built-in '{TINY_RANDOM}')")
