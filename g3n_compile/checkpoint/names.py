"""Checkpoint tensor names -> model parameter names, for the text decoder, the audio tower and the vision tower.

Each function pairs every parameter of a model (built on the meta device: only names and shapes) with the
checkpoint tensor that fills it, and raises one CheckpointError listing every missing, unexpected and
wrong-shaped tensor of its part of the checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from torch import nn

from ..model.config import TextConfig
from .folder import Checkpoint, CheckpointError

# Hub towers and embedders, as the checkpoint names them; the text model leaves them to the tower loaders.
AUDIO_TOWER, VISION_TOWER = "model.audio_tower.", "model.vision_tower."
AUDIO_PREFIXES = (AUDIO_TOWER, "model.embed_audio.")
VISION_PREFIXES = (VISION_TOWER + "timm_model.", "model.embed_vision.")
TOWER_PREFIXES = (*AUDIO_PREFIXES, VISION_TOWER, "model.embed_vision.")


def check_sizes(ckpt: Checkpoint, cfg: Any, scope: str, exempt: tuple[str, ...] = ()) -> None:
    """Every integer of config dataclass `cfg` (nested ones included; `exempt` fields aside) at most the checkpoint's
    largest tensor dimension or its number of tensors: a size or count above both cannot match the weights. Run
    before a model is built from `cfg`, where a corrupt size (2**63 channels, 10**18 layers) would overflow or loop."""
    dims = [d for f in ckpt.files.values() for info in f.tensors.values() for d in info.shape]
    bound = max([len(ckpt.location), *dims])

    def walk(value, where: str):
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                if f.name not in exempt:
                    walk(getattr(value, f.name), f"{where}.{f.name}" if where else f.name)
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, int) and not isinstance(value, bool) and value > bound:
            raise CheckpointError(f"{ckpt.folder / 'config.json'}: {scope}{where}: {value} is larger than any "
                                  f"dimension or count of the checkpoint's tensors ({bound}); config.json and the "
                                  "weights do not match")

    walk(cfg, "")


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
        if stored.startswith(TOWER_PREFIXES):
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
        raise CheckpointError(f"{ckpt.folder}: checkpoint does not match its config.json: " + " | ".join(problems))


def audio_tensor_names(ckpt: Checkpoint, model: nn.Module) -> Iterator[tuple[str, str]]:
    """(model parameter name, checkpoint tensor name) for every parameter of an AudioModel, checked against the
    checkpoint's `model.audio_tower.*` / `model.embed_audio.*` tensors."""
    expected = {"model." + name: param for name, param in model.named_parameters()}
    stored = {n for n in ckpt.location if n.startswith(AUDIO_PREFIXES)}
    wrong = []
    for name in sorted(stored & expected.keys()):
        shape, want = ckpt.info(name).shape, tuple(expected[name].shape)
        if shape != want:
            wrong.append(f"{name}: {list(shape)} in the file, {list(want)} expected")
    raise_problems(ckpt, sorted(expected.keys() - stored), sorted(stored - expected.keys()), wrong)
    return ((name[len("model."):], name) for name in expected)


def vision_tensor_names(ckpt: Checkpoint, model: nn.Module) -> Iterator[tuple[str, str]]:
    """(model parameter name, checkpoint tensor name) for every parameter of a Gemma3nVisionModel, checked
    against the checkpoint's `model.vision_tower.timm_model.*` / `model.embed_vision.*` tensors."""
    expected = dict(model.named_parameters())
    found, unexpected, wrong = {}, [], []
    for stored in ckpt.location:
        if not stored.startswith(VISION_PREFIXES):
            continue
        name = stored.removeprefix("model.")
        if name not in expected:
            unexpected.append(stored)
            continue
        shape = ckpt.info(stored).shape
        if shape != tuple(expected[name].shape):
            wrong.append(f"{stored}: {list(shape)} in the file, {list(expected[name].shape)} expected")
        found[name] = stored
    raise_problems(ckpt, ["model." + n for n in expected if n not in found], unexpected, wrong)
    return iter(found.items())
