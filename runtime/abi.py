"""The module ABI, declared once: what g3n-compile writes into an output folder and the runtime reads.

On disk it is `g3n.json`; here it is types. The export builds its entry points from `text_functions`,
`audio_function` and `vision_function`; the compile driver fills in a `Manifest` and writes it; passes find
arguments by name (`Function.index`); the runtime reads the manifest back and calls each function with its
arguments in the order its `Function` lists them. Torch-free, so apps that only run models import it too.

    prefill(input_ids i64[1, C], per_layer_rows f32[1, C, L*P], start i64[1], length i64[1],
            embeds f32[1, C, H], embeds_mask i1[1, C])                                 -> logits f32[1, 1, V]
    decode (input_ids i64[1, 1], per_layer_rows f32[1, 1, L*P], start i64[1])            -> logits f32[1, 1, V]
    audio  (features f32[1, F, mel bins], mask i1[1, F])           -> soft_tokens f32[1, soft tokens, H]
    encode_image(pixels f32[1, 3, S, S])                           -> soft_tokens f32[1, soft tokens, H]

The text functions are public wrappers of private `<name>_step` functions (`step_symbol`), which hold the
computation and take the KV caches as trailing arguments; the wrappers load the caches from module globals
(`KvCache.global_name`) and store them back, so the caches stay on the device between calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audio import LogMelSpec
from .errors import UserError
from .image import ImagePreprocessing

FORMAT = "g3n-module"
# Bumped when a change makes folders written before it unreadable; folders without the field predate the typed
# ABI (g3n.json's layout before it) and are told to recompile.
ABI_VERSION = 1
MANIFEST = "g3n.json"


class ManifestError(UserError, ValueError):
    """A g3n.json that this runtime cannot use; the message says why and what to do."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy's name: int64, float32, bool
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Function:
    name: str
    args: tuple[Tensor, ...]
    results: tuple[Tensor, ...]
    doc: str = ""

    def index(self, arg: str) -> int:
        """The position of argument `arg`."""
        names = [a.name for a in self.args]
        if arg not in names:
            raise KeyError(f"{self.name} has no argument {arg!r} (it takes {', '.join(names)})")
        return names.index(arg)

    def arg(self, name: str) -> Tensor:
        return self.args[self.index(name)]


def step_symbol(function: str) -> str:
    """The private function that holds text function `function`'s computation, caches as trailing arguments."""
    return f"{function}_step"


def text_functions(chunk: int, per_layer_width: int, hidden: int, vocab: int) -> dict[str, Function]:
    """`prefill` (a chunk of `chunk` tokens) and `decode` (one token)."""
    logits = (Tensor("logits", "float32", (1, 1, vocab)),)
    prefill = Function("prefill", (
        Tensor("input_ids", "int64", (1, chunk)), Tensor("per_layer_rows", "float32", (1, chunk, per_layer_width)),
        Tensor("start", "int64", (1,)), Tensor("length", "int64", (1,)),
        Tensor("embeds", "float32", (1, chunk, hidden)), Tensor("embeds_mask", "bool", (1, chunk))), logits,
        "tokens start..start+length-1 (the rest of the chunk is padding); logits of the last real one. Where "
        "embeds_mask is True, embeds replaces the token's embedding (soft tokens, multimodal token ids)")
    decode = Function("decode", (
        Tensor("input_ids", "int64", (1, 1)), Tensor("per_layer_rows", "float32", (1, 1, per_layer_width)),
        Tensor("start", "int64", (1,))), logits, "one token at position start")
    return {"prefill": prefill, "decode": decode}


def audio_function(frames: int, mel_bins: int, soft_tokens: int, hidden: int) -> Function:
    return Function("audio", (Tensor("features", "float32", (1, frames, mel_bins)), Tensor("mask", "bool", (1, frames))),
                    (Tensor("soft_tokens", "float32", (1, soft_tokens, hidden)),),
                    "one clip's log-mel features zero-padded to `frames` (mask False there) -> the embeddings of its "
                    "soft-token placeholders, positions past the clip holding the audio padding embedding")


