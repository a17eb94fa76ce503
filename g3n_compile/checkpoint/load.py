"""Models filled from a checkpoint, tensor by tensor, for eager use and for export."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..model.text import Gemma3nTextModel
from .folder import Checkpoint
from .names import text_tensor_names
from .presets import resolve_checkpoint


def assign_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    setattr(owner, leaf, nn.Parameter(value, requires_grad=False))


def fill_from_checkpoint(model: nn.Module, ckpt: Checkpoint, names, dtype: torch.dtype) -> nn.Module:
    """`model` (built on the meta device) with the checkpoint's tensors, one at a time: `names` yields
    (parameter name, stored name). Tensors already in `dtype` stay memory-mapped (no copy), so a bf16
    E4B checkpoint loads as bf16 without filling RAM."""
    for name, stored in names:
        t = ckpt.tensor(stored)
        assign_parameter(model, name, t if t.dtype == dtype else t.to(dtype))
    return model.eval()


def load_text_model(folder: str | Path, dtype: torch.dtype = torch.float32):
    """The text decoder of a checkpoint folder, tensor by tensor (see `fill_from_checkpoint`)."""
    ckpt = Checkpoint(folder)
    with torch.device("meta"):
        model = Gemma3nTextModel(ckpt.config)
    return fill_from_checkpoint(model, ckpt, text_tensor_names(ckpt, model), dtype)


def for_export(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` (built on the meta device) with uninitialised weights in `dtype`: torch.export reads only shapes and
    dtypes, and the weights go from the checkpoint to the archive later, one tensor at a time. `torch.empty` storage
    that is never written costs no RAM, so exporting E4B in float32 stays under 1 GB."""
    for name, param in list(model.named_parameters()):
        assign_parameter(model, name, torch.empty(param.shape, dtype=dtype))
    return model.eval()


def text_model_for_export(ckpt: Checkpoint, dtype: torch.dtype) -> tuple[Gemma3nTextModel, dict[str, str]]:
    """The decoder with the checkpoint's shapes (`for_export`) and a map from parameter name to checkpoint tensor
    name (validated)."""
    with torch.device("meta"):
        model = Gemma3nTextModel(ckpt.config)
    names = dict(text_tensor_names(ckpt, model))
    return for_export(model, dtype), names


def load_model(path_or_preset: str | Path, dtype: torch.dtype = torch.float32) -> Gemma3nTextModel:
    """The text decoder from a checkpoint folder (Hugging Face layout) or the built-in `tiny-random`
    preset (generated once into the cache folder)."""
    return load_text_model(resolve_checkpoint(path_or_preset), dtype)
