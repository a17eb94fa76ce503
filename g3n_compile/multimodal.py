"""The multimodal side of a checkpoint for g3n-compile: its encoders (audio tower, vision tower) exported as
modules of their own, the token ids the prompt processor writes, and the table of the multimodal token
ids' own embeddings.

A Hub `Gemma3nForConditionalGeneration` folder holds `model.audio_tower.*` + `model.embed_audio.*` and
`model.vision_tower.timm_model.*` + `model.embed_vision.*` next to the text weights. An encoder is compiled
when its tensors are there; a text-only folder (`Gemma3nForCausalLM`, or a multimodal config without tower
tensors) has none and compiles as text.

Token ids from the vision embedder's offset up (`<end_of_image>`, `<image_soft_token>`, ...,
`<end_of_audio>`, ...) are embedded by the embedders' hard path, not by the text embedding (transformers'
`Gemma3nModel.forward`). Those rows do not depend on context, so they are computed here once, with g3n's
embedders on the checkpoint's weights, and stored in the archive as one float32 table that the runtime
reads on the host and passes to prefill as embedding overrides.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from .audio import TOWER_PREFIX as AUDIO_TOWER_PREFIX, AudioConfig, AudioModel, audio_tensor_names
from .checkpoint import Checkpoint, CheckpointError, assign_parameter
from .config import ConfigError, _int
from .vision import Gemma3nVisionModel, vision_tensor_names
from .vision_config import VisionConfig
from runtime.audio import AudioError, LogMelSpec
from runtime.image import ImageError, ImagePreprocessing

TOKEN_TABLE = "multimodal_token_embeddings"
# The encoders' archive names (the text model's never start so).
ENCODER_PARAMETER_PREFIXES = ("audio_tower.", "embed_audio.", "vision_tower.", "embed_vision.")
PREPROCESSOR_CONFIG = "preprocessor_config.json"
VISION_TOWER_PREFIX = "model.vision_tower."


@dataclass(frozen=True)
class PromptTokens:
    """The ids Gemma 3n's processor writes around the soft tokens: an image is `\\n\\n<boi>` + soft-token
    placeholders (`image`) + `<eoi>\\n\\n`, audio likewise with boa/audio/eoa. From config.json's top level;
    the defaults are transformers' `Gemma3nConfig` (the E2B/E4B ids)."""

    boi_token_id: int = 255_999
    eoi_token_id: int = 262_144
    image_token_id: int = 262_145
    boa_token_id: int = 256_000
    eoa_token_id: int = 262_272
    audio_token_id: int = 262_273

    @classmethod
    def from_hf_dict(cls, raw: dict, vocab_size: int) -> "PromptTokens":
        ids = {}
        for name in cls.__dataclass_fields__:
            if raw.get(name) is not None:
                ids[name] = _int("config.json: ", name, raw[name], minimum=0)
                if ids[name] >= vocab_size:
                    raise ConfigError(f"config.json: {name}: {ids[name]} is outside the vocabulary "
                                      f"(text_config.vocab_size={vocab_size})")
        return cls(**ids)

    def to_hf_dict(self) -> dict:
        return asdict(self)


def multimodal_config(text: dict, audio: AudioConfig, vision: VisionConfig, tokens: PromptTokens) -> dict:
    """A `Gemma3nForConditionalGeneration` config.json from the text config (`TextConfig.to_hf_dict()`)
    and the two towers' configs."""
    text = {**text, "model_type": "gemma3n_text"}
    text.pop("architectures", None)
    return {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n", "text_config": text,
            "audio_config": audio.to_hf_dict(), "audio_soft_tokens_per_image": audio.soft_tokens,
            **vision.to_hf_dict(), **tokens.to_hf_dict()}


@dataclass
class Encoder:
    """One tower + embedder to compile: its model (weights uninitialised: the export reads shapes), where
    its parameters are in the checkpoint, and its ABI as g3n.json records it."""

    kind: str  # "audio" or "vision"
    model: nn.Module
    stored_names: dict[str, str]  # parameter name -> checkpoint tensor name
    abi: dict
    mlir: str = ""
    parameters: list[str] = field(default_factory=list)  # what the exported module loads from the archive

    @property
    def embedder(self) -> nn.Module:
        return getattr(self.model, f"embed_{self.kind}")


