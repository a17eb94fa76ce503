"""The audio tower's configuration: `audio_config` of a multimodal Gemma 3n config.json, validated field by field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, config_int, config_number, scoped

# Fields of AudioConfig that config.json keeps outside audio_config: where they live there.
BORROWED = {"text_hidden_size": ("text_config.", "hidden_size"), "text_vocab_size": ("text_config.", "vocab_size"),
            "soft_tokens": ("", "audio_soft_tokens_per_image")}
MAX_LAYERS = 1000  # the Gemma 3n conformer has 12; each layer becomes a module, so a corrupt count must stop here


@dataclass(frozen=True)
class AudioConfig:
    """`audio_config` of a multimodal Gemma 3n config.json (defaults: transformers' `Gemma3nAudioConfig`,
    which are the E2B/E4B values), plus the three fields of the enclosing config the embedder needs."""

    input_feat_size: int = 128
    hidden_size: int = 1536
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5
    conf_reduction_factor: int = 4
    conf_residual_weight: float = 0.5
    sscp_conv_channel_size: tuple[int, int] = (128, 32)
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: tuple[tuple[int, int], tuple[int, int]] = ((3, 3), (3, 3))
    sscp_conv_stride_size: tuple[tuple[int, int], tuple[int, int]] = ((2, 2), (2, 2))
    vocab_size: int = 128
    vocab_offset: int = 262_272
    # From the enclosing config: text_config.hidden_size / .vocab_size, audio_soft_tokens_per_image.
    text_hidden_size: int = 2048
    text_vocab_size: int = 262_400
    soft_tokens: int = 188

    def __post_init__(self):
        _validate(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.conf_num_attention_heads

    @property
    def max_past(self) -> int:
        """Frames before its own that a frame attends to."""
        return max(0, self.conf_attention_context_left - 1)

    @property
    def padding_id(self) -> int:
        """The token id whose hard embedding fills the soft tokens past the clip (transformers uses the
        last id of the text vocabulary, which is the last audio id)."""
        return self.text_vocab_size - 1

    @property
    def subsampled_bins(self) -> int:
        """Mel bins left after the two subsampling convs (padded by 1 on each side in frequency)."""
        freq = self.input_feat_size
        for (_, kernel), (_, stride) in zip(self.sscp_conv_kernel_size, self.sscp_conv_stride_size):
            freq = (freq + 2 - kernel) // stride + 1
        return freq

    def tokens(self, frames: int) -> int:
        """Encoder outputs for `frames` feature frames: each subsampling conv keeps ceil(T / stride)."""
        for stride, _ in self.sscp_conv_stride_size:
            frames = -(-frames // stride)
        return -(-frames // self.conf_reduction_factor)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `audio_config` object of config.json (the three borrowed fields live elsewhere there)."""
        d = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in BORROWED}
        for name in ("sscp_conv_channel_size", "sscp_conv_kernel_size", "sscp_conv_stride_size"):
            d[name] = json.loads(json.dumps(d[name]))  # nested tuples -> lists
        return {"model_type": "gemma3n_audio", **d}

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "AudioConfig":
        if not isinstance(raw, dict):
            raise ConfigError("config.json: expected a JSON object at the top level")
        audio, text = raw.get("audio_config"), raw.get("text_config")
        if not isinstance(audio, dict) or not audio:
            raise ConfigError("config.json: audio_config: missing (not a multimodal Gemma 3n checkpoint)")
        if not isinstance(text, dict):
            raise ConfigError("config.json: text_config: missing (not a multimodal Gemma 3n checkpoint)")
        scope = "config.json: audio_config."
        if audio.get("model_type", "gemma3n_audio") != "gemma3n_audio":
            raise ConfigError(f"{scope}model_type: {audio['model_type']!r} is not supported (expected 'gemma3n_audio')")
        fields = {name: audio[name] for name in cls.__dataclass_fields__
                  if name not in BORROWED and audio.get(name) is not None}
        for name in ("sscp_conv_channel_size", "sscp_conv_kernel_size", "sscp_conv_stride_size"):
            if name in fields:
                fields[name] = _pairs(scope, name, fields[name])
        for name, (section, key) in BORROWED.items():
            source = text if section else raw
            if source.get(key) is not None:
                fields[name] = config_int("config.json: " + section, key, source[key])
        return scoped(scope, lambda: cls(**fields))


