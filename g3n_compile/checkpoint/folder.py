"""A Hugging Face Gemma 3n checkpoint folder: its config and an index from tensor name to safetensors file.

A checkpoint folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Text weights are under `model.language_model.` (the Hub's multimodal
`Gemma3nForConditionalGeneration`) or `model.` (text-only `Gemma3nForCausalLM`); `lm_head.weight` is
tied to the embedding and may be present or not. The Hub files also carry k/v projections for the
KV-shared layers, which the model does not use: they are skipped.

Opening a folder validates what it can from config.json, the index and the safetensors headers alone: the index
names only plain files next to it (a link may lead into the Hugging Face cache's blob store, nowhere else), each
tensor is in exactly one file and where the index says. All problems with the tensors (missing, unexpected,
wrong shape) are collected and reported in one `CheckpointError` by names.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from runtime.errors import UserError

from ..model.config import ConfigError, TextConfig
from .jsonfile import read_json
from .safetensors import SafetensorsError, SafetensorsFile

TEXT_PREFIXES = ("model.language_model.", "model.")
# Hub towers and embedders; the text model leaves them to the audio/vision loaders.
OTHER_PREFIXES = ("model.audio_tower.", "model.vision_tower.", "model.embed_audio.", "model.embed_vision.")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(UserError, ValueError):
    """A checkpoint folder that cannot be loaded; the message lists every problem found."""


class Checkpoint:
    """An opened checkpoint folder: its text config and an index from tensor name to file. Opening validates
    config.json, the shard index and every safetensors header (no tensor data is read)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder")
        if not (self.folder / "config.json").is_file():
            raise CheckpointError(f"{self.folder}: not a checkpoint folder (no config.json)")
        self.raw_config = self.json("config.json")
        try:
            self.config = TextConfig.from_hf_dict(self.raw_config)
        except ConfigError as e:
            raise CheckpointError(f"{self.folder}: {e}") from None
        except (TypeError, AttributeError) as e:  # a field of a type TextConfig's parser takes on trust
            raise CheckpointError(f"{self.folder / 'config.json'}: text config: a field has the wrong type "
                                  f"({e}); compare it with the Hub's config.json") from None
        self.files: dict[str, SafetensorsFile] = {}
        self.location: dict[str, str] = {}  # tensor name -> file name
        weight_map = self._weight_map()
        for file_name in sorted(set(weight_map.values())) if weight_map is not None else self._unindexed_files():
            try:
                st = SafetensorsFile(self._weight_file(file_name))
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
            self.files[file_name] = st
            for name in st.keys():
                if name in self.location:  # which copy would load depends on the order the files are read in
                    raise CheckpointError(f"{self.folder}: tensor {name!r} is in both {self.location[name]} and "
                                          f"{file_name}; remove one copy")
                self.location[name] = file_name
        if weight_map is not None:
            self._check_index(weight_map)

    def json(self, name: str):
        """The folder's JSON file `name`, strictly parsed (one CheckpointError naming the file if it cannot be)."""
        path = self.folder / name
        try:
            return read_json(path)
        except ValueError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e}); fix or re-download it") from None

    def _weight_map(self) -> dict[str, str] | None:
        """The index's tensor name -> shard file name, or None when the folder has no index."""
        if not (self.folder / INDEX).is_file():
            return None
        index = self.json(INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{self.folder / INDEX}: not a valid safetensors index (expected a weight_map "
                                  "object from tensor names to shard file names)")
        for file_name in set(weight_map.values()):
            if file_name in ("", ".", "..") or Path(file_name).name != file_name or "\\" in file_name:
                raise CheckpointError(f"{self.folder / INDEX}: shard {file_name!r} is not a file name in the "
                                      "checkpoint folder; an index must name files next to it")
        missing = sorted(n for n in set(weight_map.values()) if not (self.folder / n).is_file())
        if missing:
            raise CheckpointError(f"{self.folder / INDEX}: lists shard files that are missing: "
                                  f"{', '.join(map(repr, missing))}")
        return weight_map

    def _unindexed_files(self) -> list[str]:
        if (self.folder / SINGLE).is_file():
            return [SINGLE]
        found = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not found:
            raise CheckpointError(f"{self.folder}: no weights (no {SINGLE}, {INDEX} or *.safetensors)")
        return found

    def _weight_file(self, file_name: str) -> Path:
        """The weight file's path, which must stay inside the folder once links are followed; links into the
        Hugging Face cache's blob store are how a downloaded snapshot holds its files
        (`models--org--name/snapshots/REV/FILE` -> `../../blobs/HASH`)."""
        path, root = self.folder / file_name, self.folder.resolve()
        real = path.resolve()
        blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
        if not (real.is_relative_to(root) or (blobs is not None and real.parent == blobs)):
            raise CheckpointError(f"{path}: links to {real}, outside the checkpoint folder; copy the file into it")
        return path

    def _check_index(self, weight_map: dict[str, str]) -> None:
        """Every tensor is where the index says, and the index lists every tensor."""
        misplaced = sorted(n for n, f in weight_map.items() if self.location.get(n) != f)
        unlisted = sorted(self.location.keys() - weight_map.keys())
        for names, what in ((misplaced, "lists tensors that are not in the shard it names"),
                            (unlisted, "does not list tensors its shards hold")):
            if names:
                shown = ", ".join(map(repr, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                raise CheckpointError(f"{self.folder / INDEX}: {what} ({len(names)}: {shown}); the index and the "
                                      "shards are from different checkpoints")

    def text_prefix(self) -> str:
        return next((p for p in TEXT_PREFIXES if any(n.startswith(p + "layers.") for n in self.location)), "model.")

    def tensor(self, name: str) -> torch.Tensor:
        return self.files[self.location[name]].tensor(name)

    def info(self, name: str):
        return self.files[self.location[name]].tensors[name]

    def text_dtype(self) -> torch.dtype:
        """The dtype the text weights are stored in (that of the token embedding)."""
        return self.info(self.text_prefix() + "embed_tokens.weight").dtype