def vision_function(image_size: int, soft_tokens: int, hidden: int) -> Function:
    return Function("encode_image", (Tensor("pixels", "float32", (1, 3, image_size, image_size)),),
                    (Tensor("soft_tokens", "float32", (1, soft_tokens, hidden)),),
                    "one image's pixels -> the embeddings of its soft-token placeholders")


# ---- the parts of a manifest ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheLayer:
    layer: int
    kind: str  # sliding_attention | full_attention
    slots: int
    ring: bool  # position p lives in slot p % slots
    shape: tuple[int, ...]


@dataclass(frozen=True)
class KvCache:
    storage: str
    layers: tuple[CacheLayer, ...]  # the KV-owning layers, in order; each has a k and a v global
    shared: dict[str, int]  # KV-shared layer -> the layer whose cache it reads

    STORAGE = "module globals kv_cache_0.. (k, v per KV-owning layer), updated in place"

    @staticmethod
    def global_name(index: int) -> str:
        """The module global of cache tensor `index`: k of layers[i] is 2i, v is 2i + 1."""
        return f"kv_cache_{index}"


@dataclass(frozen=True)
class PerLayerRows:
    """The per-layer-embedding table, which the runtime gathers on the host and passes as `per_layer_rows`."""

    parameter: str
    dtype: str
    shape: tuple[int, int]
    rule: str = "row = id if 0 <= id < shape[0] else 0; gathered on the host, passed as float32"


@dataclass(frozen=True)
class TokenTable:
    """The multimodal token ids' own embeddings (their embedders' hard path), passed to prefill as embeds."""

    parameter: str
    first_id: int
    dtype: str
    shape: tuple[int, int]
    rule: str = ("an id in first_id .. first_id + rows - 1 is embedded as row id - first_id (its embedder's hard "
                 "path), passed to prefill as an embeds override")


@dataclass(frozen=True)
class PromptTokens:
    """The ids Gemma 3n's processor writes around the soft tokens: an image is `\\n\\n<boi>` + soft-token
    placeholders (`image`) + `<eoi>\\n\\n`, audio likewise with boa/audio/eoa. The defaults are transformers'
    `Gemma3nConfig` (the E2B/E4B ids)."""

    boi_token_id: int = 255_999
    eoi_token_id: int = 262_144
    image_token_id: int = 262_145
    boa_token_id: int = 256_000
    eoa_token_id: int = 262_272
    audio_token_id: int = 262_273


@dataclass(frozen=True)
class TokenizerInfo:
    bos_token_id: int
    pad_token_id: int
    add_bos_token: bool
    chat_template: str | None


@dataclass(frozen=True)
class AudioEncoder:
    function: str
    frames: int  # fixed per module: 2997 hold 30 s
    soft_tokens: int
    args: tuple[Tensor, ...]
    results: tuple[Tensor, ...]
    features: LogMelSpec
    doc: str = ""

    @property
    def signature(self) -> Function:
        return Function(self.function, self.args, self.results, self.doc)


@dataclass(frozen=True)
class VisionEncoder:
    function: str
    image_size: int
    soft_tokens: int
    args: tuple[Tensor, ...]
    results: tuple[Tensor, ...]
    preprocessing: ImagePreprocessing
    doc: str = ""

    @property
    def signature(self) -> Function:
        return Function(self.function, self.args, self.results, self.doc)


@dataclass(frozen=True)
class Parameters:
    file: str
    scope: str
    archive_id: str  # random bytes, also stored in the archive under `archive_id_entry`
    archive_id_entry: str
    count: int


@dataclass(frozen=True)
class EncoderModule:
    file: str
    flags: tuple[str, ...]
    sha256: str
    bytes: int
    compile_s: float


