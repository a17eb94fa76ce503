"""Gemma 3n text-decoder configuration: read from a Hugging Face `config.json`, validated field by field.

Both layouts the Hub uses are read: the multimodal `Gemma3nForConditionalGeneration` config (text fields
nested under `text_config`) and the text-only `Gemma3nForCausalLM` / `Gemma3nTextConfig`. Unknown keys
are ignored (Hub configs carry many generic ones); every key the model depends on is checked and a bad
value raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import UserError

SLIDING = "sliding_attention"
FULL = "full_attention"
MAX_LAYERS = 1000  # E4B has 35; a bound that keeps a corrupt count from allocating per-layer tuples


class ConfigError(UserError, ValueError):
    """A config.json that g3n cannot compile; the message names the field."""


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    vocab_size_per_layer_input: int
    hidden_size: int
    hidden_size_per_layer_input: int
    intermediate_size: tuple[int, ...]
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int
    rope_theta_full: float
    rope_theta_sliding: float
    rms_norm_eps: float
    final_logit_softcapping: float | None
    altup_num_inputs: int
    altup_active_idx: int
    altup_correct_scale: bool
    altup_coef_clip: float | None
    laurel_rank: int
    num_kv_shared_layers: int
    activation_sparsity_pattern: tuple[float, ...]
    max_position_embeddings: int
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: tuple[int, ...] = (1,)

    def __post_init__(self):
        _validate(self)

    # ---- derived structure -------------------------------------------------------------------------
    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source(self, layer: int) -> int:
        """The layer whose keys/values `layer` attends over: itself, or for the last
        `num_kv_shared_layers` layers the last earlier layer of the same type (as transformers does)."""
        first = self.first_kv_shared_layer
        if layer < first:
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(first) if self.layer_types[i] == kind)

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """Layers that own a KV cache, in order."""
        return tuple(range(self.first_kv_shared_layer))

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    # ---- (de)serialisation -------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "TextConfig":
        if not isinstance(raw, dict):
            raise ConfigError("config.json: expected a JSON object at the top level")
        scope = "config.json: "
        text = raw
        if "text_config" in raw:
            text, scope = raw["text_config"], "config.json: text_config."
            if not isinstance(text, dict):
                raise ConfigError(f"{scope[:-1]}: expected a JSON object")
        return _from_text_dict(text, scope)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "TextConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The text-only transformers `Gemma3nTextConfig` form."""
        return {
            "architectures": ["Gemma3nForCausalLM"],
            "model_type": "gemma3n_text",
            "vocab_size": self.vocab_size,
            "vocab_size_per_layer_input": self.vocab_size_per_layer_input,
            "hidden_size": self.hidden_size,
            "hidden_size_per_layer_input": self.hidden_size_per_layer_input,
            "intermediate_size": list(self.intermediate_size),
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "rope_parameters": {
                FULL: {"rope_type": "default", "rope_theta": self.rope_theta_full},
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_theta_sliding},
            },
            "rms_norm_eps": self.rms_norm_eps,
            "final_logit_softcapping": self.final_logit_softcapping,
            "altup_num_inputs": self.altup_num_inputs,
            "altup_active_idx": self.altup_active_idx,
            "altup_correct_scale": self.altup_correct_scale,
            "altup_coef_clip": self.altup_coef_clip,
            "laurel_rank": self.laurel_rank,
            "num_kv_shared_layers": self.num_kv_shared_layers,
            "activation_sparsity_pattern": list(self.activation_sparsity_pattern),
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            "tie_word_embeddings": True,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) > 1 else self.eos_token_id[0],
        }

    def replace(self, **changes) -> "TextConfig":
        return dataclasses.replace(self, **changes)


# ---- parsing and validation ------------------------------------------------------------------------


