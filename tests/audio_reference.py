"""transformers' audio tower and embedder as the numerical reference, saved as real multimodal checkpoints.

`save_multimodal_checkpoint` writes what a Hub `Gemma3nForConditionalGeneration` folder holds for text and
audio: config.json with `text_config`, `audio_config` and `audio_soft_tokens_per_image`, and one
safetensors file with `model.language_model.*`, `model.audio_tower.*` and `model.embed_audio.*`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from g3n_compile.model.audio_config import AudioConfig, tiny_audio_config
from g3n_compile.checkpoint.safetensors import write_safetensors
from reference import CONFIGS as TEXT_CONFIGS, hf_model as hf_text_model, rerandomise

TEXT = TEXT_CONFIGS["hf-test"]  # vocab 96, hidden 16: the audio ids are its last ones


def _audio(**kw) -> AudioConfig:
    return AudioConfig(**{"vocab_size": 8, "vocab_offset": TEXT.vocab_size - 8, "text_hidden_size": TEXT.hidden_size,
                          "text_vocab_size": TEXT.vocab_size, **kw})


CONFIGS = {
    # transformers' own audio-encoder test config (tests/models/gemma3n): 32 mel bins, chunks of 4.
    "hf-test": _audio(input_feat_size=32, hidden_size=32, conf_num_attention_heads=4, conf_num_hidden_layers=2,
                      sscp_conv_channel_size=(16, 8), conf_conv_kernel_size=3, conf_attention_chunk_size=4,
                      conf_attention_context_left=5),
    # the tiny-random audio tower: real features, attention geometry and kernels at small width
    "tiny-random": tiny_audio_config(TEXT.hidden_size, TEXT.vocab_size),
    # attention that also looks ahead, a stride-3 first conv with a taller kernel, reduction 3, 2 soft tokens
    "look-ahead": _audio(input_feat_size=24, hidden_size=48, conf_num_attention_heads=2, conf_num_hidden_layers=2,
                         sscp_conv_channel_size=(8, 4), sscp_conv_kernel_size=((5, 3), (3, 3)),
                         sscp_conv_stride_size=((3, 2), (2, 2)), conf_attention_chunk_size=5,
                         conf_attention_context_left=4, conf_attention_context_right=2, conf_reduction_factor=3,
                         conf_residual_weight=0.7, soft_tokens=40),
}


def hf_configs(cfg: AudioConfig):
    from transformers import Gemma3nAudioConfig

    from reference import hf_text_config

    fields = {k: v for k, v in cfg.to_hf_dict().items() if k != "model_type"}
    return Gemma3nAudioConfig(**fields), hf_text_config(TEXT)


def hf_audio(cfg: AudioConfig, seed: int = 0):
    """transformers' encoder and audio embedder for `cfg`, every weight re-randomised (per_dim_scale
    starts at zero and the norms at one in transformers' init)."""
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder, Gemma3nMultimodalEmbedder

    audio_cfg, text_cfg = hf_configs(cfg)
    encoder, embedder = Gemma3nAudioEncoder(audio_cfg).eval(), Gemma3nMultimodalEmbedder(audio_cfg, text_cfg).eval()
    rerandomise(encoder, seed)
    rerandomise(embedder, seed + 1)
    return encoder, embedder


def hf_soft_tokens(cfg: AudioConfig, encoder, embedder, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What transformers' Gemma3nModel scatters into the audio placeholders (modeling_gemma3n.py,
    Gemma3nModel.forward, "Merge text and audio"): embedded encoder outputs, masked ones and the rest up
    to `audio_soft_tokens_per_image` replaced by the hard embedding of the last vocabulary id."""
    out = encoder(features, ~mask)
    soft = embedder(inputs_embeds=out.last_hidden_state)
    padding = embedder(input_ids=torch.tensor([[cfg.text_vocab_size - 1]]))
    soft = torch.where(out.audio_mel_mask.unsqueeze(-1), padding, soft)
    extra = padding.expand(soft.shape[0], cfg.soft_tokens - soft.shape[1], soft.shape[2])
    return torch.cat([soft, extra], dim=1)


def save_multimodal_checkpoint(cfg: AudioConfig, encoder, embedder, folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = hf_text_model(TEXT, seed=5)
    tensors = {"model.language_model." + k[len("model."):]: v for k, v in text.state_dict().items()
               if k.startswith("model.")}  # lm_head is tied to the embedding
    tensors |= {"model.audio_tower." + k: v for k, v in encoder.state_dict().items()}
    tensors |= {"model.embed_audio." + k: v for k, v in embedder.state_dict().items()}
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    write_safetensors(folder / "model.safetensors", {n: (t.dtype, tuple(t.shape)) for n, t in sorted(tensors.items())},
                      lambda n: tensors[n], metadata={"format": "pt"})
    text_cfg = TEXT.to_hf_dict()
    text_cfg.pop("architectures")
    config = {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n",
              "text_config": text_cfg, "audio_config": hf_configs(cfg)[0].to_dict(), "vision_config": {},
              "audio_soft_tokens_per_image": cfg.soft_tokens}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
