"""Gemma 3n's audio tower (the USM conformer encoder) and audio embedder in export-ready PyTorch.

Faithful to transformers' `Gemma3nAudioEncoder` and `Gemma3nMultimodalEmbedder` (the tests hold them
to 1e-4 on random weights), written for `torch.export`:
  * shapes are static once the number of feature frames is fixed; padding is a mask input, never a
    shape, and no Python branches on tensor values;
  * the chunked local attention gathers its key blocks and relative-position terms with constant
    indices (no `unfold`, no pad-reshape-slice "relative shift");
  * masked frames are invisible: they are zeroed on input and after each subsampling conv, so a clip
    padded to any frame count encodes exactly as transformers encodes the clip alone. (transformers
    itself lets its subsampling convs see up to 6 frames of whatever padding a batch adds.)

`AudioModel(features, mask)` is what a prompt needs: the `soft_tokens` (188) embeddings that replace
the `<audio_soft_token>` placeholders, in the text model's width. Positions past the clip hold the
hard embedding of the last audio token id, as transformers pads them.

    features f32 [B, F, mel bins], mask bool [B, F] (True: a frame of the clip, a prefix)
      -> subsampling: 2 x (Conv2d stride 2 + cumulative group norm + ReLU), Linear   [B, ceil(F/4), H]
      -> conformer blocks: 1/2 FFN, local attention, light conv, 1/2 FFN, RMSNorm
      -> every 4th frame, the soft-token embedder, hard-embedding padding        [B, soft_tokens, D]

Module and parameter names mirror the checkpoint (`model.` stripped: `audio_tower.*`, `embed_audio.*`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .audio_config import AudioConfig
from .embedder import MultimodalEmbedder
from .layers import Linear, RMSNorm

# transformers builds these norms with the default eps whatever audio_config.rms_norm_eps says.
_DEFAULT_EPS = 1e-6


# ---- subsampling ----------------------------------------------------------------------------------


class CumulativeGroupNorm(nn.Module):
    """Normalises x [B, T, F, C] at each time step t by the mean and variance over (F, C) of steps 0..t,
    then scales per channel. The variance at t sums each step's squared deviation from that step's
    running mean, as transformers (and USM) do."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        t, per_step = x.shape[1], x.shape[2] * x.shape[3]
        count = (torch.arange(1, t + 1, dtype=torch.float32) * per_step).view(1, t, 1, 1)
        mean = torch.cumsum(x.sum(dim=(2, 3), keepdim=True), dim=1) / count
        var = torch.cumsum((x - mean).pow(2).sum(dim=(2, 3), keepdim=True), dim=1) / count
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.float()


class SubsampleConv(nn.Module):
    """Conv2d over (time, mel) with no bias, cumulative group norm, ReLU. Time is padded only after the
    clip (kernel - 1 frames, "reverse causal"), frequency by 1 on each side, as in transformers."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int], stride: tuple[int, int],
                 eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, bias=False)
        self.norm = CumulativeGroupNorm(out_channels, eps)
        self.time_stride = stride[0]

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C, T, F], valid [B, T] -> [B, C', ceil(T / stride), F'] with masked steps zeroed, and their mask."""
        x = F.pad(x, (1, 1, 0, self.conv.kernel_size[0] - 1))
        x = self.conv(x.to(self.conv.weight.dtype)).float()
        x = torch.relu(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        # Every stride-th frame, gathered rather than sliced: IREE's llvm-cpu backend cannot compile the
        # attention's gathers from a strided slice (LLVM translation fails on an i64 -> index cast).
        valid = valid.index_select(1, torch.arange(0, valid.shape[1], self.time_stride))
        return torch.where(valid[:, None, :, None], x, 0.0), valid


class SubsampleConvProjection(nn.Module):
    def __init__(self, c: AudioConfig):
        super().__init__()
        freq = c.input_feat_size
        in_channels = 1
        for i, (out_channels, kernel, stride) in enumerate(zip(c.sscp_conv_channel_size, c.sscp_conv_kernel_size,
                                                               c.sscp_conv_stride_size)):
            setattr(self, f"conv_{i}", SubsampleConv(in_channels, out_channels, kernel, stride,
                                                     c.sscp_conv_group_norm_eps))
            freq = (freq + 2 - kernel[1]) // stride[1] + 1
            in_channels = out_channels
        self.input_proj_linear = Linear(in_channels * freq, c.hidden_size)

    def forward(self, features: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        x, valid = self.conv_0(features[:, None], valid)
        x, valid = self.conv_1(x, valid)
        b, _, t, _ = x.shape
        return self.input_proj_linear(x.permute(0, 2, 3, 1).reshape(b, t, -1)), valid


# ---- conformer ------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """Half-step (residual weight 0.5) SiLU feed-forward of width 4 x hidden."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        self.clip, self.residual_weight = c.gradient_clipping, c.conf_residual_weight
        self.pre_layer_norm = RMSNorm(c.hidden_size, _DEFAULT_EPS)
        self.ffw_layer_1 = Linear(c.hidden_size, 4 * c.hidden_size)
        self.ffw_layer_2 = Linear(4 * c.hidden_size, c.hidden_size)
        self.post_layer_norm = RMSNorm(c.hidden_size, _DEFAULT_EPS)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pre_layer_norm(x.clamp(-self.clip, self.clip))
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(h))).clamp(-self.clip, self.clip)
        return x + self.post_layer_norm(h) * self.residual_weight


