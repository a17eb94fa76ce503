"""The audio and vision towers a checkpoint holds, ready for export, and the table of the multimodal token ids'
own embeddings.

A Hub `Gemma3nForConditionalGeneration` folder holds `model.audio_tower.*` + `model.embed_audio.*` and
`model.vision_tower.timm_model.*` + `model.embed_vision.*` next to the text weights. A tower is compiled
when its tensors are there; a text-only folder (`Gemma3nForCausalLM`, or a multimodal config without tower
tensors) has none and compiles as text.

Token ids from the vision embedder's offset up (`<end_of_image>`, `<image_soft_token>`, ...,
`<end_of_audio>`, ...) are embedded by the embedders' hard path, not by the text embedding (transformers'
`Gemma3nModel.forward`). Those rows do not depend on context, so they are computed once, with g3n's
embedders on the checkpoint's weights, into one float32 table that the runtime reads on the host and passes
to prefill as embedding overrides.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from runtime.audio import AudioError, LogMelSpec
from runtime.image import ImageError, ImagePreprocessing

from ..model.audio import AudioModel
from ..model.audio_config import AudioConfig
from ..model.config import ConfigError
from ..model.embedder import MultimodalEmbedder
from ..model.vision import Gemma3nVisionModel
from ..model.vision_config import VisionConfig
from .folder import Checkpoint, CheckpointError
from .load import assign_parameter, for_export
from .names import AUDIO_TOWER, VISION_TOWER, audio_tensor_names, check_sizes, vision_tensor_names

PREPROCESSOR_CONFIG = "preprocessor_config.json"
# preprocessor_config.json's fields the feature extractor and image processor take, and what each must be
# (the runtime's readers take the values as they are; a wrong type would fail inside the export or at run time).
COUNT = "a positive integer"
POSITIVE = "a positive number"
NUMBER = "a number"
FLAG = "true or false"
NUMBERS = "a list of numbers"
FILTER = "a Pillow resampling filter (0 to 5)"
PREPROCESSOR_FIELDS = {
    "feature_size": COUNT, "sampling_rate": COUNT, "frame_length_ms": POSITIVE, "hop_length_ms": POSITIVE,
    "min_frequency": NUMBER, "max_frequency": POSITIVE, "preemphasis": NUMBER, "preemphasis_htk_flavor": FLAG,
    "fft_overdrive": FLAG, "input_scale_factor": POSITIVE, "mel_floor": POSITIVE, "per_bin_mean": NUMBERS,
    "per_bin_stddev": NUMBERS, "pad_to_multiple_of": COUNT, "max_samples": COUNT, "dither": NUMBER,
    "padding_value": NUMBER, "resample": FILTER, "rescale_factor": POSITIVE, "do_rescale": FLAG,
    "do_normalize": FLAG, "image_mean": NUMBERS, "image_std": NUMBERS,
}


@dataclass
class Tower:
    """One tower + embedder to compile: its model (weights uninitialised: the export reads shapes), where its
    parameters are in the checkpoint, and how its inputs are made (`LogMelSpec` for audio, `ImagePreprocessing`
    for vision)."""

    kind: str  # "audio" or "vision"
    model: nn.Module
    stored_names: dict[str, str]  # parameter name -> checkpoint tensor name
    preprocessing: LogMelSpec | ImagePreprocessing

    @property
    def embedder(self) -> MultimodalEmbedder:
        return getattr(self.model, f"embed_{self.kind}")


def _is(kind: str, v) -> bool:
    if kind == FLAG:
        return isinstance(v, bool)
    if kind == NUMBERS:  # flat or nested (per_bin_mean is stored [1, 1, bins])
        try:
            return isinstance(v, list) and bool(np.isfinite(np.asarray(v, dtype=np.float64)).all())
        except (TypeError, ValueError):
            return False
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    if kind == FILTER:
        return isinstance(v, int) and 0 <= v <= 5
    return kind == NUMBER or (v > 0 and (kind == POSITIVE or isinstance(v, int)))


def read_preprocessor(ckpt: Checkpoint) -> dict:
    """preprocessor_config.json ({} when the folder has none), each field g3n reads of the right type."""
    if not (ckpt.folder / PREPROCESSOR_CONFIG).is_file():
        return {}
    raw = ckpt.json(PREPROCESSOR_CONFIG)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{ckpt.folder / PREPROCESSOR_CONFIG}: expected a JSON object")
    for key, kind in PREPROCESSOR_FIELDS.items():
        if raw.get(key) is not None and not _is(kind, raw[key]):
            raise CheckpointError(f"{ckpt.folder / PREPROCESSOR_CONFIG}: {key}: expected {kind}, got "
                                  f"{reprlib.repr(raw[key])}")
    size = raw.get("size")
    if size is not None and not (isinstance(size, dict) and all(_is(COUNT, size.get(k)) for k in ("height", "width"))):
        raise CheckpointError(f"{ckpt.folder / PREPROCESSOR_CONFIG}: size: expected {{\"height\": H, \"width\": W}} "
                              f"(positive integers), got {reprlib.repr(size)}")
    return raw


def tower_configs(ckpt: Checkpoint) -> list[tuple[str, AudioConfig | VisionConfig, LogMelSpec | ImagePreprocessing]]:
    """(kind, config, preprocessing) of each tower whose tensors the checkpoint holds (none for a text-only one),
    validated against config.json and preprocessor_config.json; builds no model."""
    preprocessor = read_preprocessor(ckpt)
    towers = []
    try:
        if any(n.startswith(AUDIO_TOWER) for n in ckpt.location):
            cfg = AudioConfig.from_hf_dict(ckpt.raw_config)
            towers.append(("audio", cfg, _audio_preprocessing(cfg, preprocessor)))
        if any(n.startswith(VISION_TOWER) for n in ckpt.location):
            towers.append(("vision", VisionConfig.from_hf_dict(ckpt.raw_config), _vision_preprocessing(preprocessor)))
        _token_range([cfg for _, cfg, _ in towers])
    except (ConfigError, AudioError, ImageError) as e:
        raise CheckpointError(f"{ckpt.folder}: {e}") from None
    return towers


def _audio_preprocessing(cfg: AudioConfig, preprocessor: dict) -> LogMelSpec:
    spec = LogMelSpec.from_preprocessor_config(preprocessor)
    if spec.frame_length < 1 or spec.hop_length < 1:
        raise ConfigError(f"{PREPROCESSOR_CONFIG}: frame_length_ms / hop_length_ms: under one sample at "
                          f"sampling_rate {spec.sampling_rate}")
    if spec.feature_size != cfg.input_feat_size:
        raise ConfigError(f"{PREPROCESSOR_CONFIG}: feature_size {spec.feature_size} does not match "
                          f"audio_config.input_feat_size {cfg.input_feat_size}")
    if cfg.tokens(spec.max_frames) > cfg.soft_tokens:
        raise ConfigError(f"audio_soft_tokens_per_image: {cfg.soft_tokens} holds fewer than the "
                          f"{cfg.tokens(spec.max_frames)} tokens of a {spec.max_samples / spec.sampling_rate:g} s clip")
    return spec


def _vision_preprocessing(preprocessor: dict) -> ImagePreprocessing:
    # The checkpoints' preprocessor_config.json holds the image processor's settings next to the audio
    # feature extractor's; without them, Gemma 3n's own (768 x 768).
    has_image_settings = "size" in preprocessor or "image_processor_type" in preprocessor
    spec = ImagePreprocessing.from_hf_dict(preprocessor) if has_image_settings else ImagePreprocessing()
    if spec.height != spec.width:
        raise ConfigError(f"{PREPROCESSOR_CONFIG}: size: {spec.height} x {spec.width}; the vision encoder takes "
                          "square images")
    for name in ("mean", "std"):
        if getattr(spec, name) is not None and len(getattr(spec, name)) != 3:
            raise ConfigError(f"{PREPROCESSOR_CONFIG}: image_{name}: expected 3 numbers (R, G, B)")
    if spec.std is not None and 0 in spec.std:
        raise ConfigError(f"{PREPROCESSOR_CONFIG}: image_std: {list(spec.std)} divides by zero")
    return spec


def _tower_model(ckpt: Checkpoint, kind: str, cfg: AudioConfig | VisionConfig) -> tuple[nn.Module, dict[str, str]]:
    """The tower's model on the meta device (shapes only) and its parameters' checkpoint names (validated)."""
    check_sizes(ckpt, cfg, f"{kind}_config.")
    model_class, tensor_names = (AudioModel, audio_tensor_names) if kind == "audio" else \
        (Gemma3nVisionModel, vision_tensor_names)
    with torch.device("meta"):
        model = model_class(cfg)
    return model, dict(tensor_names(ckpt, model))


def check_towers(ckpt: Checkpoint) -> list[str]:
    """What `find_towers` would raise, without making the export-ready weights; the towers' kinds."""
    towers = tower_configs(ckpt)
    for kind, cfg, _ in towers:
        _tower_model(ckpt, kind, cfg)
    return [kind for kind, _, _ in towers]