@dataclass(frozen=True)
class TargetModule:
    file: str
    driver: str
    arch: str
    flags: tuple[str, ...]
    sha256: str
    bytes: int
    compile_s: float
    passes: tuple[dict, ...]  # per pass: name, enabled, stats, seconds
    encoders: dict[str, EncoderModule] = field(default_factory=dict)


@dataclass
class Manifest:
    """g3n.json. `parameters` and `targets` describe what the folder holds; the rest is the build, which every
    module of one folder shares with its archive."""

    g3n_version: str
    source: str
    source_fingerprint: str
    config: dict  # the text config, as transformers' Gemma3nTextConfig
    max_context: int
    prefill_chunk: int
    weight_dtype: str
    quantization: Any  # "none", or a dict describing the scheme
    activation_dtype: str
    functions: dict[str, Function]
    per_layer_rows: PerLayerRows
    kv_cache: KvCache
    tokenizer: TokenizerInfo
    stop_token_ids: tuple[int, ...]
    encoders: dict[str, AudioEncoder | VisionEncoder] = field(default_factory=dict)
    multimodal_tokens: TokenTable | None = None
    prompt_tokens: PromptTokens | None = None
    parameters: Parameters | None = None
    targets: dict[str, TargetModule] = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    format: str = FORMAT
    abi_version: int = ABI_VERSION

    # The fields every module of a folder shares with its model.irpa.
    BUILD = ("format", "abi_version", "g3n_version", "source", "source_fingerprint", "config", "max_context",
             "prefill_chunk", "weight_dtype", "quantization", "activation_dtype", "functions", "per_layer_rows",
             "kv_cache", "encoders", "multimodal_tokens", "prompt_tokens")

    def to_dict(self) -> dict:
        d = _to_json(self)
        return {"format": d.pop("format"), "abi_version": d.pop("abi_version"), **d}

    def same_build(self, other: "Manifest") -> bool:
        mine, theirs = self.to_dict(), other.to_dict()
        return all(mine[k] == theirs[k] for k in self.BUILD)

    def write(self, folder: Path) -> None:
        """Atomically: a reader sees the old manifest or the new one, never half of one."""
        path = Path(folder) / MANIFEST
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, raw: Any, where: str = MANIFEST) -> "Manifest":
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a g3n module manifest")
        version = raw.get("abi_version")  # absent: written before the ABI had a version
        if version != ABI_VERSION:
            written = f"module ABI {version}" if version is not None else "an unversioned module ABI"
            raise ManifestError(f"{where}: written by g3n {raw.get('g3n_version', '?')} with {written}; this g3n "
                                f"reads ABI {ABI_VERSION}: recompile the folder with g3n-compile")
        try:
            return _from_json(cls, raw, "")
        except (TypeError, ValueError, KeyError) as e:
            raise ManifestError(f"{where}: {e}; recompile the folder with g3n-compile") from None

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{folder}: not a g3n output folder (no {MANIFEST}); create one with g3n-compile")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, str(path))


def sha256_file(path: Path) -> str:
    """What ties a `.vmfb` to its manifest entry."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---- JSON <-> the dataclasses above --------------------------------------------------------------------


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _from_json(tp: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as type `tp`, checked; `where` names the field in errors."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:  # unions of dataclasses: the first whose fields fit
            try:
                return _from_json(option, value, where)
            except (TypeError, ValueError, KeyError):
                pass
        return _from_json(options[-1], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{where or 'top level'}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        known = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = set(value) - set(known)
        if unknown:
            raise KeyError(f"{where or 'top level'}: unknown fields {sorted(unknown)}")
        missing = [n for n, f in known.items() if n not in value and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise KeyError(f"{where or 'top level'}: missing {', '.join(missing)}")
        return tp(**{n: _from_json(hints[n], v, f"{where}.{n}".lstrip(".")) for n, v in value.items()})
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__}")
        item = args[0]
        return tuple(_from_json(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected an object, got {type(value).__name__}")
        return {k: _from_json(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected an object, got {type(value).__name__}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise TypeError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value
