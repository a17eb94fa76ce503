"""Hugging Face Gemma 3n checkpoints: find the files, map tensor names, load tensor by tensor.

A checkpoint folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Text weights are under `model.language_model.` (the Hub's multimodal
`Gemma3nForConditionalGeneration`) or `model.` (text-only `Gemma3nForCausalLM`); `lm_head.weight` is
tied to the embedding and may be present or not. The Hub files also carry k/v projections for the
KV-shared layers, which the model does not use: they are skipped.

All problems with the tensors (missing, unexpected, wrong shape, truncated files) are collected and
reported in one `CheckpointError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .config import ConfigError, TextConfig
from .safetensors_io import SafetensorsError, SafetensorsFile

TEXT_PREFIXES = ("model.language_model.", "model.")
# Hub towers and embedders; the text model leaves them to the audio/vision loaders.
OTHER_PREFIXES = ("model.audio_tower.", "model.vision_tower.", "model.embed_audio.", "model.embed_vision.")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message lists every problem found."""


class Checkpoint:
    """An opened checkpoint folder: its text config and an index from tensor name to file."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder")
        if not (self.folder / "config.json").is_file():
            raise CheckpointError(f"{self.folder}: not a checkpoint folder (no config.json)")
        try:
            self.raw_config = json.loads((self.folder / "config.json").read_text())
            self.config = TextConfig.from_hf_dict(self.raw_config)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.folder / 'config.json'}: not valid JSON ({e})") from None
        except ConfigError as e:
            raise CheckpointError(f"{self.folder}: {e}") from None
        self.files: dict[str, SafetensorsFile] = {}
        self.location: dict[str, str] = {}  # tensor name -> file name
        for file_name in self._shard_names():
            try:
                st = SafetensorsFile(self.folder / file_name)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
            self.files[file_name] = st
            for name in st.keys():
                self.location[name] = file_name

    def _shard_names(self) -> list[str]:
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map)") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists shard files that are missing: {', '.join(missing)}")
            return names
        if (self.folder / SINGLE).is_file():
            return [SINGLE]
        found = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not found:
            raise CheckpointError(f"{self.folder}: no weights (no {SINGLE}, {INDEX} or *.safetensors)")
        return found

    def text_prefix(self) -> str:
        return next((p for p in TEXT_PREFIXES if any(n.startswith(p + "layers.") for n in self.location)), "model.")

    def tensor(self, name: str) -> torch.Tensor:
        return self.files[self.location[name]].tensor(name)

    def info(self, name: str):
        return self.files[self.location[name]].tensors[name]

    def text_dtype(self) -> torch.dtype:
        """The dtype the text weights are stored in (that of the token embedding)."""
        return self.info(self.text_prefix() + "embed_tokens.weight").dtype


def _shared_kv_names(cfg: TextConfig) -> set[str]:
    return {f"layers.{i}.self_attn.{w}.weight" for i in range(cfg.num_hidden_layers) if cfg.kv_source(i) != i
            for w in ("k_proj", "v_proj", "k_norm", "v_norm")}


def text_tensor_names(ckpt: Checkpoint, model: nn.Module) -> Iterator[tuple[str, str]]:
    """(model parameter name, checkpoint tensor name) for every model parameter; raises one
    CheckpointError listing missing, unexpected and wrong-shaped tensors."""
    prefix = ckpt.text_prefix()
    expected = dict(model.named_parameters())
    ignorable = _shared_kv_names(ckpt.config)
    missing, unexpected, wrong = [], [], []
    found = {}
    for stored in ckpt.location:
        if stored.startswith(OTHER_PREFIXES):
            continue
        if stored == "lm_head.weight":  # tied to the embedding
            info = ckpt.info(stored)
            want = tuple(expected["embed_tokens.weight"].shape)
            if info.shape != want:
                wrong.append(f"{stored}: {list(info.shape)} in the file, {list(want)} expected")
            continue
        name = stored[len(prefix):] if stored.startswith(prefix) else None
        if name in expected:
            found[name] = stored
        elif name not in ignorable:
            unexpected.append(stored)
    for name, param in expected.items():
        if name not in found:
            missing.append(prefix + name)
            continue
        info = ckpt.info(found[name])
        if info.shape != tuple(param.shape):
            wrong.append(f"{found[name]}: {list(info.shape)} in the file, {list(param.shape)} expected")
    raise_problems(ckpt, missing, unexpected, wrong)
    return iter(found.items())


def raise_problems(ckpt: Checkpoint, missing: list[str], unexpected: list[str], wrong: list[str]) -> None:
    """One CheckpointError listing every missing, unexpected and wrong-shaped tensor (if there are any)."""
    problems = []
    for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            problems.append(f"{title} ({len(items)}): " + "; ".join(shown))
    if problems:
        raise CheckpointError(f"{ckpt.folder}: checkpoint does not match its config.json:\n  " + "\n  ".join(problems))


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
    from .model import Gemma3nTextModel

    ckpt = Checkpoint(folder)
    with torch.device("meta"):
        model = Gemma3nTextModel(ckpt.config)
    return fill_from_checkpoint(model, ckpt, text_tensor_names(ckpt, model), dtype)


def text_model_for_export(ckpt: Checkpoint, dtype: torch.dtype):
    """The decoder with the checkpoint's shapes in `dtype`, its weights uninitialised, and a map from
    parameter name to checkpoint tensor name (validated). torch.export reads only shapes and dtypes;
    the weights go from the checkpoint to the archive later, one tensor at a time. `torch.empty`
    storage that is never written costs no RAM, so exporting E4B in float32 stays under 1 GB."""
    from .model import Gemma3nTextModel

    with torch.device("meta"):
        model = Gemma3nTextModel(ckpt.config)
    names = dict(text_tensor_names(ckpt, model))
    for name, param in list(model.named_parameters()):
        assign_parameter(model, name, torch.empty(param.shape, dtype=dtype))
    return model.eval(), names
