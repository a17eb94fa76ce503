"""Gemma 3n's vision path in export-ready PyTorch: the MobileNetV5 encoder and the vision embedder.

    pixels [B, 3, H, W] in [0, 1]
      -> MobileNetV5: stem conv, stages of edge-residual / universal-inverted-residual / multi-query
         attention blocks, and a multi-scale fusion adapter over the last two stages -> [B, D, r, r]
      -> r*r soft tokens [B, r*r, D], times sqrt(D)
      -> the embedder's soft path (RMSNorm, projection to the text width, RMSNorm without scale)
      -> [B, r*r, text_hidden] embeddings that take the place of the image placeholder tokens.

Faithful to timm's `mobilenetv5_300m_enc` (what transformers runs through `TimmWrapperModel`, without
pooling) and to `Gemma3nModel.get_image_features` + `Gemma3nMultimodalEmbedder`, but written for
`torch.export`: shapes are static, TensorFlow's 'SAME' padding is worked out in Python from the static
input size, attention is plain matmuls over one shared key/value head.

The encoder computes in its weights' dtype (timm's RMSNorm2d does not upcast); the embedder in float32
(the text model's RMSNorm and Linear). Module and parameter names mirror the Hugging Face checkpoint
(`model.` stripped: `vision_tower.timm_model.*`, `embed_vision.*`), so loading is a name-for-name copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embedder import MultimodalEmbedder
from .vision_config import NORM_EPS, Block, MobileNetV5Arch, VisionConfig, mid_channels



def gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation, written out: IREE's lowering of `aten.gelu(approximate="tanh")` is off by
    5e-5 (llvm-cpu, f32), these plain ops by 1e-6; in eager both are within 3e-7 of each other."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) of one spatial dim: the output has ceil(size / stride)
    pixels; an odd total puts the extra pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2d(nn.Module):
    """A convolution with 'SAME' padding (symmetric for stride 1, asymmetric where TF-SAME is)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, depthwise: bool = False,
                 bias: bool = False):
        super().__init__()
        self.stride, self.groups = stride, in_channels if depthwise else 1
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // self.groups, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        k = self.weight.shape[-1]
        (top, bottom), (left, right) = (same_padding(s, k, self.stride) for s in x.shape[-2:])
        if (top, left) == (bottom, right):
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), groups=self.groups)
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, groups=self.groups)


class RMSNorm2d(nn.Module):
    """RMS norm over the channels of NCHW, in the input dtype; optionally followed by GELU (tanh).

    `sums_by_matmul` (set by `sum_channels_by_matmul`) computes the mean of squares as a matmul with rows of
    1/C: the same value, in a form IREE 3.13's SPIR-V codegen compiles (its subgroup reduction over the
    channels leaves a vector accumulator it cannot legalize). One row fails the same way; four do not."""

    sums_by_matmul = False

    def __init__(self, channels: int, act: bool = False):
        super().__init__()
        self.act = act
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.sums_by_matmul:
            n, c, h, w = x.shape
            rows = torch.full((1, 4, c), 1.0 / c, dtype=x.dtype, device=x.device)
            mean_square = torch.matmul(rows, (x * x).reshape(n, c, h * w))[:, :1].reshape(n, 1, h, w)
        else:
            mean_square = x.pow(2).mean(1, keepdim=True)
        x = x * torch.rsqrt(mean_square + NORM_EPS) * self.weight.view(1, -1, 1, 1)
        return gelu_tanh(x) if self.act else x


def sum_channels_by_matmul(model: nn.Module, enabled: bool) -> None:
    """Switch every RMSNorm2d in `model` to (or back from) its matmul form."""
    for module in model.modules():
        if isinstance(module, RMSNorm2d):
            module.sums_by_matmul = enabled


