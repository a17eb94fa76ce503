"""transformers as the numerical reference: random-weight Gemma 3n models saved as real checkpoints.

Every parameter is re-randomised (norm weights around 1, q/k norms around head_dim^-1/4,
`altup.correct_output_scale` non-zero, linears scaled by fan-in) because transformers' default init zeroes whole paths and would hide bugs.

`branch_scale` scales the norms whose output is added to the residual stream (post-attention,
post-MLP, post-per-layer-input, post-LAuReL). At 1 every branch adds as much as the whole stream
holds, and a random 15-layer model is chaotic: 1 % multiplicative weight noise moves the
E2B-proportioned model's logits to cosine 0.954. Trained residual networks are not like that; at 0.1
the same noise leaves cosine 0.9999. Quantisation quality is measured on such a model (it says how much
a weight error costs, not how chaotic random weights are); exactness tests use 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from g3n_compile.model.config import FULL, SLIDING, TextConfig
from g3n_compile.checkpoint.safetensors import write_safetensors


def hf_text_config(cfg: TextConfig):
    from transformers import Gemma3nTextConfig

    d = cfg.to_hf_dict()
    for k in ("architectures", "model_type"):
        d.pop(k)
    return Gemma3nTextConfig(**d)


POST_NORMS = ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight",
              "post_per_layer_input_norm.weight", "post_laurel_norm.weight")


def rerandomise(model: torch.nn.Module, seed: int, branch_scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("correct_output_scale"):
                p.copy_(0.5 * noise)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                # Attention scale is 1.0: trained q/k norms play the role of 1/sqrt(head_dim). Norms near 1
                # would make every softmax near one-hot and the random model too ill-conditioned to compare
                # at 1e-4 (a 1e-7 relative weight change then moves its logits by 1.5e-4).
                p.copy_((1.0 + 0.1 * noise) * p.shape[0] ** -0.25)
            elif p.dim() == 1:  # RMSNorm weights (multiplied as w, not 1 + w)
                p.copy_((1.0 + 0.1 * noise) * (branch_scale if name.endswith(POST_NORMS) else 1.0))
            else:
                p.copy_(noise * (0.5 / p.shape[1] ** 0.5))


def hf_model(cfg: TextConfig, seed: int = 0, branch_scale: float = 1.0):
    from transformers import Gemma3nForCausalLM

    hf_cfg = hf_text_config(cfg)
    hf_cfg._attn_implementation = "eager"
    model = Gemma3nForCausalLM(hf_cfg).eval()
    rerandomise(model, seed, branch_scale)
    return model


def save_checkpoint(model, cfg: TextConfig, folder: Path, layout: str = "text", shards: int = 1,
                    dtype: torch.dtype = torch.float32, with_lm_head: bool = False,
                    with_shared_kv: bool = True) -> Path:
    """Write `model` (a transformers Gemma3nForCausalLM) as a Hub checkpoint.

    layout "text": `model.*` keys, text config; "multimodal": `model.language_model.*` keys, config
    nested under `text_config` as the Hub's Gemma3nForConditionalGeneration files are.
    `with_shared_kv` adds the k/v tensors the Hub files carry for KV-shared layers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "model.language_model." if layout == "multimodal" else "model."
    tensors = {prefix + k[len("model."):]: v for k, v in model.state_dict().items() if k.startswith("model.")}
    if with_lm_head:
        tensors["lm_head.weight"] = model.state_dict()["model.embed_tokens.weight"]
    if with_shared_kv:
        g = torch.Generator().manual_seed(1234)
        for i in range(cfg.first_kv_shared_layer, cfg.num_hidden_layers):
            a = f"{prefix}layers.{i}.self_attn."
            kv_out = cfg.num_key_value_heads * cfg.head_dim
            tensors[a + "k_proj.weight"] = torch.randn(kv_out, cfg.hidden_size, generator=g)
            tensors[a + "v_proj.weight"] = torch.randn(kv_out, cfg.hidden_size, generator=g)
            tensors[a + "k_norm.weight"] = torch.randn(cfg.head_dim, generator=g)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}

    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    if shards == 1:
        files = {"model.safetensors": groups[0]}
    else:
        files = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": grp for i, grp in enumerate(groups)}
    for file_name, grp in files.items():
        write_safetensors(folder / file_name, {n: (tensors[n].dtype, tuple(tensors[n].shape)) for n in grp},
                          lambda n: tensors[n], metadata={"format": "pt"})
    if shards > 1:
        weight_map = {n: f for f, grp in files.items() for n in grp}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    text = cfg.to_hf_dict()
    if layout == "multimodal":
        text["model_type"] = "gemma3n_text"
        text.pop("architectures")
        config = {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n",
                  "text_config": text, "audio_config": {}, "vision_config": {}}
    else:
        config = text
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# ---- the configs the equivalence tests run on ------------------------------------------------------

def _cfg(**kw) -> TextConfig:
    base = dict(vocab_size=96, vocab_size_per_layer_input=80, hidden_size=16, hidden_size_per_layer_input=8,
                intermediate_size=(21,) * 4, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                head_dim=8, layer_types=(SLIDING, FULL, SLIDING, FULL), sliding_window=8,
                rope_theta_full=1_000_000.0, rope_theta_sliding=10_000.0, rms_norm_eps=1e-6,
                final_logit_softcapping=30.0, altup_num_inputs=2, altup_active_idx=0, altup_correct_scale=True,
                altup_coef_clip=120.0, laurel_rank=4, num_kv_shared_layers=2,
                activation_sparsity_pattern=(0.95, 0.95, 0.0, 0.0), max_position_embeddings=256)
    base.update(kw)
    return TextConfig(**base)


CONFIGS = {
    # transformers' own test config (tests/models/gemma3n): hidden 16, 2 AltUp inputs, 4 layers, 2 KV-shared.
    "hf-test": _cfg(),
    # per-layer MLP widths, 4 AltUp streams
    "per-layer-widths": _cfg(intermediate_size=(24, 40, 16, 32), altup_num_inputs=4, hidden_size=32,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16),
    # E2B proportions at reduced width: 15 layers, 4:1 sliding/full, one third KV-shared, sparse first layers.
    "e2b-proportioned": _cfg(vocab_size=160, vocab_size_per_layer_input=128, hidden_size=64,
                             hidden_size_per_layer_input=16, intermediate_size=(256,) * 15, num_hidden_layers=15,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                             layer_types=tuple(FULL if (i + 1) % 5 == 0 else SLIDING for i in range(15)),
                             sliding_window=32, altup_num_inputs=4, laurel_rank=8, num_kv_shared_layers=5,
                             activation_sparsity_pattern=(0.95,) * 5 + (0.0,) * 10),
    # a window of 5 tokens: the ring buffer wraps many times
    "window-5": _cfg(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     intermediate_size=(48,) * 6, num_hidden_layers=6,
                     layer_types=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL), sliding_window=5,
                     altup_num_inputs=4, num_kv_shared_layers=3,
                     activation_sparsity_pattern=(0.95, 0.0, 0.95, 0.0, 0.0, 0.0)),
}
