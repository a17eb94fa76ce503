"""torch.export the audio tower + embedder at a fixed frame count, import it to torch-dialect MLIR.

Module ABI (one function, its own `.vmfb`, sharing the `.irpa` with the text modules):
    audio(features f32[1, F, mel bins], mask i1[1, F]) -> soft_tokens f32[1, soft_tokens, text hidden]
F is fixed per module (2997 frames hold 30 s); a shorter clip's features are zero-padded to F with the
mask False there (`runtime.audio.pad_to_frames`), which gives the same tokens as the clip alone.
Every weight is an external parameter named as in the model (`audio_tower.*`, `embed_audio.*`), so
the names cannot collide with the text model's in the shared archive.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .audio import AudioModel
from .export import _ExternalParameters

FUNCTION = "audio"


@dataclass
class ExportedAudio:
    mlir: str
    parameters: list[str]  # model parameter names the module loads from the archive
    frames: int


def export_program(model: AudioModel, frames: int) -> torch.export.ExportedProgram:
    """The model traced at `frames` feature frames, decomposed for torch-mlir."""
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    # The frozen importer only finds buffers in the state dict (toolchain notes P1).
    for m in model.modules():
        m._non_persistent_buffers_set.clear()
    c = model.config
    # Distinct tensors for every argument: aliased example inputs get wired to one placeholder.
    args = (torch.zeros(1, frames, c.input_feat_size), torch.ones(1, frames, dtype=torch.bool))
    with warnings.catch_warnings():  # torch.export's own deprecation chatter, not actionable here
        warnings.simplefilter("ignore", FutureWarning)
        return torch.export.export(model, args, strict=False).run_decompositions(get_decomposition_table())


def export_audio_model(model: AudioModel, frames: int) -> ExportedAudio:
    return import_program(model, export_program(model, frames), frames)


def import_program(model: AudioModel, program: torch.export.ExportedProgram, frames: int) -> ExportedAudio:
    """`program` (from `export_program`) as torch-dialect MLIR with the weights as external parameters."""
    from iree.compiler import ir
    from iree.compiler.extras.fx_importer import FxImporter

    parameter_names = {n for n, _ in model.named_parameters()}
    hooks = _ExternalParameters()
    hooks.names_by_id = {id(v): k for k, v in program.state_dict.items() if k in parameter_names}
    importer = FxImporter(context=ir.Context(), hooks=hooks)
    importer.import_frozen_program(program, func_name=FUNCTION)
    return ExportedAudio(str(importer.module), sorted(hooks.globals), frames)
