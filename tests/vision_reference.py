"""Random-weight Gemma 3n vision models for the tests, saved as real multimodal checkpoints.

Every parameter is drawn afresh: timm's init (layer scales of 1e-5, unit norms) would make most blocks
near-identities and hide bugs in them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from g3n_compile.checkpoint.safetensors import write_safetensors
from g3n_compile.model.config import TextConfig
from g3n_compile.model.vision import Gemma3nVisionModel
from g3n_compile.model.vision_config import TINY_MOBILENETV5, VisionConfig, custom_config

# The model's parameter names (the checkpoint's, `model.` stripped).
TOWER_PREFIX, EMBEDDER_PREFIX = "vision_tower.timm_model.", "embed_vision."


def tiny_config(text_hidden_size: int, hidden_size: int = 64) -> VisionConfig:
    return custom_config(TINY_MOBILENETV5, hidden_size, text_hidden_size, vocab_offset=80, vocab_size=8)


def rerandomise(model: Gemma3nVisionModel, seed: int) -> Gemma3nVisionModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("layer_scale.gamma"):
                p.copy_(0.5 + 0.2 * noise)
            elif p.dim() == 1 and name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif p.dim() == 1:  # norm weights
                p.copy_(1.0 + 0.1 * noise)
            elif name == EMBEDDER_PREFIX + "embedding.weight":
                p.copy_(noise)
            else:  # conv [out, in/groups, k, k] and linear [out, in] weights, scaled by fan-in
                p.copy_(noise * p[0].numel() ** -0.5)
    return model


def random_model(cfg: VisionConfig, seed: int = 0) -> Gemma3nVisionModel:
    return rerandomise(Gemma3nVisionModel(cfg).eval(), seed)


def tower_weights(model: Gemma3nVisionModel) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm's own names."""
    return {n[len(TOWER_PREFIX):]: p for n, p in model.named_parameters() if n.startswith(TOWER_PREFIX)}


def save_checkpoint(model: Gemma3nVisionModel, text_cfg: TextConfig, folder: Path,
                    dtype: torch.dtype = torch.float32) -> Path:
    """A multimodal checkpoint folder holding the vision tower and embedder (`model.*` names) and a
    config.json with text and vision configs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"model." + n: p.detach().to(dtype).contiguous() for n, p in model.named_parameters()}
    write_safetensors(folder / "model.safetensors", {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()},
                      lambda n: tensors[n], metadata={"format": "pt"})
    text = text_cfg.to_hf_dict()
    text.pop("architectures")
    config = {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n", "text_config": text,
              "audio_config": {}, **model.config.to_hf_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
