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

import json
from dataclasses import dataclass

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
from .names import AUDIO_TOWER, VISION_TOWER, audio_tensor_names, vision_tensor_names

PREPROCESSOR_CONFIG = "preprocessor_config.json"


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


def find_towers(ckpt: Checkpoint, dtype: torch.dtype) -> list[Tower]:
    """The towers whose tensors the checkpoint holds (none for a text-only one), validated against its
    config.json and preprocessor_config.json."""
    preprocessor = {}
    if (ckpt.folder / PREPROCESSOR_CONFIG).is_file():
        try:
            preprocessor = json.loads((ckpt.folder / PREPROCESSOR_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{ckpt.folder / PREPROCESSOR_CONFIG}: not valid JSON ({e})") from None
    towers = []
    try:
        if any(n.startswith(AUDIO_TOWER) for n in ckpt.location):
            towers.append(_audio(ckpt, AudioConfig.from_hf_dict(ckpt.raw_config), preprocessor, dtype))
        if any(n.startswith(VISION_TOWER) for n in ckpt.location):
            towers.append(_vision(ckpt, VisionConfig.from_hf_dict(ckpt.raw_config), preprocessor, dtype))
    except (ConfigError, AudioError, ImageError) as e:
        raise CheckpointError(f"{ckpt.folder}: {e}") from None
    return towers


def _audio(ckpt: Checkpoint, cfg: AudioConfig, preprocessor: dict, dtype: torch.dtype) -> Tower:
    spec = LogMelSpec.from_preprocessor_config(preprocessor)
    if spec.feature_size != cfg.input_feat_size:
        raise ConfigError(f"{PREPROCESSOR_CONFIG}: feature_size {spec.feature_size} does not match "
                          f"audio_config.input_feat_size {cfg.input_feat_size}")
    if cfg.tokens(spec.max_frames) > cfg.soft_tokens:
        raise ConfigError(f"audio_soft_tokens_per_image: {cfg.soft_tokens} holds fewer than the "
                          f"{cfg.tokens(spec.max_frames)} tokens of a {spec.max_samples / spec.sampling_rate:g} s clip")
    with torch.device("meta"):
        model = AudioModel(cfg)
    names = dict(audio_tensor_names(ckpt, model))
    return Tower("audio", for_export(model, dtype), names, spec)


def _vision(ckpt: Checkpoint, cfg: VisionConfig, preprocessor: dict, dtype: torch.dtype) -> Tower:
    # The checkpoints' preprocessor_config.json holds the image processor's settings next to the audio
    # feature extractor's; without them, Gemma 3n's own (768 x 768).
    has_image_settings = "size" in preprocessor or "image_processor_type" in preprocessor
    spec = ImagePreprocessing.from_hf_dict(preprocessor) if has_image_settings else ImagePreprocessing()
    if spec.height != spec.width:
        raise ConfigError(f"{PREPROCESSOR_CONFIG}: size: {spec.height} x {spec.width}; the vision encoder takes "
                          "square images")
    with torch.device("meta"):
        model = Gemma3nVisionModel(cfg)
    names = dict(vision_tensor_names(ckpt, model))
    return Tower("vision", for_export(model, dtype), names, spec)


def token_ids(towers: list[Tower]) -> tuple[int, int]:
    """(first id, count) of the multimodal token ids: the towers' embedder ranges, which must be adjacent."""
    ranges = sorted((t.model.config.vocab_offset, t.model.config.vocab_size) for t in towers)
    for (offset, size), (next_offset, _) in zip(ranges, ranges[1:]):
        if offset + size != next_offset:
            raise CheckpointError(f"the vision and audio token ids are not adjacent ({offset}..{offset + size - 1} "
                                  f"and {next_offset}..): vision_config/audio_config vocab_offset")
    return ranges[0][0], sum(size for _, size in ranges)


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