def find_towers(ckpt: Checkpoint, dtype: torch.dtype) -> list[Tower]:
    """The towers whose tensors the checkpoint holds (none for a text-only one), ready for export, validated
    against its config.json and preprocessor_config.json."""
    towers = []
    for kind, cfg, spec in tower_configs(ckpt):
        model, names = _tower_model(ckpt, kind, cfg)
        towers.append(Tower(kind, for_export(model, dtype), names, spec))
    return towers


def token_ids(towers: list[Tower]) -> tuple[int, int]:
    """(first id, count) of the multimodal token ids: the towers' embedder ranges, which must be adjacent."""
    return _token_range([t.model.config for t in towers])


def _token_range(configs: list[AudioConfig | VisionConfig]) -> tuple[int, int]:
    ranges = sorted((c.vocab_offset, c.vocab_size) for c in configs)
    for (offset, size), (next_offset, _) in zip(ranges, ranges[1:]):
        if offset + size != next_offset:
            raise ConfigError(f"config.json: vision_config/audio_config vocab_offset: the vision and audio token ids "
                              f"are not adjacent ({offset}..{offset + size - 1} and {next_offset}..)")
    return (ranges[0][0], sum(size for _, size in ranges)) if ranges else (0, 0)


def token_table(ckpt: Checkpoint, towers: list[Tower], dtype: torch.dtype) -> torch.Tensor:
    """Every multimodal token id's embedding [count, text hidden] (float32), by its embedder's hard path on the
    checkpoint's weights in `dtype`."""
    rows = []
    for tower in sorted(towers, key=lambda t: t.model.config.vocab_offset):
        with torch.device("meta"):
            embedder = MultimodalEmbedder(tower.model.config)
        prefix = f"embed_{tower.kind}."
        for name, _ in list(embedder.named_parameters()):
            assign_parameter(embedder, name, ckpt.tensor(tower.stored_names[prefix + name]).to(dtype))
        ids = torch.arange(tower.model.config.vocab_size) + tower.model.config.vocab_offset
        with torch.no_grad():
            rows.append(embedder.hard(ids).float())
    return torch.cat(rows)
