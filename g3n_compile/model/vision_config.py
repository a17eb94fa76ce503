"""Gemma 3n vision configuration: the MobileNetV5 architecture and the vision embedder, from config.json.

The Hub's `vision_config` only names the encoder (`"architecture": "mobilenetv5_300m_enc"`, a timm
model); its blocks are fixed by that name and written out here (`MOBILENETV5_300M`). A checkpoint may
instead describe a MobileNetV5 of its own (the tiny random test models do):

    "vision_config": {"architecture": "mobilenetv5", "hidden_size": 64, ...,
                      "g3n_arch": {"stem_size": 8, "msfa_output_resolution": 4,
                                   "stages": [["er_k3_s2_e4_c16", ...], ["uir_a3_k5_s2_e6_c24", ...], ...]}}

Blocks are written in timm's MobileNet notation, `<kind>_<key><value>_...`:
    er   edge residual: k expansion-conv kernel, s stride, e expansion, c output channels
    uir  universal inverted residual: a leading depthwise kernel (0: none), k middle depthwise kernel
         (0: none), s, e, c
    mqa  mobile multi-query attention: h heads, d key/value width, v key/value stride (a depthwise
         k x k down-convolution when 2), c
An optional `r<n>` repeats a block n times. Only a stage's first block strides, and it must (the fusion
adapter reads the last two stage outputs).

The embedder fields come from `vision_config` (`vocab_size`, `vocab_offset`, `rms_norm_eps`) and the top
level (`vision_soft_tokens_per_image`); its output width is the text model's `hidden_size`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, config_int, config_number

MOBILENETV5_300M_NAME = "mobilenetv5_300m_enc"
CUSTOM_NAME = "mobilenetv5"
NORM_EPS = 1e-6  # every RMSNorm2d in the encoder (timm's default; not in config.json)
MAX_BLOCKS = 1000  # mobilenetv5_300m_enc has 84; a config asking for more is corrupt, not a bigger model


@dataclass(frozen=True)
class Block:
    kind: str  # "er" | "uir" | "mqa"
    out_channels: int
    stride: int = 1
    expansion: float = 1.0
    kernel: int = 0  # er: expansion conv; uir: middle depthwise conv; mqa: key/value down-conv
    start_kernel: int = 0  # uir: leading depthwise conv
    num_heads: int = 0  # mqa
    head_dim: int = 0  # mqa: width of the one key/value head and of each query head
    kv_stride: int = 1  # mqa

    @property
    def spec(self) -> str:
        """The block in timm's notation."""
        e = f"{self.expansion:g}"
        if self.kind == "er":
            return f"er_k{self.kernel}_s{self.stride}_e{e}_c{self.out_channels}"
        if self.kind == "uir":
            return f"uir_a{self.start_kernel}_k{self.kernel}_s{self.stride}_e{e}_c{self.out_channels}"
        return (f"mqa_k{self.kernel}_h{self.num_heads}_v{self.kv_stride}_s{self.stride}_d{self.head_dim}"
                f"_c{self.out_channels}")


@dataclass(frozen=True)
class MobileNetV5Arch:
    stem_channels: int
    stages: tuple[tuple[Block, ...], ...]
    msfa_output_resolution: int  # the encoder's output is this many pixels square: resolution^2 soft tokens

    def to_dict(self) -> dict[str, Any]:
        return {"stem_size": self.stem_channels, "msfa_output_resolution": self.msfa_output_resolution,
                "stages": [[b.spec for b in stage] for stage in self.stages]}