class ConvNorm(nn.Module):
    """conv -> RMSNorm2d (-> GELU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, depthwise: bool = False,
                 act: bool = True, bias: bool = False):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, kernel, stride, depthwise, bias)
        self.bn = RMSNorm2d(out_channels, act)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class LayerScale(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


# ---- blocks ----------------------------------------------------------------------------------------


class EdgeResidual(nn.Module):
    """Full k x k expansion conv (strided) -> norm+GELU -> 1x1 projection -> norm, plus the input when shapes allow."""

    def __init__(self, in_channels: int, b: Block):
        super().__init__()
        mid = mid_channels(in_channels, b.expansion)
        self.skip = in_channels == b.out_channels and b.stride == 1
        self.conv_exp = Conv2d(in_channels, mid, b.kernel, b.stride)
        self.bn1 = RMSNorm2d(mid, act=True)
        self.conv_pwl = Conv2d(mid, b.out_channels, 1)
        self.bn2 = RMSNorm2d(b.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv_pwl(self.bn1(self.conv_exp(x))))
        return x + y if self.skip else y


class UniversalInvertedResidual(nn.Module):
    """[depthwise a x a -> norm] -> 1x1 expansion -> norm+GELU -> [depthwise k x k (strided) -> norm+GELU]
    -> 1x1 projection -> norm -> [layer scale], plus the input when shapes allow. With a = k = 0 it is a
    plain pointwise FFN."""

    def __init__(self, in_channels: int, out_channels: int, start_kernel: int, kernel: int, stride: int,
                 expansion: float, layer_scale: bool = True, residual: bool = True):
        super().__init__()
        mid = mid_channels(in_channels, expansion)
        self.skip = residual and in_channels == out_channels and stride == 1
        # The stride goes to the middle conv if there is one, else to the leading one.
        self.dw_start = ConvNorm(in_channels, in_channels, start_kernel, 1 if kernel else stride, depthwise=True,
                                 act=False) if start_kernel else None
        self.pw_exp = ConvNorm(in_channels, mid, 1)
        self.dw_mid = ConvNorm(mid, mid, kernel, stride, depthwise=True) if kernel else None
        self.pw_proj = ConvNorm(mid, out_channels, 1, act=False)
        self.layer_scale = LayerScale(out_channels) if layer_scale else None

    @classmethod
    def from_block(cls, in_channels: int, b: Block) -> "UniversalInvertedResidual":
        return cls(in_channels, b.out_channels, b.start_kernel, b.kernel, b.stride, b.expansion)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dw_start(x) if self.dw_start is not None else x
        y = self.pw_exp(y)
        if self.dw_mid is not None:
            y = self.dw_mid(y)
        y = self.pw_proj(y)
        if self.layer_scale is not None:
            y = self.layer_scale(y)
        return x + y if self.skip else y


class Projection(nn.Module):
    """A 1x1 conv, after an optional strided depthwise down-conv + norm (the attention's keys and values)."""

    def __init__(self, in_channels: int, out_channels: int, down_kernel: int = 0, down_stride: int = 1):
        super().__init__()
        self.down_conv = Conv2d(in_channels, in_channels, down_kernel, down_stride, depthwise=True) \
            if down_stride > 1 else None
        self.norm = RMSNorm2d(in_channels) if down_stride > 1 else None
        self.proj = Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.down_conv is not None:
            x = self.norm(self.down_conv(x))
        return self.proj(x)


class MultiQueryAttention(nn.Module):
    """`heads` query heads over one key/value head, the keys/values optionally at half resolution."""

    def __init__(self, channels: int, out_channels: int, b: Block):
        super().__init__()
        self.heads, self.head_dim = b.num_heads, b.head_dim
        self.query = Projection(channels, b.num_heads * b.head_dim)
        self.key = Projection(channels, b.head_dim, b.kernel, b.kv_stride)
        self.value = Projection(channels, b.head_dim, b.kernel, b.kv_stride)
        self.output = Projection(b.num_heads * b.head_dim, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        batch, _, h, w = x.shape
        d = self.head_dim
        # Query channel head*d + j -> [B, heads*HW, d]: every head's queries against the same keys.
        q = self.query(x).reshape(batch, self.heads, d, h * w).transpose(2, 3).reshape(batch, self.heads * h * w, d)
        k = self.key(x).flatten(2)  # [B, d, M]
        v = self.value(x).flatten(2).transpose(1, 2)  # [B, M, d]
        probs = torch.softmax(torch.matmul(q, k) * d**-0.5, dim=-1)
        out = torch.matmul(probs, v).reshape(batch, self.heads, h * w, d)
        # Back to channels head*d + j at each pixel.
        out = out.permute(0, 1, 3, 2).reshape(batch, self.heads * d, h, w)
        return self.output(out)


class MobileAttention(nn.Module):
    """norm -> multi-query attention -> layer scale, plus the input."""

    def __init__(self, in_channels: int, b: Block):
        super().__init__()
        self.skip = in_channels == b.out_channels
        self.norm = RMSNorm2d(in_channels)
        self.attn = MultiQueryAttention(in_channels, b.out_channels, b)
        self.layer_scale = LayerScale(b.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.layer_scale(self.attn(self.norm(x)))
        return x + y if self.skip else y


def make_block(in_channels: int, b: Block) -> nn.Module:
    if b.kind == "er":
        return EdgeResidual(in_channels, b)
    if b.kind == "uir":
        return UniversalInvertedResidual.from_block(in_channels, b)
    return MobileAttention(in_channels, b)


class MultiScaleFusionAdapter(nn.Module):
    """The last two stage outputs, the coarser upsampled (nearest) to the finer, concatenated, through a
    pointwise FFN, brought to resolution x resolution (average pooling when it divides, else bilinear),
    normalised."""

    def __init__(self, in_channels: int, out_channels: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.ffn = UniversalInvertedResidual(in_channels, out_channels, 0, 0, 1, 2.0, layer_scale=False,
                                             residual=False)
        self.norm = RMSNorm2d(out_channels)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        size = tuple(inputs[0].shape[-2:])
        x = torch.cat([t if tuple(t.shape[-2:]) == size else F.interpolate(t, size=size, mode="nearest")
                       for t in inputs], dim=1)
        x = self.ffn(x)
        r = self.resolution
        if size != (r, r):
            if size[0] % r or size[1] % r:
                x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
            else:
                x = F.avg_pool2d(x, kernel_size=(size[0] // r, size[1] // r))
        return self.norm(x)


class MobileNetV5(nn.Module):
    """The encoder: pixels [B, 3, H, W] -> features [B, width, r, r]."""

    def __init__(self, arch: MobileNetV5Arch, width: int):
        super().__init__()
        self.conv_stem = ConvNorm(3, arch.stem_channels, 3, stride=2, bias=True)
        channels, stage_outputs = arch.stem_channels, []
        self.blocks = nn.ModuleList()
        for stage in arch.stages:
            blocks = nn.ModuleList()
            for b in stage:
                blocks.append(make_block(channels, b))
                channels = b.out_channels
            self.blocks.append(blocks)
            stage_outputs.append(channels)
        self.msfa = MultiScaleFusionAdapter(sum(stage_outputs[-2:]), width, arch.msfa_output_resolution)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.conv_stem(pixels.to(self.conv_stem.conv.weight.dtype))
        outputs = []
        for stage in self.blocks:
            for block in stage:
                x = block(x)
            outputs.append(x)
        return self.msfa(outputs[-2:])


# ---- the embedder and the whole path ---------------------------------------------------------------


class Gemma3nVisionModel(nn.Module):
    """pixels [B, 3, H, W] -> soft-token embeddings [B, soft_tokens, text_hidden]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        # As in the checkpoint: transformers' TimmWrapperModel keeps timm's model as `timm_model`.
        self.vision_tower = nn.ModuleDict({"timm_model": MobileNetV5(cfg.arch, cfg.hidden_size)})
        self.embed_vision = MultimodalEmbedder(cfg)

    @property
    def encoder(self) -> MobileNetV5:
        return self.vision_tower["timm_model"]

    def image_tokens(self, pixels: Tensor) -> Tensor:
        """The encoder output as tokens [B, r*r, hidden] (row-major pixels), before the embedder."""
        features = self.encoder(pixels)
        return features.flatten(2).transpose(1, 2)

    def forward(self, pixels: Tensor) -> Tensor:
        # get_image_features scales the tokens by sqrt(hidden) before the embedder's norm.
        return self.embed_vision.soft(self.image_tokens(pixels) * self.config.hidden_size**0.5)