def _from_text_dict(d: dict[str, Any], scope: str) -> TextConfig:
    def field(name, default=None, required=False):
        if name in d and d[name] is not None:
            return d[name]
        if required:
            raise ConfigError(f"{scope}{name}: missing")
        return default

    def expect(name, value, allowed):
        if value not in allowed:
            raise ConfigError(f"{scope}{name}: {value!r} is not supported (expected {' or '.join(map(repr, allowed))})")

    model_type = field("model_type")
    if model_type is not None:
        expect("model_type", model_type, ("gemma3n_text", "gemma3n"))
    expect("hidden_activation", field("hidden_activation", "gelu_pytorch_tanh"), ("gelu_pytorch_tanh",))
    expect("attention_bias", field("attention_bias", False), (False,))
    expect("tie_word_embeddings", field("tie_word_embeddings", True), (True,))
    if d.get("rope_scaling") is not None:
        raise ConfigError(f"{scope}rope_scaling: {d['rope_scaling']!r} is not supported (expected null)")

    n = config_int(scope, "num_hidden_layers", field("num_hidden_layers", required=True))
    if n > MAX_LAYERS:  # before any per-layer tuple is built from it
        raise ConfigError(f"{scope}num_hidden_layers: {n} is more than {MAX_LAYERS} layers")
    inter = field("intermediate_size", required=True)
    inter = tuple(inter) if isinstance(inter, list) else (inter,) * n
    layer_types = field("layer_types")
    if layer_types is not None and not isinstance(layer_types, list):
        raise ConfigError(f"{scope}layer_types: expected a list, got {layer_types!r}")
    layer_types = tuple(layer_types) if layer_types is not None else _default_layer_types(n)
    sparsity = field("activation_sparsity_pattern")
    if sparsity is None:
        sparsity = (0.95,) * 10 + (0.0,) * (n - 10) if n > 10 else (0.0,) * n
    elif isinstance(sparsity, (int, float)):
        sparsity = (sparsity,) * n
    eos = field("eos_token_id", 1)
    eos = tuple(eos) if isinstance(eos, list) else (eos,)
    theta_full, theta_sliding = _rope_thetas(d, scope)
    softcap = field("final_logit_softcapping")

    return scoped(scope, lambda: TextConfig(
        vocab_size=field("vocab_size", required=True),
        vocab_size_per_layer_input=field("vocab_size_per_layer_input", required=True),
        hidden_size=field("hidden_size", required=True),
        hidden_size_per_layer_input=field("hidden_size_per_layer_input", required=True),
        intermediate_size=inter,
        num_hidden_layers=n,
        num_attention_heads=field("num_attention_heads", required=True),
        num_key_value_heads=field("num_key_value_heads", required=True),
        head_dim=field("head_dim", required=True),
        layer_types=layer_types,
        sliding_window=field("sliding_window", required=True),
        rope_theta_full=theta_full,
        rope_theta_sliding=theta_sliding,
        rms_norm_eps=field("rms_norm_eps", 1e-6),
        final_logit_softcapping=softcap,
        altup_num_inputs=field("altup_num_inputs", 4),
        altup_active_idx=field("altup_active_idx", 0),
        altup_correct_scale=field("altup_correct_scale", True),
        altup_coef_clip=field("altup_coef_clip"),
        laurel_rank=field("laurel_rank", required=True),
        num_kv_shared_layers=field("num_kv_shared_layers", 0),
        activation_sparsity_pattern=tuple(sparsity),
        max_position_embeddings=field("max_position_embeddings", 32_768),
        pad_token_id=field("pad_token_id", 0),
        bos_token_id=field("bos_token_id", 2),
        eos_token_id=eos,
    ))


def scoped(scope: str, build):
    """Run `build`, re-labelling validation errors with where the field lives in config.json."""
    try:
        return build()
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(scope + msg[len("config."):] if msg.startswith("config.") else msg) from None


def _rope_thetas(d: dict[str, Any], scope: str) -> tuple[float, float]:
    """transformers 5 writes `rope_parameters` per layer type; older configs write `rope_theta` (full
    layers) and `rope_local_base_freq` (sliding layers)."""
    full, sliding = d.get("rope_theta", 1_000_000.0), d.get("rope_local_base_freq", 10_000.0)
    params = d.get("rope_parameters")
    if params is None:
        return full, sliding
    if not isinstance(params, dict):
        raise ConfigError(f"{scope}rope_parameters: expected an object, got {params!r}")
    thetas = {}
    for kind, default in ((FULL, full), (SLIDING, sliding)):
        p = params.get(kind) or {}
        if not isinstance(p, dict):
            raise ConfigError(f"{scope}rope_parameters.{kind}: expected an object, got {p!r}")
        rope_type = p.get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"{scope}rope_parameters.{kind}.rope_type: {rope_type!r} is not supported (expected 'default')")
        thetas[kind] = p.get("rope_theta", default)
    return thetas[FULL], thetas[SLIDING]


def config_int(scope: str, name: str, v: Any, minimum: int = 1) -> int:
    """`scope` is the prefix naming where the field lives, e.g. 'config.json: text_config.'."""
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{scope}{name}: expected an integer >= {minimum}, got {v!r}")
    return v