def mid_channels(in_channels: int, expansion: float) -> int:
    """A block's expanded width: in * e rounded to a multiple of 8, never more than 10% down (as MobileNets do)."""
    v = in_channels * expansion
    rounded = max(8, int(v + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * v else rounded


# ---- parsing ---------------------------------------------------------------------------------------

_KEYS = {"er": {"k", "s", "e", "c"}, "uir": {"a", "k", "s", "e", "c"}, "mqa": {"k", "h", "v", "s", "d", "c"}}
_REQUIRED = {"er": {"k", "c"}, "uir": {"k", "c"}, "mqa": {"h", "d", "c"}}


def parse_block(spec: str, where: str) -> tuple[Block, int]:
    """One block string -> (block, repeat count `r`, default 1)."""
    kind, *ops = spec.split("_") if isinstance(spec, str) else ("",)
    if kind not in _KEYS:
        raise ConfigError(f"{where}: {spec!r} is not a block (expected 'er_...', 'uir_...' or 'mqa_...')")
    values = {}
    for op in ops:
        m = re.fullmatch(r"([a-z]+)(\d+(?:\.\d+)?)", op)
        if not m or m.group(1) not in _KEYS[kind] | {"r"}:
            raise ConfigError(f"{where}: {spec!r}: {op!r} is not a {kind} option "
                              f"(expected {', '.join(sorted(_KEYS[kind]))})")
        key, value = m.groups()
        if key != "e" and "." in value:
            raise ConfigError(f"{where}: {spec!r}: {op!r}: {key} must be a whole number")
        values[key] = float(value) if key == "e" else int(value)
    missing = _REQUIRED[kind] - values.keys()
    if missing:
        raise ConfigError(f"{where}: {spec!r} lacks {', '.join(sorted(missing))}")
    block = Block(kind=kind, out_channels=values["c"], stride=values.get("s", 1), expansion=values.get("e", 1.0),
                  kernel=values.get("k", 3 if kind == "mqa" else 0), start_kernel=values.get("a", 0),
                  num_heads=values.get("h", 0), head_dim=values.get("d", 0), kv_stride=values.get("v", 1))
    return block, values.get("r", 1)


def parse_arch(d: Any, scope: str) -> MobileNetV5Arch:
    if not isinstance(d, dict):
        raise ConfigError(f"{scope[:-1]}: expected an object with stem_size, stages, msfa_output_resolution")
    for key in ("stem_size", "stages", "msfa_output_resolution"):
        if key not in d:
            raise ConfigError(f"{scope}{key}: missing")
    stages = d["stages"]
    if not isinstance(stages, list) or not all(isinstance(s, list) and s for s in stages):
        raise ConfigError(f"{scope}stages: expected a list of non-empty lists of block strings")
    parsed, total = [], 0
    for i, stage in enumerate(stages):
        blocks = []
        for j, spec in enumerate(stage):
            block, repeat = parse_block(spec, f"{scope}stages[{i}][{j}]")
            total += repeat
            if total > MAX_BLOCKS:  # checked before the repeat is expanded: each block becomes a module
                raise ConfigError(f"{scope}stages: more than {MAX_BLOCKS} blocks (stages[{i}][{j}] {spec!r})")
            blocks += [block] * repeat
        parsed.append(tuple(blocks))
    arch = MobileNetV5Arch(config_int(scope, "stem_size", d["stem_size"]), tuple(parsed),
                           config_int(scope, "msfa_output_resolution", d["msfa_output_resolution"]))
    validate_arch(arch, scope)
    return arch


def validate_arch(arch: MobileNetV5Arch, scope: str) -> None:
    if len(arch.stages) < 2:
        raise ConfigError(f"{scope}stages: the fusion adapter needs at least 2 stages, got {len(arch.stages)}")
    if arch.stem_channels % 8:
        raise ConfigError(f"{scope}stem_size: {arch.stem_channels} is not a multiple of 8")
    for i, stage in enumerate(arch.stages):
        for j, b in enumerate(stage):
            where = f"{scope}stages[{i}][{j}] {b.spec!r}"
            if b.stride != (2 if j == 0 else 1):
                raise ConfigError(f"{where}: stride must be {2 if j == 0 else 1} (only, and every, stage's first "
                                  "block strides)")
            if b.out_channels < 8 or b.out_channels % 8:
                raise ConfigError(f"{where}: output channels must be a positive multiple of 8")
            if b.expansion <= 0:
                raise ConfigError(f"{where}: expansion must be positive")
            if b.kind == "er" and b.kernel < 1:
                raise ConfigError(f"{where}: needs a kernel k >= 1")
            if b.kind == "uir" and b.stride > 1 and not (b.kernel or b.start_kernel):
                raise ConfigError(f"{where}: a strided block needs a depthwise conv (a or k)")
            if b.kind == "mqa":
                if b.num_heads < 1 or b.head_dim < 1 or b.kv_stride not in (1, 2) or b.kernel < 1:
                    raise ConfigError(f"{where}: needs h >= 1, d >= 1, k >= 1 and v of 1 or 2")
                if j == 0:
                    raise ConfigError(f"{where}: an attention block cannot start a stage (it does not stride)")


def _stage(*specs: str) -> tuple[Block, ...]:
    return tuple(parse_block(s, MOBILENETV5_300M_NAME)[0] for s in specs)


# timm's `mobilenetv5_300m_enc`: 84 blocks, about 294 M parameters.
MOBILENETV5_300M = MobileNetV5Arch(
    stem_channels=64,
    stages=(
        _stage("er_k3_s2_e4_c128", *["er_k3_s1_e4_c128"] * 2),
        _stage("uir_a3_k5_s2_e6_c256", "uir_a5_k0_s1_e4_c256", "uir_a3_k0_s1_e4_c256", "uir_a5_k0_s1_e4_c256",
               "uir_a3_k0_s1_e4_c256"),
        _stage("uir_a5_k5_s2_e6_c640", *["uir_a5_k0_s1_e4_c640"] * 7, "uir_a0_k0_s1_e1_c640",
               *["mqa_k3_h12_v2_s1_d64_c640", "uir_a0_k0_s1_e2_c640"] * 14),
        _stage("uir_a5_k5_s2_e6_c1280", *["mqa_k3_h16_v1_s1_d96_c1280", "uir_a0_k0_s1_e2_c1280"] * 19),
    ),
    msfa_output_resolution=16,
)
MOBILENETV5_300M_WIDTH = 2048  # timm's encoder always fuses to 2048 channels


# ---- the config ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionConfig:
    architecture: str
    arch: MobileNetV5Arch
    hidden_size: int  # the encoder's output channels, the embedder's input width
    text_hidden_size: int  # the embedder's output width
    soft_tokens: int  # tokens per image: msfa_output_resolution^2
    vocab_size: int = 128  # rows of the embedder's own table (ids vocab_offset ..)
    vocab_offset: int = 262_144
    rms_norm_eps: float = 1e-6  # the embedder's norms

    def __post_init__(self):
        s = "config.json: vision_config."
        for name in ("hidden_size", "text_hidden_size", "vocab_size"):
            config_int(s, name, getattr(self, name))
        config_int(s, "vocab_offset", self.vocab_offset, minimum=0)
        config_number(s, "rms_norm_eps", self.rms_norm_eps)
        if self.architecture == MOBILENETV5_300M_NAME and self.hidden_size != MOBILENETV5_300M_WIDTH:
            raise ConfigError(f"{s}hidden_size: {MOBILENETV5_300M_NAME} outputs {MOBILENETV5_300M_WIDTH} channels, "
                              f"not {self.hidden_size}")
        r = self.arch.msfa_output_resolution
        if self.soft_tokens != r * r:
            raise ConfigError(f"config.json: vision_soft_tokens_per_image: {self.soft_tokens} does not match the "
                              f"encoder's {r}x{r} output ({r * r} tokens)")

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "VisionConfig":
        """From a multimodal (`Gemma3nForConditionalGeneration`) config.json."""
        v = raw.get("vision_config") if isinstance(raw, dict) else None
        if not isinstance(v, dict) or not v:
            raise ConfigError("config.json: vision_config: missing (a text-only checkpoint has no vision tower)")
        text = raw.get("text_config")
        if not isinstance(text, dict) or "hidden_size" not in text:
            raise ConfigError("config.json: text_config.hidden_size: missing (the vision embedder projects to it)")
        scope = "config.json: vision_config."
        name = v.get("architecture", MOBILENETV5_300M_NAME)
        if name == MOBILENETV5_300M_NAME:
            if "g3n_arch" in v:
                raise ConfigError(f"{scope}g3n_arch: only with architecture {CUSTOM_NAME!r}; "
                                  f"{MOBILENETV5_300M_NAME!r} is fixed")
            arch = MOBILENETV5_300M
        elif name == CUSTOM_NAME:
            arch = parse_arch(v.get("g3n_arch"), scope + "g3n_arch.")
        else:
            raise ConfigError(f"{scope}architecture: {name!r} is not supported "
                              f"(expected {MOBILENETV5_300M_NAME!r}, or {CUSTOM_NAME!r} with g3n_arch)")

        def field(key, default):
            return v[key] if v.get(key) is not None else default

        return cls(architecture=name, arch=arch, hidden_size=field("hidden_size", MOBILENETV5_300M_WIDTH),
                   text_hidden_size=text["hidden_size"],
                   soft_tokens=raw.get("vision_soft_tokens_per_image", arch.msfa_output_resolution ** 2),
                   vocab_size=field("vocab_size", 128), vocab_offset=field("vocab_offset", 262_144),
                   rms_norm_eps=field("rms_norm_eps", 1e-6))

    def to_hf_dict(self) -> dict[str, Any]:
        """The entries this config adds to a multimodal config.json: `vision_config` and the token count."""
        v = {"model_type": "gemma3n_vision", "architecture": self.architecture, "hidden_size": self.hidden_size,
             "vocab_size": self.vocab_size, "vocab_offset": self.vocab_offset, "rms_norm_eps": self.rms_norm_eps,
             "do_pooling": False}
        if self.architecture == CUSTOM_NAME:
            v["g3n_arch"] = self.arch.to_dict()
        return {"vision_config": v, "vision_soft_tokens_per_image": self.soft_tokens}


def custom_config(arch: MobileNetV5Arch, hidden_size: int, text_hidden_size: int, **embedder) -> VisionConfig:
    """A vision config for a MobileNetV5 of one's own (tiny test models)."""
    validate_arch(arch, "g3n_arch.")
    return VisionConfig(CUSTOM_NAME, arch, hidden_size, text_hidden_size, arch.msfa_output_resolution ** 2,
                        **embedder)


# A MobileNetV5 with every kind of block and every code path of the real one (TF-SAME strided convs,
# strided and plain attention keys, nearest upsampling, average-pooled fusion) in a few thousand weights:
# 128 x 128 pixels -> 4 x 4 = 16 soft tokens.
TINY_MOBILENETV5 = MobileNetV5Arch(
    stem_channels=8,
    stages=(
        _stage("er_k3_s2_e4_c16", "er_k3_s1_e4_c16"),
        _stage("uir_a3_k5_s2_e6_c24", "uir_a5_k0_s1_e4_c24", "uir_a3_k0_s1_e4_c24"),
        _stage("uir_a5_k5_s2_e6_c32", "uir_a0_k0_s1_e1_c32", "mqa_k3_h2_v2_s1_d8_c32", "uir_a0_k0_s1_e2_c32"),
        _stage("uir_a5_k5_s2_e6_c48", "mqa_k3_h3_v1_s1_d8_c48", "uir_a0_k0_s1_e2_c48"),
    ),
    msfa_output_resolution=4,
)
TINY_IMAGE_SIZE = 128