def _pairs(scope: str, name: str, value: Any) -> tuple:
    """Two entries (one per subsampling conv): ints for channel sizes, [time, freq] pairs otherwise."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{scope}{name}: expected 2 entries (one per subsampling conv), got {value!r}")
    if name == "sscp_conv_channel_size":
        return tuple(value)
    if not all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
        raise ConfigError(f"{scope}{name}: expected [[time, freq], [time, freq]], got {value!r}")
    return tuple(tuple(v) for v in value)


def _validate(c: AudioConfig) -> None:
    s = "config."
    for name in ("input_feat_size", "hidden_size", "conf_attention_chunk_size", "conf_num_attention_heads",
                 "conf_num_hidden_layers", "conf_conv_kernel_size", "conf_reduction_factor", "vocab_size",
                 "text_hidden_size", "text_vocab_size", "soft_tokens"):
        config_int(s, name, getattr(c, name))
    for name in ("conf_attention_context_left", "conf_attention_context_right", "vocab_offset"):
        config_int(s, name, getattr(c, name), minimum=0)
    for name in ("rms_norm_eps", "gradient_clipping", "conf_attention_logit_cap", "sscp_conv_group_norm_eps"):
        config_number(s, name, getattr(c, name))
    config_number(s, "conf_residual_weight", c.conf_residual_weight, positive=False)
    for i, ch in enumerate(c.sscp_conv_channel_size):
        config_int(s, f"sscp_conv_channel_size[{i}]", ch)
    for name in ("sscp_conv_kernel_size", "sscp_conv_stride_size"):
        for i, pair in enumerate(getattr(c, name)):
            for j, v in enumerate(pair):
                config_int(s, f"{name}[{i}][{j}]", v)
    if c.conf_num_hidden_layers > MAX_LAYERS:
        raise ConfigError(f"{s}conf_num_hidden_layers: {c.conf_num_hidden_layers} is more than {MAX_LAYERS}; "
                          "the config is corrupt")
    if c.subsampled_bins < 1:
        raise ConfigError(f"{s}sscp_conv_kernel_size: the subsampling convs leave no mel bin of the "
                          f"{c.input_feat_size} (kernels wider than the features)")
    if c.hidden_size % c.conf_num_attention_heads:
        raise ConfigError(f"{s}conf_num_attention_heads: {c.conf_num_attention_heads} does not divide "
                          f"hidden_size={c.hidden_size}")
    if c.hidden_size % 2:
        raise ConfigError(f"{s}hidden_size: must be even for the sinusoidal position signal, got {c.hidden_size}")
    if not c.vocab_offset <= c.padding_id < c.vocab_offset + c.vocab_size:
        raise ConfigError(f"{s}vocab_offset: the audio ids {c.vocab_offset}..{c.vocab_offset + c.vocab_size - 1} do not "
                          f"include the last text id {c.padding_id}, which pads the audio soft tokens")


def tiny_audio_config(text_hidden_size: int, text_vocab_size: int, vocab_size: int = 8) -> AudioConfig:
    """A small audio tower for tiny-random checkpoints: the real feature size (128 mel bins, so the
    runtime's standard features feed it), attention geometry (chunks of 12, 12 frames of left context),
    conv kernels, strides and reduction, at 1/24 of the width and 3 of the 12 blocks (0.3 M parameters).
    The last `vocab_size` ids of the text vocabulary become the audio ids (`<end_of_audio>` is the first,
    the soft-token placeholder the second)."""
    return AudioConfig(hidden_size=64, conf_num_attention_heads=4, conf_num_hidden_layers=3,
                       sscp_conv_channel_size=(16, 8), vocab_size=vocab_size,
                       vocab_offset=text_vocab_size - vocab_size, text_hidden_size=text_hidden_size,
                       text_vocab_size=text_vocab_size)
