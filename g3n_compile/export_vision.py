"""torch.export the vision path (encoder + embedder) at one image size, import to torch-dialect MLIR.

Module ABI:
    encode_image(pixels f32[1, 3, S, S]) -> soft-token embeddings f32[1, T, text_hidden]
with S fixed at compile time (768, 512 or 256 for Gemma 3n) and T = vision_soft_tokens_per_image. Every
weight is an external parameter named as in the model (`vision_tower.timm_model.*`, `embed_vision.*`),
so the module shares the text modules' `.irpa` and holds code only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .export import _ExternalParameters
from .vision import Gemma3nVisionModel

FUNCTION = "encode_image"


@dataclass
class ExportedVision:
    mlir: str
    parameters: list[str]  # model parameter names the module loads from the archive
    image_size: int
    soft_tokens: int


def export_vision_model(model: Gemma3nVisionModel, image_size: int) -> ExportedVision:
    from iree.compiler import ir
    from iree.compiler.extras.fx_importer import FxImporter
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    pixels = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings():  # torch.export's own deprecation chatter, not actionable here
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(model, (pixels,), strict=False)
        program = program.run_decompositions(get_decomposition_table())
    hooks = _ExternalParameters()
    parameter_names = {n for n, _ in model.named_parameters()}
    hooks.names_by_id = {id(v): k for k, v in program.state_dict.items() if k in parameter_names}
    importer = FxImporter(context=ir.Context(), hooks=hooks)
    importer.import_frozen_program(program, func_name=FUNCTION)
    return ExportedVision(str(importer.module), sorted(hooks.globals), image_size, model.config.soft_tokens)
