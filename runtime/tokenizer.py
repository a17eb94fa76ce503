"""Tokenizer and chat template of a compiled folder: `tokenizer.json` (Hugging Face tokenizers), or
`tokenizer.model` (SentencePiece, if installed) where that is all there is; the Gemma chat template
from the checkpoint rendered with Jinja."""

from __future__ import annotations

from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import UserError


class TokenizerError(UserError, RuntimeError):
    pass


class Tokenizer:
    def __init__(self, folder: Path, bos_token_id: int, add_bos: bool = True, chat_template: str | None = None):
        folder = Path(folder)
        self.bos_token_id, self.add_bos, self.chat_template = bos_token_id, add_bos, chat_template
        if (folder / "tokenizer.json").is_file():
            self._tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            self._encode = lambda text: self._tok.encode(text, add_special_tokens=False).ids
            self._decode = lambda ids: self._tok.decode(ids, skip_special_tokens=True)
            self.token_to_id = self._tok.token_to_id
        elif (folder / "tokenizer.model").is_file():
            try:
                import sentencepiece  # optional: only for folders without tokenizer.json
            except ImportError:
                raise TokenizerError(f"{folder} has only tokenizer.model: `pip install sentencepiece` to read it") from None
            self._tok = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            self._encode = lambda text: self._tok.encode(text)
            self._decode = lambda ids: self._tok.decode(ids)
            self.token_to_id = lambda t: (lambda i: None if i == self._tok.unk_id() and t != "<unk>" else i)(self._tok.piece_to_id(t))
        else:
            raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model")

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._encode(text)
        return ([self.bos_token_id] if (self.add_bos if add_bos is None else add_bos) else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self._decode(list(ids))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this model has no chat template; use a plain prompt")
        def raise_exception(message):
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
        env.globals["raise_exception"] = raise_exception
        bos = self.id_to_token(self.bos_token_id)
        return env.from_string(self.chat_template).render(messages=messages, bos_token=bos,
                                                          add_generation_prompt=add_generation_prompt)

    def id_to_token(self, token_id: int) -> str:
        """The token's text as the vocabulary spells it (special tokens included: `<image_soft_token>`)."""
        if hasattr(self._tok, "id_to_token"):
            return self._tok.id_to_token(token_id)
        return self._tok.id_to_piece(token_id)
