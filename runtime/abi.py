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
import math
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


SLIDING, FULL = "sliding_attention", "full_attention"
# The text config's keys that the runtime and `Manifest.check` read, with their types; the rest of the config
# is carried along unread. Every count must be positive but those in `MAY_BE_ZERO`.
CONFIG_KEYS = {"vocab_size": int, "hidden_size": int, "num_hidden_layers": int, "hidden_size_per_layer_input": int,
               "vocab_size_per_layer_input": int, "num_key_value_heads": int, "head_dim": int, "sliding_window": int,
               "num_kv_shared_layers": int, "max_position_embeddings": int, "layer_types": tuple[str, ...]}
MAY_BE_ZERO = {"num_kv_shared_layers"}
TABLE_DTYPES = ("float32", "float16", "bfloat16")  # what the runtime reads from the archive on the host


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

    def check(self) -> None:
        """ValueError naming the first field that disagrees with the others (reading checks the types). The
        module is built for these numbers: a hand-edited max_context would run prompts past its KV caches."""
        c = _text_config(self.config)
        vocab, hidden, layers = c["vocab_size"], c["hidden_size"], c["num_hidden_layers"]
        _expect("prefill_chunk", self.prefill_chunk, range(1, self.max_context + 1), "1..max_context")
        _expect("max_context", self.max_context, range(1, c["max_position_embeddings"] + 1),
                "1..config.max_position_embeddings")
        _expect("weight_dtype", self.weight_dtype, TABLE_DTYPES, "one of " + ", ".join(TABLE_DTYPES))
        if self.quantization != "none" and not (isinstance(self.quantization, dict)
                                                and isinstance(self.quantization.get("weights"), str)):
            raise ValueError(f"quantization: expected \"none\" or an object naming its weights, got "
                             f"{self.quantization!r:.60}")
        rows = layers * c["hidden_size_per_layer_input"]
        _match_functions("functions", self.functions, text_functions(self.prefill_chunk, rows, hidden, vocab))
        self._check_kv_cache(c)
        _check_table("per_layer_rows", self.per_layer_rows, (c["vocab_size_per_layer_input"], rows))
        ids = {f"stop_token_ids[{i}]": t for i, t in enumerate(self.stop_token_ids)}
        ids.update({"tokenizer.bos_token_id": self.tokenizer.bos_token_id,
                    "tokenizer.pad_token_id": self.tokenizer.pad_token_id})
        if self.prompt_tokens is not None:
            ids.update((f"prompt_tokens.{k}", t) for k, t in _to_json(self.prompt_tokens).items())
        for where, token in ids.items():
            _expect(where, token, range(vocab), f"a token id below config.vocab_size ({vocab})")
        self._check_encoders(vocab, hidden)
        if self.parameters is not None:
            _file_name("parameters.file", self.parameters.file)
        for name, t in self.targets.items():
            modules = {"": t, **{f".encoders.{k}": e for k, e in t.encoders.items()}}
            for where, module in modules.items():
                _file_name(f"targets.{name}{where}.file", module.file, ".vmfb")
                if len(module.sha256) != 64 or not all(ch in "0123456789abcdef" for ch in module.sha256):
                    raise ValueError(f"targets.{name}{where}.sha256: not a sha256 digest")
            unknown = set(t.encoders) - set(self.encoders)
            if unknown:
                raise ValueError(f"targets.{name}.encoders: {', '.join(sorted(unknown))} not among encoders "
                                 f"({', '.join(self.encoders) or 'none'})")

    def _check_kv_cache(self, c: dict) -> None:
        """One cache per KV-owning layer, as the export lays them out (g3n_compile/model/text.py)."""
        layers, types = c["num_hidden_layers"], c["layer_types"]
        if len(types) != layers:
            raise ValueError(f"config.layer_types has {len(types)} entries; expected {layers} (num_hidden_layers)")
        for i, kind in enumerate(types):
            _expect(f"config.layer_types[{i}]", kind, (SLIDING, FULL), f"{SLIDING} or {FULL}")
        _expect("config.num_kv_shared_layers", c["num_kv_shared_layers"], range(layers), "below num_hidden_layers")
        owners = layers - c["num_kv_shared_layers"]
        got = self.kv_cache.layers
        _expect("kv_cache.layers", [entry.layer for entry in got], (list(range(owners)),),
                f"the KV-owning layers 0..{owners - 1}")
        for i, entry in enumerate(got):
            sliding = types[entry.layer] == SLIDING
            slots = min(c["sliding_window"], self.max_context) if sliding else self.max_context
            want = CacheLayer(entry.layer, types[entry.layer], slots, sliding,
                              (1, c["num_key_value_heads"], slots, c["head_dim"]))
            for f in dataclasses.fields(CacheLayer):
                _expect(f"kv_cache.layers[{i}].{f.name}", getattr(entry, f.name), (getattr(want, f.name),),
                        f"{getattr(want, f.name)} by max_context ({self.max_context}) and the config")
        _expect("kv_cache.shared", sorted(self.kv_cache.shared), (sorted(map(str, range(owners, layers))),),
                f"the KV-sharing layers {owners}..{layers - 1}")
        for layer, source in self.kv_cache.shared.items():
            _expect(f"kv_cache.shared.{layer}", source, [i for i in range(owners) if types[i] == types[int(layer)]],
                    f"an earlier layer of type {types[int(layer)]}")

    def _check_encoders(self, vocab: int, hidden: int) -> None:
        kinds = {"audio": AudioEncoder, "vision": VisionEncoder}
        for kind, encoder in self.encoders.items():
            if kind not in kinds:
                raise ValueError(f"encoders.{kind}: not an encoder this runtime knows (known: {', '.join(kinds)})")
            if not isinstance(encoder, kinds[kind]):
                raise ValueError(f"encoders.{kind}: holds the fields of a {type(encoder).__name__}")
            if isinstance(encoder, AudioEncoder):
                want = audio_function(encoder.frames, encoder.features.feature_size, encoder.soft_tokens, hidden)
            else:
                want = vision_function(encoder.image_size, encoder.soft_tokens, hidden)
                size = encoder.preprocessing.height, encoder.preprocessing.width
                _expect(f"encoders.{kind}.preprocessing", size, ((encoder.image_size,) * 2,),
                        f"image_size x image_size ({encoder.image_size})")
            _match_function(f"encoders.{kind}", encoder.signature, want)
        if self.encoders and (self.prompt_tokens is None or self.multimodal_tokens is None):
            raise ValueError("encoders are listed, but prompt_tokens or multimodal_tokens is missing")
        if self.multimodal_tokens is not None:
            table = self.multimodal_tokens
            _check_table("multimodal_tokens", table, (table.shape[0], hidden))
            _expect("multimodal_tokens.first_id", table.first_id, range(vocab - table.shape[0] + 1),
                    f"at most config.vocab_size - rows ({vocab - table.shape[0]})")

    def write(self, folder: Path) -> None:
        """Atomically: a reader sees the old manifest or the new one, never half of one."""
        path = Path(folder) / MANIFEST
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, raw: Any, where: str = MANIFEST) -> "Manifest":
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a g3n module manifest; recompile the folder with g3n-compile")
        version = raw.get("abi_version")  # absent: written before the ABI had a version
        if version != ABI_VERSION:
            written = f"module ABI {version!r}" if version is not None else "an unversioned module ABI"
            raise ManifestError(f"{where}: written by g3n {raw.get('g3n_version', '?')} with {written}; this g3n "
                                f"reads ABI {ABI_VERSION}: recompile the folder with g3n-compile")
        try:
            manifest = _from_json(cls, raw, "")
            manifest.check()
        except (TypeError, ValueError, KeyError) as e:  # KeyError's str() would quote the message
            raise ManifestError(f"{where}: {e.args[0]}; recompile the folder with g3n-compile") from None
        return manifest

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{folder}: not a g3n output folder (no {MANIFEST}); create one with g3n-compile")
        try:
            raw = json.loads(path.read_text())
        except (ValueError, RecursionError) as e:  # also not UTF-8, integers past Python's digit limit, deep nesting
            raise ManifestError(f"{path}: not valid JSON ({e}); recompile the folder with g3n-compile") from None
        return cls.from_dict(raw, str(path))


