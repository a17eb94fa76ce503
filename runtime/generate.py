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

import os
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .media import AUDIO, IMAGE, expand_text, media_in_messages, placeholders, prompt_embeddings
from .module import CompiledModel, ModelError
from .sampling import GREEDY, Sampler, SamplingParams
from .tokenizer import Tokenizer, TokenizerError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class RequestError(ModelError, ValueError):
    """A generate/chat call whose arguments cannot be used; the message says which and why."""


@dataclass
class Generation:
    input_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = ""  # "stop_token", "max_new_tokens" or "context"
    timings: dict = field(default_factory=dict)
    logits: list[np.ndarray] = field(default_factory=list)  # per generated token, when asked for


class LLM:
    """A loaded folder. One generation runs at a time (the KV caches are the module's globals): calls from
    other threads wait their turn; a stream holds the model from its first piece until it ends, fails or is
    closed, and a second generation started in the same thread meanwhile is an error (waiting would never end)."""

    def __init__(self, folder: str | Path, device: str | None = None, target: str | None = None):
        self.model = CompiledModel(folder, device=device, target=target)
        self.stop_ids = set(self.model.manifest.stop_token_ids)
        self._tokenizer: Tokenizer | None = None
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread generating, while one is

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The folder's tokenizer, read on first use (so a prompt of token ids runs even beside a broken
        tokenizer file); None for a folder without tokenizer files."""
        folder = self.model.folder
        if self._tokenizer is None and any((folder / f).is_file() for f in TOKENIZER_FILES):
            tok = self.model.manifest.tokenizer
            self._tokenizer = Tokenizer(folder, tok.bos_token_id, tok.add_bos_token, tok.chat_template)
        return self._tokenizer

    # -- public API ----------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], max_new_tokens: int = 128, sampling: SamplingParams = GREEDY,
                 stream: bool = False, on_token: Callable[[str], None] | None = None, keep_logits: bool = False,
                 ignore_eos: bool = False, images: list = (), audios: list = ()):
        """Continue a raw prompt (text, or a sequence of int token ids). stream=True returns an iterator of
        text pieces; otherwise a `Generation`. ignore_eos generates exactly max_new_tokens (within the
        context). `images` (files or Pillow images) and `audios` (WAV files, or 16 kHz float samples) go where
        the prompt has their placeholders: one `<image_soft_token>` / `<audio_soft_token>` each in a text
        prompt (expanded as the processor does), the expanded runs in a token-id prompt."""
        ids = self._encode_with_media(prompt, images, audios) if isinstance(prompt, str) else _token_ids(prompt)
        return self._run(ids, max_new_tokens, sampling, stream, on_token, keep_logits, ignore_eos, images, audios)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, sampling: SamplingParams = GREEDY,
             stream: bool = False, on_token: Callable[[str], None] | None = None):
        """Answer a conversation ([{"role": "user"|"assistant"|"system", "content": ...}]) rendered with
        the model's chat template. Content is a string or a list of parts: {"type": "text", "text": ...},
        {"type": "image", "image": PATH} and {"type": "audio", "audio": PATH}, as in transformers. The
        messages' text is plain text: a typed `<end_of_turn>` is not a turn marker."""
        images, audios = media_in_messages(messages)
        return self._run(self.chat_ids(messages), max_new_tokens, sampling, stream, on_token, False, False, images,
                         audios)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """A conversation's prompt as token ids, with its images and audio expanded to their placeholders
        (the ids `generate(ids, images=..., audios=...)` takes)."""
        images, audios = media_in_messages(messages)
        tok = self.require_tokenizer()
        return tok.encode_chat(self._expand(tok.render_chat(messages), images, audios))

    def _encode_with_media(self, text: str, images: list, audios: list) -> list[int]:
        """Token ids of a raw prompt after the processor's placeholder expansion, <bos> first."""
        return self.require_tokenizer().encode(self._expand(text, images, audios))

    def _expand(self, text: str, images: list, audios: list) -> str:
        for kind, items in ((IMAGE, images), (AUDIO, audios)):
            if items:
                text = expand_text(text, placeholders(self.model, kind), len(items), self.tokenizer.id_to_token)
        return text

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ModelError(f"{self.model.folder} has no tokenizer files: give the prompt as token ids")
        return self.tokenizer

    def _stable_text(self) -> StableText:
        """The output's text without the stop tokens; "" without a readable tokenizer (a prompt of token ids
        still runs: its output ids are the result)."""
        try:
            tok = self.tokenizer
        except TokenizerError:
            tok = None
        if tok is None:
            return StableText(lambda ids: "", lambda token: False)
        return StableText(lambda ids: tok.decode([t for t in ids if t not in self.stop_ids]), tok.is_byte)

    # -- the loop ------------------------------------------------------------------------------------
    def _run(self, ids, max_new_tokens, sampling, stream, on_token, keep_logits, ignore_eos=False, images=(),
             audios=()):
        self._check_prompt(ids)
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(sampling, SamplingParams):
            raise RequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        result = Generation(input_ids=list(ids))
        pieces = self._generation(result, list(images), list(audios), max_new_tokens, sampling, keep_logits,
                                  set() if ignore_eos else self.stop_ids)
        if stream:
            return pieces
        with closing(pieces):  # an on_token that raises ends the generation (and frees the model) at once
            for piece in pieces:
                if on_token:
                    on_token(piece)
        return result

    @contextmanager
    def _turn(self):
        """This thread's turn on the model (see the class doc)."""
        me = threading.get_ident()
        if self._holder == me:
            raise RequestError("this model is already generating in this thread (an unfinished stream): finish "
                               "or close that stream before starting another generation")
        with self._lock:
            self._holder = me
            try:
                yield
            finally:
                self._holder = None

    def _generation(self, result: Generation, images: list, audios: list, *loop_args) -> Iterator[str]:
        with self._turn():
            t0 = time.perf_counter()
            embeds = prompt_embeddings(self.model, result.input_ids, images, audios)
            result.timings["encode_s"] = time.perf_counter() - t0
            yield from self._loop(result, embeds, *loop_args)

    def _check_prompt(self, ids: list[int]) -> None:
        m = self.model
        if not ids:
            raise RequestError("the prompt is empty")
        bad = [i for i in ids if not 0 <= i < m.vocab_size]
        if bad:
            raise RequestError(f"token ids out of the vocabulary (0..{m.vocab_size - 1}): {bad[:5]}")
        if len(ids) >= m.max_context:
            tokens = m.manifest.prompt_tokens
            placeholder_ids = {tokens.image_token_id, tokens.audio_token_id} if tokens else set()
            soft = sum(t in placeholder_ids for t in ids)
            media = f" ({soft} of them image/audio soft tokens)" if soft else ""
            raise RequestError(f"the prompt has {len(ids)} tokens{media} but the module's context is "
                               f"{m.max_context} (leaving no room to generate); recompile with a larger --max-context")

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
        history, position = list(ids), len(ids)
        text = self._stable_text()
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
            if piece := text.add(result.output_ids):
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
        result.text, rest = text.finish(result.output_ids)
        if rest:
            yield rest
        decoded = max(len(result.output_ids) - 1, 0)
        result.timings.update(prefill_s=t_prefill, prefill_tokens_per_s=len(ids) / t_prefill if t_prefill else 0.0,
                              decode_s=t_decode, decode_tokens_per_s=decoded / t_decode if t_decode else 0.0)


