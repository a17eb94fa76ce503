"""torch.export the audio and vision towers (each with its embedder) as the module ABI's `audio` and
`encode_image` (runtime/abi.py), one module each, sharing the text modules' `.irpa`.

The audio module takes a fixed frame count F (2997 frames hold 30 s); a shorter clip's features are zero-padded
to F with the mask False there (`runtime.audio.pad_to_frames`), which gives the same tokens as the clip alone.
The vision module takes one image size S (768, 512 or 256 for Gemma 3n). Every weight is an external parameter
named as in the model (`audio_tower.*`, `embed_audio.*`, `vision_tower.timm_model.*`, `embed_vision.*`), so the
names cannot collide with the text model's in the shared archive.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from runtime.abi import AudioEncoder, VisionEncoder, audio_function, vision_function
from runtime.audio import LogMelSpec
from runtime.image import ImagePreprocessing

from .program import EntryPoint, example_args, export_module


@dataclass
class ExportedEncoder:
    kind: str  # "audio" or "vision"
    mlir: str
    parameters: list[str]  # model parameter names the module loads from the archive
    abi: AudioEncoder | VisionEncoder


def audio_abi(model: nn.Module, spec: LogMelSpec) -> AudioEncoder:
    c = model.config
    f = audio_function(spec.max_frames, c.input_feat_size, c.soft_tokens, c.text_hidden_size)
    return AudioEncoder(f.name, spec.max_frames, c.soft_tokens, f.args, f.results, spec, f.doc)


def vision_abi(model: nn.Module, spec: ImagePreprocessing) -> VisionEncoder:
    c = model.config
    f = vision_function(spec.height, c.soft_tokens, c.text_hidden_size)
    return VisionEncoder(f.name, spec.height, c.soft_tokens, f.args, f.results, spec, f.doc)


def export_encoder(kind: str, model: nn.Module, spec: LogMelSpec | ImagePreprocessing) -> ExportedEncoder:
    """The tower + embedder `model` ("audio": AudioModel, "vision": Gemma3nVisionModel) at the input size `spec`
    gives."""
    abi = audio_abi(model, spec) if kind == "audio" else vision_abi(model, spec)
    exported = export_module([EntryPoint(abi.function, model, example_args(abi.signature))])
    return ExportedEncoder(kind, exported.mlir, exported.parameters, abi)