def _text_config(config: dict) -> dict:
    """The keys of `CONFIG_KEYS`, checked."""
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise KeyError(f"config: missing {', '.join(missing)}")
    checked = {k: _from_json(tp, config[k], f"config.{k}") for k, tp in CONFIG_KEYS.items()}
    for k, v in checked.items():
        if v == 0 and k not in MAY_BE_ZERO:
            raise ValueError(f"config.{k}: must be positive")
    return checked


def _expect(where: str, value: Any, allowed, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{where} is {value!r:.80}; expected {what}")


def _show(t: Tensor) -> str:
    return f"{t.name} {t.dtype}[{', '.join(map(str, t.shape))}]"


def _match_function(where: str, got: Function, want: Function) -> None:
    """ValueError naming the first argument or result of `got` that differs from `want` (docs aside)."""
    _expect(f"{where}.name", got.name, (want.name,), repr(want.name))
    for part in ("args", "results"):
        mine, theirs = getattr(got, part), getattr(want, part)
        _expect(f"{where}.{part}", len(mine), (len(theirs),), f"{len(theirs)} ({', '.join(map(_show, theirs))})")
        for i, (a, b) in enumerate(zip(mine, theirs)):
            if a != b:
                raise ValueError(f"{where}.{part}[{i}] is {_show(a)}; the sizes elsewhere in {MANIFEST} (config, "
                                 f"prefill_chunk, encoders) make it {_show(b)}")


def _match_functions(where: str, got: dict[str, Function], want: dict[str, Function]) -> None:
    _expect(where, sorted(got), (sorted(want),), ", ".join(want))
    for name, function in want.items():
        _match_function(f"{where}.{name}", got[name], function)


def _check_table(where: str, table: PerLayerRows | TokenTable, shape: tuple[int, ...]) -> None:
    _expect(f"{where}.dtype", table.dtype, TABLE_DTYPES, "one of " + ", ".join(TABLE_DTYPES))
    _expect(f"{where}.shape", table.shape, (shape,), f"{list(shape)} from the config")


def _file_name(where: str, name: str, suffix: str = "") -> None:
    """Files are named relative to the folder, and stay in it."""
    if not name.endswith(suffix) or Path(name).name != name or name.startswith("."):
        raise ValueError(f"{where} is {name!r:.80}; expected a {suffix or 'file'} name in the folder")


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


def _fields(tp: Any) -> tuple[set[str], set[str]]:
    """Dataclass `tp`'s field names, and those of them without a default."""
    fields = [f for f in dataclasses.fields(tp) if f.init]
    return ({f.name for f in fields},
            {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING})


def _from_json(tp: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as type `tp`, checked; `where` names the field in errors."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        # Unions of dataclasses: the one whose field names the object has, so that errors are about its fields.
        named = [o for o in options if isinstance(value, dict) and dataclasses.is_dataclass(o)
                 and _fields(o)[1] <= set(value) <= _fields(o)[0]]
        return _from_json(named[0] if len(named) == 1 else options[-1], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{where or 'top level'}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        known, required = _fields(tp)
        unknown = set(value) - known
        if unknown:
            raise KeyError(f"{where or 'top level'}: unknown fields {sorted(unknown)}")
        missing = required - set(value)
        if missing:
            raise KeyError(f"{where or 'top level'}: missing {', '.join(sorted(missing))}")
        return tp(**{n: _from_json(hints[n], v, f"{where}.{n}".lstrip(".")) for n, v in value.items()})
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__}")
        items = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(items) != len(value):
            raise ValueError(f"{where}: expected {len(items)} items, got {len(value)}")
        return tuple(_from_json(item, v, f"{where}[{i}]") for i, (item, v) in enumerate(zip(items, value)))
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
        raise TypeError(f"{where}: expected {tp.__name__}, got {value!r:.80}")
    # No count, size, index or id in a manifest is negative; JSON's NaN and Infinity are no settings.
    if tp is int and value < 0 or tp is float and not math.isfinite(value):
        raise ValueError(f"{where}: {value!r} is {'negative' if tp is int else 'not a finite number'}")
    return value
