"""Random-weight checkpoints with the real E2B/E4B shapes, for benchmarks (speed does not depend on the values).

Written once into the cache (`<cache root>/random-<preset>-v<VERSION>`) in the Hub's multimodal layout:
bf16 safetensors shards of about 2 GB with an index, `model.language_model.*` names (including the k/v
projections the Hub files carry for KV-shared layers), and config.json with the text config under
`text_config`. Text weights only: no audio or vision tower, no tokenizer (benchmarks feed token ids).

Each tensor comes from its own seeded generator at a realistic scale (linears and embeddings N(0, 0.02),
norm weights 1 + N(0, 0.05)), made in row blocks and streamed to disk: writing E4B (14 GB) holds one
block in memory, never a tensor or the model.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..model.config import PRESETS, TextConfig
from ..model.text import Gemma3nTextModel
from .safetensors import write_safetensors

VERSION = 1  # bump when the values, names or config change: the cache folder is keyed on it
PREFIX = "model.language_model."
SHARD_BYTES = 2 << 30
BLOCK_ELEMENTS = 1 << 24  # rows generated at a time: 32 MB of bf16


def tensor_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every text tensor of a Hub checkpoint with config `cfg`."""
    with torch.device("meta"):
        shapes = {PREFIX + n: tuple(p.shape) for n, p in Gemma3nTextModel(cfg).named_parameters()}
    kv = (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size)
    for i in range(cfg.first_kv_shared_layer, cfg.num_hidden_layers):
        layer = f"{PREFIX}layers.{i}.self_attn."
        shapes.update({layer + "k_proj.weight": kv, layer + "v_proj.weight": kv, layer + "k_norm.weight": (cfg.head_dim,)})
    return shapes


def _blocks(shape: tuple[int, ...], seed: int):
    """The tensor as bf16 row blocks: norm weights (1-D) near 1, everything else N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        yield (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        return
    rows = max(1, BLOCK_ELEMENTS // math.prod(shape[1:]))
    for start in range(0, shape[0], rows):
        block = (min(rows, shape[0] - start),) + shape[1:]
        yield torch.empty(block, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)


def _shards(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most SHARD_BYTES (a bigger tensor gets its own)."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_random_checkpoint(cfg: TextConfig, folder: Path, log=print) -> Path:
    """Write a random bf16 checkpoint with config `cfg` into `folder` (created), logging progress."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(cfg)
    seeds = {name: i for i, name in enumerate(shapes)}
    total = 2 * sum(math.prod(s) for s in shapes.values())
    shards = _shards(shapes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written, t0 = 0, time.perf_counter()

    def produce(name: str):
        nonlocal written
        for block in _blocks(shapes[name], seeds[name]):
            yield block
            before, written = written, written + 2 * block.numel()
            if written // (1 << 30) > before // (1 << 30) or written == total:
                log(f"  {written / 1e9:5.1f} / {total / 1e9:.1f} GB written ({time.perf_counter() - t0:.0f}s)")

    for file_name, group in zip(names, shards):
        write_safetensors(folder / file_name, {n: (torch.bfloat16, shapes[n]) for n in group}, produce,
                          metadata={"format": "pt"})
    weight_map = {n: f for f, group in zip(names, shards) for n in group}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    text = {**cfg.to_hf_dict(), "torch_dtype": "bfloat16"}
    del text["architectures"]
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n", "torch_dtype": "bfloat16",
        "text_config": text}, indent=2))
    return folder


def ensure_random_checkpoint(preset: str, cache_root: Path, log=print) -> Path:
    """The cached random checkpoint of preset `preset` ("e2b", "e4b"), written on first use (atomically)."""
    cfg = PRESETS[preset]
    folder = Path(cache_root) / f"random-{preset}-v{VERSION}"
    if (folder / "config.json").is_file():
        return folder
    log(f"g3n-bench: writing random {preset.upper()} weights to {folder} (once; later runs reuse them)")
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".random-{preset}-", dir=cache_root))
    try:
        write_random_checkpoint(cfg, tmp, log=log)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