def config_number(scope: str, name: str, v: Any, positive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise ConfigError(f"{scope}{name}: expected a {'positive ' if positive else ''}number, got {v!r}")
    return float(v)


def _validate(c: TextConfig) -> None:
    s = "config."
    for name in ("vocab_size", "vocab_size_per_layer_input", "hidden_size", "hidden_size_per_layer_input",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                 "altup_num_inputs", "laurel_rank", "max_position_embeddings"):
        config_int(s, name, getattr(c, name))
    config_int(s, "num_kv_shared_layers", c.num_kv_shared_layers, minimum=0)
    for name in ("pad_token_id", "bos_token_id"):
        config_int(s, name, getattr(c, name), minimum=0)
    for i, e in enumerate(c.eos_token_id):
        config_int(s, f"eos_token_id[{i}]", e, minimum=0)
    for name in ("rope_theta_full", "rope_theta_sliding", "rms_norm_eps"):
        config_number(s, name, getattr(c, name))
    if c.final_logit_softcapping is not None:
        config_number(s, "final_logit_softcapping", c.final_logit_softcapping)
    if c.altup_coef_clip is not None:
        config_number(s, "altup_coef_clip", c.altup_coef_clip)
    if not isinstance(c.altup_correct_scale, bool):
        raise ConfigError(f"{s}altup_correct_scale: expected true or false, got {c.altup_correct_scale!r}")
    n = c.num_hidden_layers
    for name in ("intermediate_size", "layer_types", "activation_sparsity_pattern"):
        if len(getattr(c, name)) != n:
            raise ConfigError(f"{s}{name}: expected {n} entries (one per layer), got {len(getattr(c, name))}")
    for i, w in enumerate(c.intermediate_size):
        config_int(s, f"intermediate_size[{i}]", w)
    for i, t in enumerate(c.layer_types):
        if t not in (SLIDING, FULL):
            raise ConfigError(f"{s}layer_types[{i}]: {t!r} is not supported (expected {SLIDING!r} or {FULL!r})")
    for i, p in enumerate(c.activation_sparsity_pattern):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ConfigError(f"{s}activation_sparsity_pattern[{i}]: expected a number in [0, 1), got {p!r}")
    if c.num_attention_heads % c.num_key_value_heads:
        raise ConfigError(f"{s}num_key_value_heads: {c.num_key_value_heads} does not divide "
                          f"num_attention_heads={c.num_attention_heads}")
    if c.head_dim % 2:
        raise ConfigError(f"{s}head_dim: must be even for rotary embeddings, got {c.head_dim}")
    if not 0 <= c.altup_active_idx < c.altup_num_inputs:
        raise ConfigError(f"{s}altup_active_idx: expected 0..{c.altup_num_inputs - 1}, got {c.altup_active_idx}")
    if c.vocab_size < c.vocab_size_per_layer_input:
        raise ConfigError(f"{s}vocab_size: {c.vocab_size} is smaller than vocab_size_per_layer_input="
                          f"{c.vocab_size_per_layer_input}")
    if c.num_kv_shared_layers >= n:
        raise ConfigError(f"{s}num_kv_shared_layers: {c.num_kv_shared_layers} leaves no layer to produce a KV cache "
                          f"(num_hidden_layers={n})")
    owners = set(c.layer_types[: n - c.num_kv_shared_layers])
    if c.num_kv_shared_layers and set(c.layer_types) - owners:
        raise ConfigError(f"{s}num_kv_shared_layers: layer types {sorted(set(c.layer_types) - owners)} are only in "
                          "KV-shared layers, so no earlier layer produces their cache")
    for name in ("pad_token_id", "bos_token_id"):
        if getattr(c, name) >= c.vocab_size:
            raise ConfigError(f"{s}{name}: {getattr(c, name)} is outside the vocabulary (vocab_size={c.vocab_size})")


# ---- presets ---------------------------------------------------------------------------------------


def _default_layer_types(n: int) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % 5 == 0 else SLIDING for i in range(n))


def _real(num_layers: int, intermediate: int, kv_shared: int) -> TextConfig:
    return TextConfig(
        vocab_size=262_400, vocab_size_per_layer_input=262_144, hidden_size=2048,
        hidden_size_per_layer_input=256, intermediate_size=(intermediate,) * num_layers,
        num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        layer_types=_default_layer_types(num_layers), sliding_window=512,
        rope_theta_full=1_000_000.0, rope_theta_sliding=10_000.0, rms_norm_eps=1e-6,
        final_logit_softcapping=30.0, altup_num_inputs=4, altup_active_idx=0, altup_correct_scale=True,
        altup_coef_clip=120.0, laurel_rank=64, num_kv_shared_layers=kv_shared,
        activation_sparsity_pattern=(0.95,) * 10 + (0.0,) * (num_layers - 10),
        max_position_embeddings=32_768, eos_token_id=(1, 106),
    )


E2B = _real(30, 8192, 10)
E4B = _real(35, 16384, 15)
PRESETS = {"e2b": E2B, "e4b": E4B}
