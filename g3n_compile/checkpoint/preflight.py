"""Every fault of a checkpoint folder that shows without reading tensor data, found in seconds: g3n-compile runs
`check_checkpoint` before the export (minutes for E2B), so a bad file is one error line up front, not after it.

Opening the folder (`Checkpoint`) has validated config.json's text config, the shard index and every safetensors
header. This adds: the tensors' names and shapes against the config (text and towers, on models built on the
meta device), the towers' configs and preprocessor_config.json, the stop and multimodal token ids, and the
tokenizer files (tokenizer.json read by the runtime's own reader, tokenizer_config.json, the chat template
parsed and rendered on a one-message chat).
"""

from __future__ import annotations

import reprlib
from dataclasses import asdict
from pathlib import Path

import jinja2
import torch

from runtime.errors import one_line
from runtime.tokenizer import Tokenizer, TokenizerError

from ..model.config import ConfigError
from ..model.multimodal_config import prompt_tokens
from ..model.text import Gemma3nTextModel
from .folder import Checkpoint, CheckpointError
from .names import check_sizes, text_tensor_names
from .towers import check_towers

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"  # overrides tokenizer_config.json's chat_template, as in transformers
MAX_TOKENIZER_BYTES = 256 * 1024 * 1024  # Gemma 3n's tokenizer.json is 33 MB
MAX_TEMPLATE_BYTES = 1024 * 1024  # Gemma 3n's chat template is 2 KB


def check_checkpoint(ckpt: Checkpoint) -> None:
    """Raise one CheckpointError (one line) for the first fault in the folder that shows without tensor data."""
    vocab = ckpt.config.vocab_size
    for i, eos in enumerate(ckpt.config.eos_token_id):
        if eos >= vocab:
            raise CheckpointError(f"{ckpt.folder / 'config.json'}: eos_token_id[{i}]: {eos} is outside the "
                                  f"vocabulary (vocab_size={vocab})")
    # Not sizes: a window and a context may exceed every tensor dimension of a small model.
    check_sizes(ckpt, ckpt.config, "text_config.", exempt=("sliding_window", "max_position_embeddings"))
    with torch.device("meta"):
        text_tensor_names(ckpt, Gemma3nTextModel(ckpt.config))
    tokenizer = _check_tokenizer_files(ckpt)
    if check_towers(ckpt):
        _check_media_tokens(ckpt, tokenizer)


def _check_media_tokens(ckpt: Checkpoint, tokenizer: Tokenizer | None) -> None:
    """config.json's image/audio marker and placeholder ids: in the vocabulary, distinct, and tokens of the
    tokenizer (the runtime writes them as text and encodes that back)."""
    try:
        tokens = prompt_tokens(ckpt.raw_config, ckpt.config.vocab_size)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.folder}: {e}") from None
    for name, token_id in asdict(tokens).items() if tokenizer is not None else ():
        text = tokenizer.id_to_token(token_id)
        if text is None or tokenizer.token_to_id(text) != token_id:
            raise CheckpointError(f"{ckpt.folder}: config.json: {name}: {token_id} is not a token of "
                                  f"{TOKENIZER_JSON} (it reads {text!r}); config and tokenizer do not match")


def _check_tokenizer_files(ckpt: Checkpoint) -> Tokenizer | None:
    """tokenizer_config.json, the chat template and tokenizer.json, as compile and the runtime read them; the
    tokenizer (None when the folder has no tokenizer.json: benchmark checkpoints feed token ids)."""
    folder = ckpt.folder
    tok_cfg = ckpt.json(TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else {}
    if not isinstance(tok_cfg, dict):
        raise CheckpointError(f"{folder / TOKENIZER_CONFIG}: expected a JSON object")
    for key, kind, cls in (("chat_template", "a string (or chat_template.jinja)", str),
                           ("add_bos_token", "true or false", bool)):
        if tok_cfg.get(key) is not None and not isinstance(tok_cfg[key], cls):
            raise CheckpointError(f"{folder / TOKENIZER_CONFIG}: {key}: expected {kind}, "
                                  f"got {reprlib.repr(tok_cfg[key])}")
    template, source = tok_cfg.get("chat_template"), folder / TOKENIZER_CONFIG
    if (folder / CHAT_TEMPLATE).is_file():
        source = folder / CHAT_TEMPLATE
        template = _read_template(source)
    if template is not None:
        try:
            jinja2.Environment().parse(template)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(f"{source}: the chat template does not parse (template line {e.lineno}: "
                                  f"{one_line(e.message, 200)})") from None
    if not (folder / TOKENIZER_JSON).is_file():
        return None
    if (folder / TOKENIZER_JSON).stat().st_size > MAX_TOKENIZER_BYTES:
        raise CheckpointError(f"{folder / TOKENIZER_JSON}: larger than {MAX_TOKENIZER_BYTES} bytes; not a tokenizer")
    bos = ckpt.config.bos_token_id
    try:
        tokenizer = Tokenizer(folder, bos, tok_cfg.get("add_bos_token", True), template)
    except TokenizerError as e:  # its message names the file and why
        raise CheckpointError(str(e)) from None
    if tokenizer.id_to_token(bos) is None:
        raise CheckpointError(f"{folder / 'config.json'}: bos_token_id {bos} is not a token of {TOKENIZER_JSON}")
    if template is not None:
        try:
            tokenizer.render_chat([{"role": "user", "content": "Hello"}])
        except Exception as e:  # noqa: BLE001 - a template is code: whatever it raises, it is the template's fault
            raise CheckpointError(f"{source}: the chat template fails on a one-message chat "
                                  f"({type(e).__name__}: {one_line(e, 200)})") from None
    return tokenizer


def _read_template(path: Path) -> str:
    if path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_TEMPLATE_BYTES} bytes; not a chat template")
    try:
        return path.read_bytes().decode()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start})") from None