class RelativePositionEmbedding(nn.Module):
    """Projected sinusoids of the query-key distances a chunk can see, max_past down to -max_future."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        self.heads, self.head_dim = c.conf_num_attention_heads, c.head_dim
        self.pos_proj = Linear(c.hidden_size, c.hidden_size)
        distances = torch.arange(c.max_past, -c.conf_attention_context_right - 1, -1, device="cpu").float()
        timescales = c.hidden_size // 2
        inv_timescales = torch.exp(torch.arange(timescales, device="cpu") * -(math.log(1.0e4) / max(timescales - 1, 1)))
        angles = distances[:, None] * inv_timescales[None, :]
        self.register_buffer("signal", torch.cat([angles.sin(), angles.cos()], dim=-1), persistent=False)

    def forward(self) -> Tensor:
        """[distances, heads, head_dim]; row s is distance max_past - s."""
        return self.pos_proj(self.signal).view(-1, self.heads, self.head_dim)


class LocalAttention(nn.Module):
    """Chunked local self-attention: queries in chunks of W frames; a chunk's keys are its own frames
    plus max_past before and max_future after (C = W + max_past + max_future). Frame q sees frames k
    with q - max_past <= k <= q + max_future that are in the clip. Logits are q.k plus q.E[q - k]
    (E: relative-position embedding), soft-capped with tanh."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        self.heads, self.head_dim = c.conf_num_attention_heads, c.head_dim
        self.chunk, self.past, self.future = c.conf_attention_chunk_size, c.max_past, c.conf_attention_context_right
        self.context = self.chunk + self.past + self.future
        self.logit_cap = c.conf_attention_logit_cap
        self.relative_position_embedding = RelativePositionEmbedding(c)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))
        self.q_proj = Linear(c.hidden_size, c.hidden_size)
        self.k_proj = Linear(c.hidden_size, c.hidden_size)
        self.v_proj = Linear(c.hidden_size, c.hidden_size)
        # head_dim^-1/2 / softplus(0), so that a zero per_dim_scale means plain 1/sqrt(head_dim) (f32, as transformers).
        self.q_scale = (self.head_dim**-0.5 * (1.0 / F.softplus(torch.tensor(0.0, device="cpu")))).item()

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        b, t, _ = x.shape
        n, h, w, ctx = self.heads, self.head_dim, self.chunk, self.context
        blocks = -(-t // w)
        q = self.q_proj(x).view(b, t, n, h) * self.q_scale * F.softplus(self.per_dim_scale.float())
        k = self.k_proj(x).view(b, t, n, h)
        v = self.v_proj(x).view(b, t, n, h)

        # Query chunks [B, N, U, W, H]; key/value contexts [B, N, U, C, H]: context slot c of chunk u is
        # frame u*W + c - past (out-of-clip slots read frame 0 or t-1 and are masked).
        q = F.pad(q, (0, 0, 0, 0, 0, blocks * w - t)).view(b, blocks, w, n, h).permute(0, 3, 1, 2, 4)
        frame = torch.arange(blocks)[:, None] * w + torch.arange(ctx)[None, :] - self.past  # [U, C]
        source = frame.clamp(0, t - 1).reshape(-1)
        k = k.index_select(1, source).view(b, blocks, ctx, n, h).permute(0, 3, 1, 2, 4)
        v = v.index_select(1, source).view(b, blocks, ctx, n, h).permute(0, 3, 1, 2, 4)
        key_ok = ((frame >= 0) & (frame < t))[None] & valid.index_select(1, source).view(b, blocks, ctx)

        # Relative-position term: query slot i, key slot c are (past + i - c) frames apart, which is row
        # s = c - i of the embedding; only 0 <= s <= past + future is inside the window.
        emb = self.relative_position_embedding()  # [S, N, H]
        span = emb.shape[0]
        by_distance = torch.matmul(q.reshape(b, n, blocks * w, h), emb.permute(1, 2, 0)).view(b, n, blocks, w * span)
        offset = torch.arange(ctx)[None, :] - torch.arange(w)[:, None]  # s = c - i, [W, C]
        in_window = (offset >= 0) & (offset < span)
        pick = (torch.arange(w)[:, None] * span + offset.clamp(0, span - 1)).reshape(-1)
        position_logits = by_distance.index_select(3, pick).view(b, n, blocks, w, ctx)

        logits = torch.matmul(q, k.transpose(-1, -2)) + position_logits
        logits = torch.tanh(logits / self.logit_cap) * self.logit_cap
        allowed = in_window[None, None] & key_ok[:, None, :, None, :]  # [B, 1, U, W, C]
        logits = torch.where(allowed, logits, torch.finfo(torch.float32).min)
        out = torch.matmul(torch.softmax(logits, dim=-1), v)  # [B, N, U, W, H]
        return out.permute(0, 2, 3, 1, 4).reshape(b, blocks * w, n * h)[:, :t]


class ConformerAttention(nn.Module):
    def __init__(self, c: AudioConfig):
        super().__init__()
        self.clip = c.gradient_clipping
        self.pre_attn_norm = RMSNorm(c.hidden_size, _DEFAULT_EPS)
        self.attn = LocalAttention(c)
        self.post = Linear(c.hidden_size, c.hidden_size)
        self.post_norm = RMSNorm(c.hidden_size, _DEFAULT_EPS)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        h = self.attn(self.pre_attn_norm(x.clamp(-self.clip, self.clip)), valid)
        return x + self.post_norm(self.post(h).clamp(-self.clip, self.clip))


class LightConv1d(nn.Module):
    """GLU, causal depthwise conv over time (kernel K, K-1 frames of left padding), RMSNorm, SiLU."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        d, self.clip = c.hidden_size, c.gradient_clipping
        self.pre_layer_norm = RMSNorm(d, c.rms_norm_eps)
        self.linear_start = Linear(d, 2 * d)
        self.depthwise_conv1d = nn.Conv1d(d, d, c.conf_conv_kernel_size, groups=d, bias=False)
        self.conv_norm = RMSNorm(d, c.rms_norm_eps)
        self.linear_end = Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1).transpose(1, 2)
        h = F.pad(h, (self.depthwise_conv1d.kernel_size[0] - 1, 0)).to(self.depthwise_conv1d.weight.dtype)
        h = self.depthwise_conv1d(h).float().transpose(1, 2).clamp(-self.clip, self.clip)
        return x + self.linear_end(F.silu(self.conv_norm(h)))


class ConformerBlock(nn.Module):
    def __init__(self, c: AudioConfig):
        super().__init__()
        self.clip = c.gradient_clipping
        self.ffw_layer_start = FeedForward(c)
        self.attention = ConformerAttention(c)
        self.lconv1d = LightConv1d(c)
        self.ffw_layer_end = FeedForward(c)
        self.norm = RMSNorm(c.hidden_size, _DEFAULT_EPS)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = self.attention(self.ffw_layer_start(x), valid)
        x = self.lconv1d(torch.where(valid[..., None], x, 0.0))  # the causal conv must not read padding
        return self.norm(self.ffw_layer_end(x).clamp(-self.clip, self.clip))


class AudioEncoder(nn.Module):
    """`model.audio_tower`: features [B, F, mel bins] + mask [B, F] -> ([B, tokens, hidden], mask [B, tokens]),
    masked outputs zero."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        self.reduction = c.conf_reduction_factor
        self.subsample_conv_projection = SubsampleConvProjection(c)
        self.conformer = nn.ModuleList(ConformerBlock(c) for _ in range(c.conf_num_hidden_layers))

    def forward(self, features: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.where(valid[..., None], features.float(), 0.0)
        x, valid = self.subsample_conv_projection(x, valid)
        for block in self.conformer:
            x = block(x, valid)
        # Every reduction-th frame, gathered: a strided slice of the bool mask fails to compile for Vulkan.
        keep = torch.arange(0, x.shape[1], self.reduction)
        x, valid = x.index_select(1, keep), valid.index_select(1, keep)
        return torch.where(valid[..., None], x, 0.0), valid


class AudioModel(nn.Module):
    """Audio tower + embedder: one clip's features -> the `soft_tokens` embeddings of its placeholders."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        self.config = c
        self.audio_tower = AudioEncoder(c)
        self.embed_audio = MultimodalEmbedder(c)

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        """features f32 [B, F, mel bins], mask bool [B, F] -> f32 [B, soft_tokens, text hidden]."""
        encodings, valid = self.audio_tower(features, mask)
        b, tokens, _ = encodings.shape
        extra = self.config.soft_tokens - tokens
        if extra < 0:
            raise ValueError(f"{features.shape[1]} feature frames give {tokens} audio tokens, more than the "
                             f"{self.config.soft_tokens} a prompt holds")
        padding = self.embed_audio.hard(torch.full((b, 1), self.config.padding_id, dtype=torch.int64))
        embedded = torch.where(valid[..., None], self.embed_audio.soft(encodings), padding)
        return torch.cat([embedded, padding.expand(b, extra, -1)], dim=1)
