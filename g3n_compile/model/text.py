"""Gemma 3n text decoder in export-ready PyTorch.

Faithful to transformers' `Gemma3nForCausalLM` (the tests hold it to 1e-4 on random weights), but
written for `torch.export`:
  * no Python branching on tensor values; shapes are static per call;
  * positions are explicit (`start`, `length`), KV caches are explicit tensors passed in and returned;
    sliding layers keep a ring buffer of `sliding_window` slots, full layers `max_context` slots, and the
    last `num_kv_shared_layers` layers own no cache (they read their producer's keys of the same step);
  * the per-layer-embedding (PLE) table gather is its own function (`per_layer_rows`), so a runtime can
    keep the 2-2.4 B-parameter table in host memory and feed only the gathered rows to `step`;
  * constants that would trace into un-lowerable ops (the normal-icdf of the activation sparsity) are
    folded in Python.

Activations, norms, AltUp and residual math are float32 whatever the weight dtype; every linear layer
casts its input to the weight dtype (so bf16 weights mean bf16 matmuls with f32 accumulation outside).

Module and parameter names mirror the Hugging Face checkpoint (`model.language_model.` stripped), so
loading is a name-for-name copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TextConfig
from .layers import Linear, RMSNorm


def _as_dtype(value: float, dtype: torch.dtype) -> float:
    """`value` rounded as transformers rounds its scalar buffers (f32, then the weight dtype)."""
    return torch.tensor(value, dtype=torch.float32).to(dtype).item()


def _rescale_to(x: Tensor, target_rms: Tensor) -> Tensor:
    """AltUp magnitude matching: scale `x` to the per-token RMS `target_rms`."""
    return x * target_rms / torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))


# ---- positions, caches and masks -------------------------------------------------------------------


@dataclass
class Chunk:
    """The tokens of one call: positions start .. start+T-1, of which the first `length` are real
    (the runtime pads the last prefill chunk)."""

    start: Tensor  # int64 [1]
    length: Tensor  # int64 [1]
    size: int  # T, static

    @property
    def positions(self) -> Tensor:
        return self.start + torch.arange(self.size, dtype=torch.int64)


@dataclass
class KeyValues:
    """What one attention reads: keys/values [B, Hkv, S, Dh] and which (query, key) pairs may attend [T, S]."""

    k: Tensor
    v: Tensor
    mask: Tensor


def _mod(x: Tensor, n: int) -> Tensor:
    # int32: IREE's SPIR-V codegen cannot lower an int64 remainder (`arith.remsi` on i64 is illegal there).
    return torch.remainder(x.to(torch.int32), n).to(torch.int64)


def slot_positions(slots: int, filled: Tensor, ring: bool) -> tuple[Tensor, Tensor]:
    """Position held by each cache slot once positions 0..filled-1 have been written, and whether the
    slot holds anything. A ring of `slots` slots keeps position p in slot p % slots."""
    s = torch.arange(slots, dtype=torch.int64)
    if not ring:
        return s, s < filled
    pos = (filled - 1) - _mod(filled - 1 - s, slots)
    return pos, pos >= 0


def attention_mask(q_pos: Tensor, k_pos: Tensor, k_valid: Tensor, window: int | None) -> Tensor:
    """Causal (and, for sliding layers, windowed: q - window < k <= q) mask [T, S]."""
    m = k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
    if window is not None:
        m = m & (k_pos[None, :] > q_pos[:, None] - window)
    return m


def write_cache(cache: Tensor, new: Tensor, chunk: Chunk, ring: bool) -> Tensor:
    """Store the chunk's real tokens `new` [B, Hkv, T, Dh] in `cache` [B, Hkv, S, Dh] at their slots.

    Every token index is redirected to the token that must end up in its slot (for a ring, the latest
    real token with the same slot; for padding, the last real token), so duplicate indices always carry
    identical values and the scatter is deterministic."""
    slots, t = cache.shape[2], torch.arange(chunk.size, dtype=torch.int64)
    last = chunk.length - 1
    if ring:
        src = torch.where(t <= last, last - _mod(last - t, slots), last)
        dst = _mod(chunk.start + src, slots)
    else:
        src = torch.minimum(t, last)
        dst = chunk.start + src
    return cache.index_copy(2, dst, new.index_select(2, src).to(cache.dtype))


def gather_keys(k: Tensor, v: Tensor, cache: tuple[Tensor, Tensor] | None, chunk: Chunk,
                window: int | None) -> tuple[KeyValues, tuple[Tensor, Tensor] | None]:
    """Keys/values a chunk attends over, and the updated cache.

    * no cache: the chunk itself (full-sequence forward);
    * one token (decode): write it, then read the cache, so no step copies a whole cache;
    * several tokens (prefill): read [old cache ++ chunk], then write, because a chunk longer than a
      sliding window would overwrite ring slots its own earlier queries still need.
    """
    q_pos = chunk.positions
    if cache is None:
        return KeyValues(k, v, attention_mask(q_pos, q_pos, torch.ones_like(q_pos, dtype=torch.bool), window)), None
    k_cache, v_cache = cache
    slots = k_cache.shape[2]
    ring = window is not None
    if chunk.size == 1:
        k_cache, v_cache = write_cache(k_cache, k, chunk, ring), write_cache(v_cache, v, chunk, ring)
        pos, valid = slot_positions(slots, chunk.start + 1, ring)
        return KeyValues(k_cache, v_cache, attention_mask(q_pos, pos, valid, window)), (k_cache, v_cache)
    pos, valid = slot_positions(slots, chunk.start, ring)
    keys = KeyValues(
        torch.cat([k_cache.to(k.dtype), k], dim=2),
        torch.cat([v_cache.to(v.dtype), v], dim=2),
        attention_mask(q_pos, torch.cat([pos, q_pos]),
                       torch.cat([valid, torch.ones_like(q_pos, dtype=torch.bool)]), window),
    )
    return keys, (write_cache(k_cache, k, chunk, ring), write_cache(v_cache, v, chunk, ring))


def attend(q: Tensor, kv: KeyValues) -> Tensor:
    """Grouped-query attention, scale 1.0 (Gemma 3n normalises q and k instead). q [B, H, T, Dh] -> [B, T, H*Dh]."""
    b, h, t, d = q.shape
    hkv, s = kv.k.shape[1], kv.k.shape[2]
    g = h // hkv
    scores = torch.matmul(q.reshape(b, hkv, g * t, d), kv.k.float().transpose(2, 3)).view(b, hkv, g, t, s)
    scores = torch.where(kv.mask, scores, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).view(b, hkv, g * t, s)
    out = torch.matmul(probs, kv.v.float()).view(b, h, t, d)
    return out.transpose(1, 2).reshape(b, t, h * d)


def rope_tables(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()  # [T, Dh]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX half rotation on x [B, T, heads, Dh]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ---- blocks ----------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.owns_kv = cfg.kv_source(layer) == layer
        self.q_proj = Linear(cfg.hidden_size, self.heads * self.head_dim)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        if self.owns_kv:
            self.k_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim)
            self.v_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_scale=False)
        self.o_proj = Linear(self.heads * self.head_dim, cfg.hidden_size)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], chunk: Chunk,
                cache: tuple[Tensor, Tensor] | None, shared: KeyValues | None):
        b, t, _ = x.shape
        cos, sin = rope
        q = apply_rope(self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim)), cos, sin)
        if self.owns_kv:
            k = apply_rope(self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)), cos, sin)
            v = self.v_norm(self.v_proj(x).view(b, t, self.kv_heads, self.head_dim))
            kv, cache = gather_keys(k.transpose(1, 2), v.transpose(1, 2), cache, chunk, self.window)
        else:
            kv = shared
        return self.o_proj(attend(q.transpose(1, 2), kv)), kv, cache


class MLP(nn.Module):
    """GELU-tanh gated MLP; layers with activation sparsity p keep gate values above mean + icdf(p)·std."""

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        width = cfg.intermediate_size[layer]
        self.gate_proj = Linear(cfg.hidden_size, width)
        self.up_proj = Linear(cfg.hidden_size, width)
        self.down_proj = Linear(width, cfg.hidden_size)
        sparsity = cfg.activation_sparsity_pattern[layer]
        # Folded here: Normal.icdf traces to aten.erfinv, which IREE cannot lower.
        self.std_multiplier = NormalDist().inv_cdf(sparsity) if sparsity > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        if self.std_multiplier is not None:
            cutoff = gate.mean(-1, keepdim=True) + gate.std(-1, keepdim=True, unbiased=False) * self.std_multiplier
            gate = F.relu(gate - cutoff)
        return self.down_proj(F.gelu(gate, approximate="tanh") * self.up_proj(x))


class Laurel(nn.Module):
    """Learned augmented residual: x + norm(right(left(x))), rank `laurel_rank`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.linear_left = Linear(cfg.hidden_size, cfg.laurel_rank)
        self.linear_right = Linear(cfg.laurel_rank, cfg.hidden_size)
        self.post_laurel_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class AltUp(nn.Module):
    """Alternating updates over `n` streams [n, B, T, D]: a router on one stream gives per-token
    n x n prediction and n correction coefficients."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        n, d = cfg.altup_num_inputs, cfg.hidden_size
        self.n, self.active = n, cfg.altup_active_idx
        self.correct_output_scale = nn.Parameter(torch.zeros(d))
        self.correction_coefs = Linear(n, n)
        self.prediction_coefs = Linear(n, n * n)
        self.modality_router = Linear(d, n)
        self.router_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.router_scale = 1.0 / d

    def route(self, x: Tensor) -> Tensor:
        return torch.tanh(self.modality_router(self.router_norm(x) * self.router_scale))

    def predict(self, streams: Tensor) -> Tensor:
        """P[j] = H[j] + sum_i C[j, i] H[i], with C = prediction_coefs(route(H[active]))."""
        coefs = self.prediction_coefs(self.route(streams[self.active]))
        coefs = coefs.view(*coefs.shape[:-1], self.n, self.n).transpose(-1, -2)  # [B, T, i, j]
        return torch.matmul(streams.permute(1, 2, 3, 0), coefs).permute(3, 0, 1, 2) + streams

    def correct(self, predictions: Tensor, activated: Tensor) -> Tensor:
        """C[k] = P[k] + (y - P[active]) * (correction_coefs(route(y))[k] + 1)."""
        coefs = self.correction_coefs(self.route(activated)) + 1.0  # [B, T, n]
        innovation = activated - predictions[self.active]
        return innovation[None] * coefs.permute(2, 0, 1)[..., None] + predictions


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        eps, d = cfg.rms_norm_eps, cfg.hidden_size
        self.correct_scale = cfg.altup_correct_scale
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg, layer)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)
        self.altup = AltUp(cfg)
        self.laurel = Laurel(cfg)
        self.per_layer_input_gate = Linear(d, cfg.hidden_size_per_layer_input)
        self.per_layer_projection = Linear(cfg.hidden_size_per_layer_input, d)
        self.post_per_layer_input_norm = RMSNorm(d, eps)

    def forward(self, streams: Tensor, per_layer_input: Tensor, rope, chunk: Chunk, cache, shared):
        predictions = self.altup.predict(streams)
        active = predictions[self.altup.active]
        x = self.input_layernorm(active)
        laurel = self.laurel(x)
        attn, kv, cache = self.self_attn(x, rope, chunk, cache, shared)
        h = ((active + self.post_attention_layernorm(attn)) + laurel) / math.sqrt(2)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        corrected = self.altup.correct(predictions, h)

        first = corrected[self.altup.active]
        if self.correct_scale:
            first = first * self.altup.correct_output_scale.float()
        gate = F.gelu(self.per_layer_input_gate(first), approximate="tanh") * per_layer_input
        injected = self.post_per_layer_input_norm(self.per_layer_projection(gate))
        # As transformers: the per-layer input is added to every stream but the first.
        return torch.cat([corrected[:1], corrected[1:] + injected], dim=0), kv, cache


# ---- the decoder ----------------------------------------------------------------------------------


class Gemma3nTextModel(nn.Module):
    """The decoder. `forward(input_ids)` is the full sequence from position 0 without a cache;
    `step` is one cached call (a prefill chunk, or one decode token)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        d, n_layers, ple = cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, n_layers * ple)
        self.per_layer_model_projection = Linear(d, n_layers * ple)
        self.per_layer_projection_norm = RMSNorm(ple, cfg.rms_norm_eps)
        self.altup_projections = nn.ModuleList(Linear(d, d) for _ in range(cfg.altup_num_inputs - 1))
        self.altup_unembed_projections = nn.ModuleList(Linear(d, d) for _ in range(cfg.altup_num_inputs - 1))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(n_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        for kind, theta in (("sliding", cfg.rope_theta_sliding), ("full", cfg.rope_theta_full)):
            inv_freq = 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device="cpu") / cfg.head_dim))
            self.register_buffer(f"{kind}_inv_freq", inv_freq, persistent=False)

    # -- ABI pieces --------------------------------------------------------------------------------
    def cache_shapes(self, batch: int, max_context: int) -> list[tuple[int, ...]]:
        """[k, v] shape for every KV-owning layer, in layer order: a ring of min(window, max_context)
        slots for sliding layers, `max_context` slots for full layers."""
        c = self.config
        shapes = []
        for layer in c.kv_layers:
            slots = min(c.sliding_window, max_context) if c.is_sliding(layer) else max_context
            shapes += [(batch, c.num_key_value_heads, slots, c.head_dim)] * 2
        return shapes

    def init_caches(self, batch: int, max_context: int, dtype: torch.dtype = torch.float32) -> list[Tensor]:
        return [torch.zeros(s, dtype=dtype) for s in self.cache_shapes(batch, max_context)]

    def per_layer_rows(self, input_ids: Tensor) -> Tensor:
        """Raw rows of the PLE table for `input_ids` [B, T] -> [B, T, L*P]; ids outside it (image and
        audio tokens) read row 0, as transformers does. Kept apart so a runtime can do it on the host."""
        in_table = (input_ids >= 0) & (input_ids < self.config.vocab_size_per_layer_input)
        return F.embedding(torch.where(in_table, input_ids, 0), self.embed_tokens_per_layer.weight)

    def embed(self, input_ids: Tensor) -> Tensor:
        w = self.embed_tokens.weight
        return F.embedding(input_ids, w).float() * _as_dtype(self.config.hidden_size**0.5, w.dtype)

    # -- calls -------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits [B, T, vocab] for a whole sequence starting at position 0 (no cache)."""
        t = input_ids.shape[1]
        chunk = Chunk(torch.zeros(1, dtype=torch.int64), torch.full((1,), t, dtype=torch.int64), t)
        logits, _ = self._run(self.embed(input_ids), self.per_layer_rows(input_ids), chunk, None, last_only=False)
        return logits

    def step(self, input_ids: Tensor, per_layer_rows: Tensor, start: Tensor, length: Tensor,
             caches: list[Tensor], embeds: Tensor | None = None, embeds_mask: Tensor | None = None
             ) -> tuple[Tensor, list[Tensor]]:
        """One cached call over T = input_ids.shape[1] tokens at positions start.. (the first `length`
        real, the rest padding). Returns the logits [B, 1, vocab] of the last real token and the
        updated caches (same layout as `init_caches`). Where `embeds_mask` [B, T] is True, `embeds`
        [B, T, hidden] replaces the token's embedding (image and audio soft tokens, the embedders'
        rows for multimodal token ids); the per-layer inputs see the merged embeddings, as in
        transformers' Gemma3nModel."""
        chunk = Chunk(start, length, input_ids.shape[1])
        x = self.embed(input_ids)
        if embeds is not None:
            x = torch.where(embeds_mask[..., None], embeds.float(), x)
        return self._run(x, per_layer_rows, chunk, caches, last_only=True)

    def _run(self, embeds: Tensor, rows: Tensor, chunk: Chunk, caches: list[Tensor] | None, last_only: bool):
        c = self.config
        b, t, _ = embeds.shape
        per_layer = self._per_layer_inputs(embeds, rows)

        target = torch.mean(embeds**2, dim=-1, keepdim=True) ** 0.5
        streams = torch.stack([embeds] + [_rescale_to(p(embeds), target) for p in self.altup_projections])

        positions = chunk.positions
        rope = {"sliding": rope_tables(positions, self.sliding_inv_freq),
                "full": rope_tables(positions, self.full_inv_freq)}
        produced: dict[int, KeyValues] = {}
        new_caches: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            source = c.kv_source(i)
            cache = None
            if caches is not None and source == i:
                slot = 2 * c.kv_layers.index(i)
                cache = (caches[slot], caches[slot + 1])
            streams, kv, cache = layer(streams, per_layer[i], rope["sliding" if c.is_sliding(i) else "full"],
                                       chunk, cache, produced.get(source))
            produced[i] = kv
            if cache is not None:
                new_caches += list(cache)

        if last_only:
            last = (chunk.length - 1).clamp(min=0)
            streams = streams.index_select(2, last)
        target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
        collapsed = [streams[0]] + [_rescale_to(p(streams[k + 1]), target)
                                    for k, p in enumerate(self.altup_unembed_projections)]
        h = self.norm(torch.mean(torch.stack(collapsed), dim=0))
        logits = F.linear(h.to(self.embed_tokens.weight.dtype), self.embed_tokens.weight).float()
        if c.final_logit_softcapping is not None:
            cap = c.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits, new_caches

    def _per_layer_inputs(self, embeds: Tensor, rows: Tensor) -> Tensor:
        """(RMS(projection of the embedding) + scaled PLE rows) / sqrt(2), as [L, B, T, P].

        Layer-major, so each layer reads one contiguous slice: a strided [B, T, P] slice fused into the
        per-layer gate's matmul makes IREE's CPU codegen fail at E2B shapes (vectors over its limit)."""
        c = self.config
        b, t, _ = embeds.shape
        shape = (b, t, c.num_hidden_layers, c.hidden_size_per_layer_input)
        wdt = self.per_layer_model_projection.weight.dtype
        context = self.per_layer_model_projection(embeds) * _as_dtype(c.hidden_size**-0.5, wdt)
        context = self.per_layer_projection_norm(context.view(shape))
        tokens = rows.float().view(shape) * _as_dtype(c.hidden_size_per_layer_input**0.5, rows.dtype)
        return ((context + tokens) * _as_dtype(2.0**-0.5, wdt)).permute(2, 0, 1, 3)

