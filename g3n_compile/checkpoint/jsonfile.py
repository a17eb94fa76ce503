"""JSON as a checkpoint holds it (config.json, the shard index, tokenizer and preprocessor configs, safetensors
headers), read strictly: the size is checked before anything is read, and a key given twice is an error (json
keeps the last one silently, so two readers of the same file could disagree on what it says)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The Hub's largest small JSON file (the E4B shard index) is about 100 KB; anything near this bound is not a config.
MAX_JSON_BYTES = 64 * 1024 * 1024


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"key {key!r} appears twice")
        obj[key] = value
    return obj


def parse_json(data: bytes | str) -> Any:
    """The parsed document; ValueError (one line) if it is not valid, strict JSON. json's own errors, a key given
    twice, an integer of over 4300 digits and bytes that are not UTF-8 all are ValueErrors already."""
    try:
        return json.loads(data, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """`path` parsed by `parse_json`; ValueError (one line, without the path) if it is too large or invalid."""
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{size} bytes, more than the {limit} a file of this kind can be")
    return parse_json(path.read_bytes())
