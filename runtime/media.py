"""Prompts with images and audio: Gemma 3n's processor rules, and the embeddings the text model takes in
place of the placeholders.

As transformers' `Gemma3nProcessor`: each `<image_soft_token>` of the rendered prompt (the chat template
writes one per image part) becomes `\\n\\n<start_of_image>`, the image's soft-token placeholders (256 for
the real model) and `<end_of_image>\\n\\n`; each `<audio_soft_token>` likewise with `<start_of_audio>`,
188 placeholders and `<end_of_audio>`. The i-th image placeholder is the i-th image, the i-th audio
placeholder the i-th clip. The text is tokenized after the expansion.

The prompt's embedding overrides (prefill's `embeds` / `embeds_mask`) are then what transformers'
`Gemma3nModel.forward` merges: each group of placeholders gets its encoder's soft tokens (audio positions
past the clip's end carry the audio padding embedding, which the audio module writes), and every other
multimodal token id (`<end_of_image>`, ...) its embedder's row from the folder's token table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import features_from_file, log_mel, pad_to_frames
from .errors import UserError
from .image import pixels
from .module import CompiledModel

IMAGE, AUDIO = "image", "audio"
ENCODER = {IMAGE: "vision", AUDIO: "audio"}  # media kind -> the encoder (and g3n.json entry) that reads it


class MediaError(UserError, ValueError):
    """A prompt's images or audio that do not fit its placeholders or the model; the message says why."""


@dataclass(frozen=True)
class Placeholders:
    """How one kind of media appears in a prompt: `begin`, `count` x `token`, `end` (token ids)."""

    kind: str
    begin: int
    token: int
    end: int
    count: int


def placeholders(model: CompiledModel, kind: str) -> Placeholders:
    """The folder's placeholders for `kind`; ModelError if it has no encoder for that kind."""
    abi, _ = model.encoder(ENCODER[kind])
    ids = model.manifest.prompt_tokens
    if kind == IMAGE:
        return Placeholders(kind, ids.boi_token_id, ids.image_token_id, ids.eoi_token_id, abi.soft_tokens)
    return Placeholders(kind, ids.boa_token_id, ids.audio_token_id, ids.eoa_token_id, abi.soft_tokens)


def expand_text(text: str, spec: Placeholders, media: int, id_to_token) -> str:
    """`text` with each of its `media` placeholder tokens replaced by the full placeholder sequence."""
    placeholder = id_to_token(spec.token)
    found = text.count(placeholder)
    if found != media:
        raise MediaError(f"the prompt has {found} {placeholder} placeholder{'s' * (found != 1)} for {media} "
                         f"{spec.kind}{'s' * (media != 1)}")
    full = f"\n\n{id_to_token(spec.begin)}{placeholder * spec.count}{id_to_token(spec.end)}\n\n"
    return text.replace(placeholder, full)


def soft_token_starts(ids: list[int], spec: Placeholders, media: int) -> list[int]:
    """Where each item's run of `count` placeholder ids starts, in order."""
    runs: list[list[int]] = []  # [start, length] of each run of consecutive placeholders
    for i, t in enumerate(ids):
        if t != spec.token:
            continue
        if runs and sum(runs[-1]) == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    if len(runs) != media or any(n != spec.count for _, n in runs):
        found = sum(n for _, n in runs)
        raise MediaError(f"the prompt's {spec.kind} placeholders (id {spec.token}) must come in {media} run"
                         f"{'s' * (media != 1)} of {spec.count}, one per {spec.kind}; found {found} in "
                         f"{len(runs)} run{'s' * (len(runs) != 1)}")
    return [start for start, _ in runs]


def _refuse_placeholders(model: CompiledModel, ids: list[int], kind: str) -> None:
    """MediaError if a prompt given no `kind` media has `kind` placeholders: they would run as bare tokens.
    (With media, `expand_text` and `soft_token_starts` match the counts.)"""
    tokens = model.manifest.prompt_tokens
    if tokens is None:  # a folder without multimodal token ids has no placeholders
        return
    token = tokens.image_token_id if kind == IMAGE else tokens.audio_token_id
    found = sum(t == token for t in ids)
    if found:
        raise MediaError(f"the prompt has {found} {kind} placeholder{'s' * (found != 1)} (token id {token}) but no "
                         f"{kind} was given: give one {kind} per placeholder, or remove the placeholders")


def encode_image(model: CompiledModel, image) -> np.ndarray:
    """An image (file or Pillow image) -> its soft tokens [count, hidden]."""
    abi, _ = model.encoder(ENCODER[IMAGE])
    return model.encode(ENCODER[IMAGE], pixels(image, abi.preprocessing))


def encode_audio(model: CompiledModel, clip) -> np.ndarray:
    """A clip (WAV file, or float samples at the feature extractor's rate) -> its soft tokens [count, hidden]."""
    abi, _ = model.encoder(ENCODER[AUDIO])
    spec = abi.features
    features, mask = features_from_file(clip, spec) if isinstance(clip, (str, Path)) else log_mel(clip, spec)
    return model.encode(ENCODER[AUDIO], *pad_to_frames(features, mask, abi.frames))


def prompt_embeddings(model: CompiledModel, ids: list[int], images: list, audios: list
                      ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The embedding overrides (embeds [len(ids), hidden], mask [len(ids)]) of a prompt whose placeholders
    are expanded; (None, None) for a text prompt without multimodal ids. The placeholders must match the
    media given, both ways (MediaError), which is checked before any encoder runs."""
    groups = []  # (placeholders, where each item's run starts, the items, their encoder)
    for kind, items, encode in ((IMAGE, images, encode_image), (AUDIO, audios, encode_audio)):
        if items:
            spec = placeholders(model, kind)
            groups.append((spec, soft_token_starts(ids, spec, len(items)), items, encode))
        else:
            _refuse_placeholders(model, ids, kind)
    rows = {i: row for i, t in enumerate(ids) if (row := model.token_embedding(t)) is not None}
    if not rows and not groups:
        return None, None
    embeds = np.zeros((len(ids), model.hidden_size), dtype=np.float32)
    mask = np.zeros(len(ids), dtype=bool)
    for i, row in rows.items():
        embeds[i], mask[i] = row, True
    for spec, starts, items, encode in groups:
        for start, item in zip(starts, items):
            embeds[start:start + spec.count] = encode(model, item)
            mask[start:start + spec.count] = True
    return embeds, mask


def media_in_messages(messages: list[dict]) -> tuple[list, list]:
    """The images and audio clips of chat messages, in order: parts {"type": "image", "image": PATH} and
    {"type": "audio", "audio": PATH} (transformers' chat format)."""
    found = {IMAGE: [], AUDIO: []}
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in found:
                if part.get(kind) is None:
                    raise MediaError(f"a {kind!r} part needs its file under the key {kind!r}: "
                                     f"{{'type': {kind!r}, {kind!r}: PATH}}")
                value = part[kind]
                found[kind].append(Path(value) if isinstance(value, str) else value)
    return found[IMAGE], found[AUDIO]
