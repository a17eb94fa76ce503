"""The decode roofline: the measured streaming bandwidth / the bytes one decode token must read = every weight the
engine holds except the gathered PLE table (the tied embedding counted once, as the LM head) + the K/V entries of
the S cached positions each layer attends to, in the engine's cache dtype."""

from __future__ import annotations

from pathlib import Path

from runtime.abi import Manifest
from runtime.archive import ArchiveReader

# The encoders' archive names (the text model's never start so): not read by a decode step.
ENCODER_PARAMETER_PREFIXES = ("audio_tower.", "embed_audio.", "vision_tower.", "embed_vision.")


def archive_weight_bytes(out: Path) -> int:
    """Bytes of every parameter in the archive a decode step reads: all but the PLE table (gathered on the host)
    and the audio/vision encoders' weights and token table; with an int4 LM head, the embedding table it
    copies is only gathered from."""
    manifest = Manifest.read(out)
    entries = ArchiveReader(out / manifest.parameters.file).entries
    skip = {manifest.per_layer_rows.parameter, manifest.parameters.archive_id_entry}
    if manifest.multimodal_tokens:
        skip.add(manifest.multimodal_tokens.parameter)
    if {"embed_tokens.weight.int4", "embed_tokens.weight.q4_0"} & set(entries):  # generic / C-kernel layout
        skip.add("embed_tokens.weight")
    return sum(length for name, (_, length) in entries.items()
               if name not in skip and not name.startswith(ENCODER_PARAMETER_PREFIXES))


def kv_bytes_read(cfg, context: int, bytes_per_element: int) -> int:
    """K and V bytes one decode step at `context` must read: every layer attends to its KV source's
    cache, the last `sliding_window` positions for sliding layers, all of them for full ones."""
    per_position = 2 * cfg.num_key_value_heads * cfg.head_dim * bytes_per_element
    return sum(per_position * (min(context, cfg.sliding_window) if cfg.is_sliding(i) else context)
               for i in range(cfg.num_hidden_layers))


def add_roofline(row: dict, cfg, gb_per_s: float) -> None:
    for d in row.get("decode", []):
        d["bytes_per_token"] = row["weight_bytes"] + kv_bytes_read(cfg, d["context"], row["kv_bytes_per_element"])
        d["roofline_tokens_per_s"] = gb_per_s * 1e9 / d["bytes_per_token"]
        d["roofline_fraction"] = d["tokens_per_s"] / d["roofline_tokens_per_s"]
