"""Random checkpoints with real shapes (g3n-bench's weights) and the row-block safetensors writer under them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from g3n_compile.checkpoint import random_weights as random_checkpoint
from g3n_compile.checkpoint import Checkpoint, load_text_model
from g3n_compile.model.config import E2B, E4B
from g3n_compile.checkpoint.safetensors import SafetensorsFile, write_safetensors
from g3n_compile.checkpoint.tiny_random import CONFIG


def test_real_shapes_match_the_published_sizes():
    # Text parameters (PLE table included) as transformers counts them for E2B/E4B, plus the k/v projections and k norms
    # the Hub files carry for the KV-shared layers.
    shared = lambda cfg: cfg.num_kv_shared_layers * (2 * 512 * 2048 + 256)
    for cfg, params in ((E2B, 4_435_182_688), (E4B, 6_835_235_568)):
        shapes = random_checkpoint.tensor_shapes(cfg)
        assert sum(math.prod(s) for s in shapes.values()) == params + shared(cfg)
        assert shapes["model.language_model.embed_tokens_per_layer.weight"] == (262_144, cfg.num_hidden_layers * 256)


def test_random_checkpoint_loads_and_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(random_checkpoint, "SHARD_BYTES", 200_000)  # several shards
    monkeypatch.setattr(random_checkpoint, "BLOCK_ELEMENTS", 5_000)  # tensors written in many row blocks
    a = random_checkpoint.write_random_checkpoint(CONFIG, tmp_path / "a", log=lambda _: None)
    b = random_checkpoint.write_random_checkpoint(CONFIG, tmp_path / "b", log=lambda _: None)
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) > 2
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in shards)

    ckpt = Checkpoint(a)
    assert ckpt.text_prefix() == "model.language_model." and ckpt.text_dtype() == torch.bfloat16
    assert json.loads((a / "config.json").read_text())["architectures"] == ["Gemma3nForConditionalGeneration"]
    model = load_text_model(a, torch.bfloat16)  # validates names and shapes (KV-shared k/v skipped)
    linear = model.layers[0].mlp.gate_proj.weight.float()
    norm = model.layers[0].input_layernorm.weight.float()
    assert linear.std().item() == pytest.approx(0.02, rel=0.05) and abs(linear.mean().item()) < 2e-3
    assert norm.mean().item() == pytest.approx(1.0, abs=0.02)
    logits = model(torch.tensor([[2, 40, 7]]))
    assert torch.isfinite(logits).all()


def test_write_safetensors_takes_row_blocks(tmp_path):
    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    specs = {"a": (torch.float32, (6, 4)), "s": (torch.float32, ())}
    write_safetensors(tmp_path / "x.safetensors", specs,
                      lambda n: iter([full[:2], full[2:5], full[5:]]) if n == "a" else torch.tensor(3.0))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert torch.equal(f.tensor("a"), full) and f.tensor("s").item() == 3.0
    with pytest.raises(ValueError, match="produced 5 rows"):
        write_safetensors(tmp_path / "y.safetensors", {"a": specs["a"]}, lambda n: iter([full[:2], full[2:5]]))
    with pytest.raises(ValueError, match=r"produced torch.float32 \[2, 3\]"):
        write_safetensors(tmp_path / "y.safetensors", {"a": specs["a"]}, lambda n: iter([full[:2, :3]]))
