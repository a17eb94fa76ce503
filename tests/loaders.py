"""Audio and vision towers filled from a checkpoint folder, for eager comparisons with transformers (the product
compiles towers from `g3n_compile.checkpoint.towers`, shaped for export, and never runs them eagerly)."""

from pathlib import Path

import torch

from g3n_compile.checkpoint import Checkpoint, CheckpointError
from g3n_compile.checkpoint.load import fill_from_checkpoint
from g3n_compile.checkpoint.names import audio_tensor_names, vision_tensor_names
from g3n_compile.model.audio import AudioModel
from g3n_compile.model.audio_config import AudioConfig
from g3n_compile.model.config import ConfigError
from g3n_compile.model.vision import Gemma3nVisionModel
from g3n_compile.model.vision_config import VisionConfig


def _load(folder, dtype, config_cls, model_cls, names):
    ckpt = Checkpoint(folder)
    try:
        config = config_cls.from_hf_dict(ckpt.raw_config)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.folder}: {e}") from None
    with torch.device("meta"):
        model = model_cls(config)
    return fill_from_checkpoint(model, ckpt, names(ckpt, model), dtype)


def load_audio_model(folder: str | Path, dtype: torch.dtype = torch.float32) -> AudioModel:
    return _load(folder, dtype, AudioConfig, AudioModel, audio_tensor_names)


def load_vision_model(folder: str | Path, dtype: torch.dtype = torch.float32) -> Gemma3nVisionModel:
    return _load(folder, dtype, VisionConfig, Gemma3nVisionModel, vision_tensor_names)
