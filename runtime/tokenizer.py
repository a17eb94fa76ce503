"""Tokenizer and chat template of a compiled folder: `tokenizer.json` (Hugging Face tokenizers), or
`tokenizer.model` (SentencePiece, if installed) where that is all there is; the Gemma chat template
from the checkpoint rendered with Jinja."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import UserError

# Chat text that spells a special token (`<end_of_turn>` typed by a user) is rendered as `ESCAPE n ESCAPE_END`
# (private-use characters; the n-th escaped text), which `encode_chat` turns into that text's ordinary tokens.
ESCAPE, ESCAPE_END = "\ue000", "\ue001"
_ESCAPED = re.compile(f"{ESCAPE}([0-9]+){ESCAPE_END}")
_SURROGATE = re.compile("[\ud800-\udfff]")
_BYTE_PIECE = re.compile("<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token: a run of them decodes as one UTF-8 string


class TokenizerError(UserError, RuntimeError):
    pass


class Tokenizer:
    def __init__(self, folder: Path, bos_token_id: int, add_bos: bool = True, chat_template: str | None = None):
        folder = Path(folder)
        self.bos_token_id, self.add_bos, self.chat_template = bos_token_id, add_bos, chat_template
        if (folder / "tokenizer.json").is_file():
            self._tok = _read(folder / "tokenizer.json", HFTokenizer.from_file)
            self._encode = lambda text: self._tok.encode(text, add_special_tokens=False).ids
            self._decode = lambda ids: self._tok.decode(ids, skip_special_tokens=True)
            self.token_to_id = self._tok.token_to_id
            self.is_byte = lambda i: _BYTE_PIECE.fullmatch(self._tok.id_to_token(i) or "") is not None
            self._special_texts = lambda: [t.content for t in self._tok.get_added_tokens_decoder().values()
                                           if t.special]
        elif (folder / "tokenizer.model").is_file():
            try:
                import sentencepiece  # optional: only for folders without tokenizer.json
            except ImportError:
                raise TokenizerError(f"{folder} has only tokenizer.model: `pip install sentencepiece` to read it") from None
            self._tok = _read(folder / "tokenizer.model",
                              lambda path: sentencepiece.SentencePieceProcessor(model_file=path))
            self._encode = lambda text: self._tok.encode(text)
            self._decode = lambda ids: self._tok.decode(ids)
            self.token_to_id = lambda t: (lambda i: None if i == self._tok.unk_id() and t != "<unk>" else i)(self._tok.piece_to_id(t))
            self.is_byte = lambda i: 0 <= i < self._tok.get_piece_size() and self._tok.is_byte(i)
            self._special_texts = self._user_defined_pieces
        else:
            raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model")

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if bad := _SURROGATE.search(text):  # no UTF-8 text has them: bytes that were not UTF-8, as Python escapes them
            code = ord(bad[0])
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
            raise TokenizerError(f"the text is not valid UTF-8 ({what} after "
                                 f"{text[max(bad.start() - 20, 0):bad.start()]!r}): give UTF-8 text")
        ids = self._encode(text)
        return ([self.bos_token_id] if (self.add_bos if add_bos is None else add_bos) else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self._decode(list(ids))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation through the chat template, as text. Message text that spells a special token is
        escaped (see `encode_chat`): only the template's own markers are special tokens."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template; use a plain prompt")
        def raise_exception(message):
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
        env.globals["raise_exception"] = raise_exception
        bos = self.id_to_token(self.bos_token_id)
        return env.from_string(self.chat_template).render(messages=[self._escape(m) for m in messages], bos_token=bos,
                                                          add_generation_prompt=add_generation_prompt)

    def encode_chat(self, rendered: str) -> list[int]:
        """Token ids of `render_chat`'s text (no <bos> added: the template writes its own). An escaped piece of
        message text is encoded apart, split after its first character so that no special token matches it:
        a user who types `<end_of_turn>` gets those characters, not a turn marker."""
        pieces = _ESCAPED.split(rendered)  # template text, escape index, template text, ...
        ids = []
        for i, piece in enumerate(pieces):
            if i % 2:
                text = self._escapes[0][int(piece)]  # the special token's text, escaped in `render_chat`
                ids += self._encode(text[:1]) + self._encode(text[1:])
            elif piece:
                ids += self.encode(piece, add_bos=False)
        return ids

    def _escape(self, message):
        """`message` with the special tokens' texts (and the escape characters) in its text escaped."""
        if isinstance(message, str):
            _, index, pattern = self._escapes
            return pattern.sub(lambda m: f"{ESCAPE}{index[m[0]]}{ESCAPE_END}", message)
        if isinstance(message, dict):
            return {k: self._escape(v) if k in ("content", "text") else v for k, v in message.items()}
        if isinstance(message, list):
            return [self._escape(part) for part in message]
        return message

    @cached_property
    def _escapes(self) -> tuple[list[str], dict[str, int], re.Pattern]:
        """The texts to escape, their indices, and the pattern that finds them (longest first: `<start_of_image>`
        before `<s>`)."""
        texts = sorted(set(self._special_texts()) | {ESCAPE, ESCAPE_END}, key=lambda t: (-len(t), t))
        return texts, {t: i for i, t in enumerate(texts)}, re.compile("|".join(map(re.escape, texts)))

    def _user_defined_pieces(self) -> list[str]:
        """SentencePiece's user-defined symbols (matched whole in any text): the `<...>` pieces it encodes as
        themselves (its Python API does not say which pieces are user-defined)."""
        sp = self._tok
        candidates = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                      if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
        return [p for p in candidates if re.fullmatch(r"<[^<>\s]+>", p) and p in sp.encode(p, out_type=str)]

    def id_to_token(self, token_id: int) -> str:
        """The token's text as the vocabulary spells it (special tokens included: `<image_soft_token>`)."""
        if hasattr(self._tok, "id_to_token"):
            return self._tok.id_to_token(token_id)
        return self._tok.id_to_piece(token_id)


def _read(path: Path, reader):
    """The tokenizer `reader` makes of `path`; a file it cannot read is one error line."""
    try:
        return reader(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers and sentencepiece raise plain Exception/RuntimeError/OSError
        reason = " ".join(str(e).split())[:200]
        raise TokenizerError(f"{path}: not a readable tokenizer ({reason}); copy it again from the checkpoint "
                             f"(a prompt given as token ids runs without it)") from None
