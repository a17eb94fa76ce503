"""A Hugging Face Gemma 3n checkpoint folder: its config and an index from tensor name to safetensors file.

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

import torch

from runtime.errors import UserError

from ..model.config import ConfigError, TextConfig
from .safetensors import SafetensorsError, SafetensorsFile

TEXT_PREFIXES = ("model.language_model.", "model.")
# Hub towers and embedders; the text model leaves them to the audio/vision loaders.
OTHER_PREFIXES = ("model.audio_tower.", "model.vision_tower.", "model.embed_audio.", "model.embed_vision.")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(UserError, ValueError):
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