def find_encoders(ckpt: Checkpoint, dtype: torch.dtype) -> list[Encoder]:
    """The encoders whose tensors the checkpoint holds (none for a text-only one), validated against its
    config.json and preprocessor_config.json."""
    preprocessor = {}
    if (ckpt.folder / PREPROCESSOR_CONFIG).is_file():
        try:
            preprocessor = json.loads((ckpt.folder / PREPROCESSOR_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{ckpt.folder / PREPROCESSOR_CONFIG}: not valid JSON ({e})") from None
    encoders = []
    try:
        if any(n.startswith(AUDIO_TOWER_PREFIX) for n in ckpt.location):
            encoders.append(_audio(ckpt, AudioConfig.from_hf_dict(ckpt.raw_config), preprocessor, dtype))
        if any(n.startswith(VISION_TOWER_PREFIX) for n in ckpt.location):
            encoders.append(_vision(ckpt, VisionConfig.from_hf_dict(ckpt.raw_config), preprocessor, dtype))
    except (ConfigError, AudioError, ImageError) as e:
        raise CheckpointError(f"{ckpt.folder}: {e}") from None
    return encoders


def _for_export(model: nn.Module, names, dtype: torch.dtype) -> dict[str, str]:
    names = dict(names)
    for name, param in list(model.named_parameters()):
        assign_parameter(model, name, torch.empty(param.shape, dtype=dtype))
    return names


def _arg(name: str, dtype: str, shape) -> dict:
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def _audio(ckpt: Checkpoint, cfg: AudioConfig, preprocessor: dict, dtype: torch.dtype) -> Encoder:
    spec = LogMelSpec.from_preprocessor_config(preprocessor)
    frames = spec.max_frames
    if spec.feature_size != cfg.input_feat_size:
        raise ConfigError(f"{PREPROCESSOR_CONFIG}: feature_size {spec.feature_size} does not match "
                          f"audio_config.input_feat_size {cfg.input_feat_size}")
    if cfg.tokens(frames) > cfg.soft_tokens:
        raise ConfigError(f"audio_soft_tokens_per_image: {cfg.soft_tokens} holds fewer than the "
                          f"{cfg.tokens(frames)} tokens of a {spec.max_samples / spec.sampling_rate:g} s clip")
    with torch.device("meta"):
        model = AudioModel(cfg)
    names = _for_export(model, audio_tensor_names(ckpt, model), dtype)
    abi = {"function": "audio", "frames": frames, "soft_tokens": cfg.soft_tokens,
           "args": [_arg("features", "float32", (1, frames, cfg.input_feat_size)), _arg("mask", "bool", (1, frames))],
           "results": [_arg("soft_tokens", "float32", (1, cfg.soft_tokens, cfg.text_hidden_size))],
           "features": json.loads(json.dumps(asdict(spec))),
           "doc": "one clip's log-mel features zero-padded to `frames` (mask False there) -> the embeddings of its "
                  "soft-token placeholders, positions past the clip holding the audio padding embedding"}
    return Encoder("audio", model.eval(), names, abi)


def _vision(ckpt: Checkpoint, cfg: VisionConfig, preprocessor: dict, dtype: torch.dtype) -> Encoder:
    # The checkpoints' preprocessor_config.json holds the image processor's settings next to the audio
    # feature extractor's; without them, Gemma 3n's own (768 x 768).
    has_image_settings = "size" in preprocessor or "image_processor_type" in preprocessor
    spec = ImagePreprocessing.from_hf_dict(preprocessor) if has_image_settings else ImagePreprocessing()
    if spec.height != spec.width:
        raise ConfigError(f"{PREPROCESSOR_CONFIG}: size: {spec.height} x {spec.width}; the vision encoder takes "
                          "square images")
    with torch.device("meta"):
        model = Gemma3nVisionModel(cfg)
    names = _for_export(model, vision_tensor_names(ckpt, model), dtype)
    s = spec.height
    abi = {"function": "encode_image", "image_size": s, "soft_tokens": cfg.soft_tokens,
           "args": [_arg("pixels", "float32", (1, 3, s, s))],
           "results": [_arg("soft_tokens", "float32", (1, cfg.soft_tokens, cfg.text_hidden_size))],
           "preprocessing": spec.to_dict(),
           "doc": "one image's pixels -> the embeddings of its soft-token placeholders"}
    return Encoder("vision", model.eval(), names, abi)


def export_encoder(encoder: Encoder) -> None:
    """torch.export + import: `encoder.mlir` and `encoder.parameters`."""
    if encoder.kind == "audio":
        from .export_audio import export_audio_model

        exported = export_audio_model(encoder.model, encoder.abi["frames"])
    else:
        from .export_vision import export_vision_model

        exported = export_vision_model(encoder.model, encoder.abi["image_size"])
    encoder.mlir, encoder.parameters = exported.mlir, exported.parameters


def token_table_entry(encoders: list[Encoder], hidden_size: int) -> dict:
    """g3n.json's description of the multimodal token table: ids first_id .. first_id + rows - 1."""
    ranges = sorted((e.model.config.vocab_offset, e.model.config.vocab_size) for e in encoders)
    for (offset, size), (next_offset, _) in zip(ranges, ranges[1:]):
        if offset + size != next_offset:
            raise CheckpointError(f"the vision and audio token ids are not adjacent ({offset}..{offset + size - 1} "
                                  f"and {next_offset}..): vision_config/audio_config vocab_offset")
    first, rows = ranges[0][0], sum(size for _, size in ranges)
    return {"parameter": TOKEN_TABLE, "first_id": first, "dtype": "float32", "shape": [rows, hidden_size],
            "rule": "an id in first_id .. first_id + rows - 1 is embedded as row id - first_id (its embedder's hard "
                    "path), passed to prefill as an embeds override"}


def archive_source(ckpt: Checkpoint, encoders: list[Encoder], dtype: torch.dtype,
                   text_source: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """The archive's tensor getter: the encoders' weights from the checkpoint in `dtype`, the token
    table computed, everything else from `text_source`."""
    stored = {name: s for e in encoders for name, s in e.stored_names.items()}

    def get(name: str) -> torch.Tensor:
        if name == TOKEN_TABLE:
            return _token_table(ckpt, encoders, dtype)
        if name in stored:
            return ckpt.tensor(stored[name]).to(dtype)
        return text_source(name)

    return get


def _token_table(ckpt: Checkpoint, encoders: list[Encoder], dtype: torch.dtype) -> torch.Tensor:
    """Every multimodal token id's embedding, by its embedder's hard path on the checkpoint's weights."""
    rows = []
    for e in sorted(encoders, key=lambda e: e.model.config.vocab_offset):
        with torch.device("meta"):
            embedder = type(e.embedder)(e.model.config)
        prefix = f"embed_{e.kind}."
        for name, _ in list(embedder.named_parameters()):
            assign_parameter(embedder, name, ckpt.tensor(e.stored_names[prefix + name]).to(dtype))
        ids = torch.arange(e.model.config.vocab_size) + e.model.config.vocab_offset
        with torch.no_grad():
            rows.append(embedder.hard(ids).float())
    return torch.cat(rows)
