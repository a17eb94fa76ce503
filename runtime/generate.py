"""KV-cached generation over a compiled folder: the Python API other apps embed.

    from runtime import load
    llm = load("out/tiny-random")                       # or load(folder, device="vulkan") / "cuda:1"
    print(llm.generate("Once upon a time", max_new_tokens=32).text)
    for piece in llm.chat([{"role": "user", "content": "Hi!"}], stream=True):
        print(piece, end="", flush=True)
    llm.chat([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                           {"type": "audio", "audio": "question.wav"},
                                           {"type": "text", "text": "Answer the question about the picture."}]}])
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .media import AUDIO, IMAGE, expand_text, media_in_messages, placeholders, prompt_embeddings
from .module import CompiledModel, ModelError
from .sampling import GREEDY, Sampler, SamplingParams
from .tokenizer import Tokenizer


@dataclass
class Generation:
    input_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = ""  # "stop_token", "max_new_tokens" or "context"
    timings: dict = field(default_factory=dict)
    logits: list[np.ndarray] = field(default_factory=list)  # per generated token, when asked for


class LLM:
    def __init__(self, folder: str | Path, device: str | None = None, target: str | None = None):
        self.model = CompiledModel(folder, device=device, target=target)
        m = self.model.manifest
        tok = m.tokenizer
        has_tokenizer = any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        # Without tokenizer files the model still runs on token ids (text comes back empty).
        self.tokenizer = Tokenizer(Path(folder), tok.bos_token_id, tok.add_bos_token, tok.chat_template) \
            if has_tokenizer else None
        self.stop_ids = set(m.stop_token_ids)

    # -- public API ----------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], max_new_tokens: int = 128, sampling: SamplingParams = GREEDY,
                 stream: bool = False, on_token: Callable[[str], None] | None = None, keep_logits: bool = False,
                 ignore_eos: bool = False, images: list = (), audios: list = ()):
        """Continue a raw prompt (text, or token ids). stream=True returns an iterator of text pieces;
        otherwise a `Generation`. ignore_eos generates exactly max_new_tokens (within the context).
        `images` (files or Pillow images) and `audios` (WAV files, or 16 kHz float samples) go where the
        prompt has their placeholders: one `<image_soft_token>` / `<audio_soft_token>` each in a text
        prompt (expanded as the processor does), the expanded runs in a token-id prompt."""
        if isinstance(prompt, str):
            ids = self._encode_with_media(prompt, images, audios, raw=True)
        else:
            ids = list(prompt)
        return self._run(ids, max_new_tokens, sampling, stream, on_token, keep_logits, ignore_eos, images, audios)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, sampling: SamplingParams = GREEDY,
             stream: bool = False, on_token: Callable[[str], None] | None = None):
        """Answer a conversation ([{"role": "user"|"assistant"|"system", "content": ...}]) rendered with
        the model's chat template. Content is a string or a list of parts: {"type": "text", "text": ...},
        {"type": "image", "image": PATH} and {"type": "audio", "audio": PATH}, as in transformers."""
        images, audios = media_in_messages(messages)
        return self._run(self.chat_ids(messages), max_new_tokens, sampling, stream, on_token, False, False, images,
                         audios)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """A conversation's prompt as token ids, with its images and audio expanded to their placeholders
        (the ids `generate(ids, images=..., audios=...)` takes)."""
        images, audios = media_in_messages(messages)
        return self._encode_with_media(self.require_tokenizer().render_chat(messages), images, audios, raw=False)

    def _encode_with_media(self, text: str, images: list, audios: list, raw: bool) -> list[int]:
        """Token ids of `text` after the processor's placeholder expansion; a raw prompt gets <bos> first
        (the chat template writes its own)."""
        tok = self.require_tokenizer()
        for kind, items in ((IMAGE, images), (AUDIO, audios)):
            if items:
                text = expand_text(text, placeholders(self.model, kind), len(items), tok.id_to_token)
        return tok.encode(text, add_bos=None if raw else False)

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ModelError(f"{self.model.folder} has no tokenizer files: give the prompt as token ids")
        return self.tokenizer

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t not in self.stop_ids]) if self.tokenizer else ""

    # -- the loop ------------------------------------------------------------------------------------
    def _run(self, ids, max_new_tokens, sampling, stream, on_token, keep_logits, ignore_eos=False, images=(),
             audios=()):
        self._check_prompt(ids)
        t0 = time.perf_counter()
        embeds = prompt_embeddings(self.model, ids, list(images), list(audios))
        result = Generation(input_ids=list(ids), timings={"encode_s": time.perf_counter() - t0})
        pieces = self._loop(result, embeds, max_new_tokens, sampling, keep_logits,
                            set() if ignore_eos else self.stop_ids)
        if stream:
            return pieces
        for piece in pieces:
            if on_token:
                on_token(piece)
        return result

    def _check_prompt(self, ids: list[int]) -> None:
        m = self.model
        if not ids:
            raise ModelError("the prompt is empty")
        bad = [i for i in ids if not 0 <= i < m.vocab_size]
        if bad:
            raise ModelError(f"token ids out of the vocabulary (0..{m.vocab_size - 1}): {bad[:5]}")
        if len(ids) >= m.max_context:
            tokens = m.manifest.prompt_tokens
            placeholder_ids = {tokens.image_token_id, tokens.audio_token_id} if tokens else set()
            soft = sum(t in placeholder_ids for t in ids)
            media = f" ({soft} of them image/audio soft tokens)" if soft else ""
            raise ModelError(f"the prompt has {len(ids)} tokens{media} but the module's context is {m.max_context} "
                             f"(leaving no room to generate); recompile with a larger --max-context")

    def _step(self, token: int, position: int) -> np.ndarray:
        """The logits after `token` at `position`. A multimodal token id (the model may generate
        `<end_of_image>`, ...) is embedded by its embedder, which decode cannot do: it goes through prefill."""
        row = self.model.token_embedding(token)
        if row is None:
            return self.model.decode(token, position)
        return self.model.prefill([token], position, row[None], np.ones(1, dtype=bool))

    def _loop(self, result: Generation, embeds, max_new_tokens: int, sampling: SamplingParams, keep_logits: bool,
              stop_ids: set[int]) -> Iterator[str]:
        m, sample = self.model, Sampler(sampling)
        ids = result.input_ids
        t0 = time.perf_counter()
        logits = m.prefill(ids, 0, *embeds)
        t_prefill = time.perf_counter() - t0
        history, emitted, position = list(ids), "", len(ids)
        t_decode = 0.0
        result.stop_reason = "max_new_tokens"
        for step in range(max_new_tokens):
            token = sample(logits, history)
            if keep_logits:
                result.logits.append(logits)
            if step == 0:
                result.timings["ttft_s"] = time.perf_counter() - t0 + result.timings["encode_s"]  # with the encoders
            result.output_ids.append(token)
            history.append(token)
            if token in stop_ids:
                result.stop_reason = "stop_token"
                break
            text = self._text(result.output_ids)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                piece, emitted = text[len(emitted):], text
                result.text = text
                if piece:
                    yield piece
            if step == max_new_tokens - 1:
                break
            if position >= m.max_context:
                result.stop_reason = "context"
                break
            t1 = time.perf_counter()
            logits = self._step(token, position)
            t_decode += time.perf_counter() - t1
            position += 1
        result.text = self._text(result.output_ids)
        if result.text != emitted and result.text.startswith(emitted):
            yield result.text[len(emitted):]
        decoded = max(len(result.output_ids) - 1, 0)
        result.timings.update(prefill_s=t_prefill, prefill_tokens_per_s=len(ids) / t_prefill if t_prefill else 0.0,
                              decode_s=t_decode, decode_tokens_per_s=decoded / t_decode if t_decode else 0.0)


def load(folder: str | Path, device: str | None = None, target: str | None = None) -> LLM:
    """Load a g3n output folder (g3n.json + <target>.vmfb + model.irpa + tokenizer). `device`: cpu, vulkan,
    cuda (`:N` for the Nth such device) or an IREE driver name; default: the folder's first module."""
    return LLM(folder, device=device, target=target)