class StableText:
    """The text of a growing list of token ids, given out only where it can no longer change, so that the
    pieces add up to the final text. A decoder may rewrite the end of its text when tokens follow: a run of
    byte tokens decodes as one UTF-8 string (valid bytes turn into U+FFFD when an invalid one joins them), and
    some decoders clean up a space before punctuation. So the text of the last token, or of the trailing run
    of byte tokens, is held back, as is a partial character."""

    def __init__(self, decode: Callable[[list[int]], str], is_byte: Callable[[int], bool]):
        self.decode, self.is_byte, self.emitted = decode, is_byte, ""

    def add(self, ids: list[int]) -> str:
        """The next piece of text that can no longer change, after `ids` (the ids so far); maybe ""."""
        held = len(ids) - 1
        while held > 0 and self.is_byte(ids[held]) and self.is_byte(ids[held - 1]):
            held -= 1
        stable = os.path.commonprefix([self.decode(ids[:held]), self.decode(ids)]).rstrip("\ufffd")
        if len(stable) <= len(self.emitted) or not stable.startswith(self.emitted):
            return ""
        piece, self.emitted = stable[len(self.emitted):], stable
        return piece

    def finish(self, ids: list[int]) -> tuple[str, str]:
        """(the final text, the part of it not given out yet)."""
        text = self.decode(ids)
        return text, text[len(self.emitted):] if text.startswith(self.emitted) else ""


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _token_ids(prompt) -> list[int]:
    """A token-id prompt as a list of ints: a sequence of Python or numpy integers, nothing else (bytes,
    floats, bools and digit strings are not token ids)."""
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise RequestError(f"a prompt must be text (str) or a list of int token ids, got {type(prompt).__name__}; "
                           f"decode bytes to str first")
    try:
        ids = list(prompt)
    except TypeError:
        raise RequestError(f"a prompt must be text (str) or a list of int token ids, got "
                           f"{type(prompt).__name__}") from None
    bad = next((t for t in ids if not _is_int(t)), None)
    if bad is not None:
        raise RequestError(f"token ids must be integers, got {bad!r} ({type(bad).__name__}) in the prompt")
    return [int(t) for t in ids]


def load(folder: str | Path, device: str | None = None, target: str | None = None) -> LLM:
    """Load a g3n output folder (g3n.json + <target>.vmfb + model.irpa + tokenizer). `device`: cpu, vulkan,
    cuda (`:N` for the Nth such device) or an IREE driver name; default: the folder's first module."""
    return LLM(folder, device=device, target=target)
