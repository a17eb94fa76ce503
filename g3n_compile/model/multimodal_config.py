"""The parts of a multimodal Gemma 3n config.json outside the towers' own configs: the prompt's token ids, and
the whole file assembled from the text, audio and vision configs."""

from __future__ import annotations

from dataclasses import asdict, fields

from runtime.abi import PromptTokens

from .audio_config import AudioConfig
from .config import ConfigError, config_int
from .vision_config import VisionConfig


def prompt_tokens(raw: dict, vocab_size: int) -> PromptTokens:
    """The ids config.json's top level gives (defaults: transformers' Gemma3nConfig), each inside the vocabulary and
    distinct (the runtime tells images from audio, and markers from placeholders, by id)."""
    given = {f.name: config_int("config.json: ", f.name, raw[f.name], minimum=0)
             for f in fields(PromptTokens) if raw.get(f.name) is not None}
    ids = asdict(PromptTokens(**given))
    for name, value in ids.items():
        if value >= vocab_size:
            default = "" if name in given else " (the default, as it is not set)"
            raise ConfigError(f"config.json: {name}: {value}{default} is outside the vocabulary "
                              f"(text_config.vocab_size={vocab_size})")
        twin = next((other for other, v in ids.items() if v == value and other != name), None)
        if twin:
            raise ConfigError(f"config.json: {name}: {value} is also {twin}; each media token needs an id of its own")
    return PromptTokens(**ids)


def multimodal_config(text: dict, audio: AudioConfig, vision: VisionConfig, tokens: PromptTokens) -> dict:
    """A `Gemma3nForConditionalGeneration` config.json from the text config (`TextConfig.to_hf_dict()`)
    and the two towers' configs."""
    text = {**text, "model_type": "gemma3n_text"}
    text.pop("architectures", None)
    return {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n", "text_config": text,
            "audio_config": audio.to_hf_dict(), "audio_soft_tokens_per_image": audio.soft_tokens,
            **vision.to_hf_dict(), **asdict(tokens)}
