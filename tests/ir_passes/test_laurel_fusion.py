"""laurel-fusion: fixtures in, FileCheck'd IR out, and the compiled numerics before vs after (the fused weight
built by the pass's own recipe)."""

import numpy as np
import pytest
import torch

from g3n_compile.checkpoint.tiny_random import CONFIG
from g3n_compile.model.layers import RMSNorm
from helpers import compare_compiled, context, export_layer, filecheck, fixture, parameter_names, run_compiled
from passes import run_passes
from passes.laurel_fusion import ROWS, LaurelFusion


def fuse(mlir: str):
    ctx = context()
    after, report = run_passes(mlir, ctx, [LaurelFusion], check_sites=False, log=lambda *_: None)
    return after, report[0]["stats"], ctx


@pytest.mark.parametrize("name", ["laurel_fusion_input_projections.mlir", "laurel_fusion_input_projections_bf16.mlir"])
def test_input_projections_become_one_matmul(name):
    """f32, and bf16 weights where each linear casts the input on its own: the four still become one mm."""
    after, stats, _ = fuse(fixture(name))
    assert stats == {"input-projections": 1, "post-norms": 0, "parameters_dropped": 4}
    filecheck(after, name)
    if "bf16" not in name:
        filecheck(after, name, "ABSENT")


def test_input_projections_numerics(tmp_path):
    before = fixture("laurel_fusion_input_projections.mlir")
    after, _, ctx = fuse(before)
    g = torch.Generator().manual_seed(3)
    shapes = {"self_attn.q_proj": 32, "self_attn.k_proj": 16, "self_attn.v_proj": 16, "laurel.linear_left": 8,
              "self_attn.o_proj": 64}
    weights = {f"layers.0.{role}.weight": torch.randn(n, 64, generator=g) for role, n in shapes.items()}
    x, y = torch.randn(1, 2, 64, generator=g).numpy(), torch.randn(1, 2, 64, generator=g).numpy()
    source = ctx.derived.getter(weights.__getitem__)
    want = run_compiled(before, tmp_path, [x, y], weights)
    got = run_compiled(after, tmp_path, [x, y], {n: source(n) for n in parameter_names(after)})
    for w, a in zip(want, got):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5)


class _ResidualLayer(torch.nn.Module):
    """The decoder layer's residual sum: ((active + post_attention_norm(attn)) + (x + post_laurel_norm(right)))
    / sqrt(2)."""

    def __init__(self):
        super().__init__()
        self.post_attention_layernorm = RMSNorm(CONFIG.hidden_size, CONFIG.rms_norm_eps)
        self.laurel = torch.nn.Module()
        self.laurel.post_laurel_norm = RMSNorm(CONFIG.hidden_size, CONFIG.rms_norm_eps)

    def forward(self, active, x, attn, right):
        h = (active + self.post_attention_layernorm(attn)) + (x + self.laurel.post_laurel_norm(right))
        return h / 2 ** 0.5, h


class _ResidualNormLayer(_ResidualLayer):
    """As the decoder layer goes on: the pre-feedforward norm of h / sqrt(2), which the residual reads too (the
    fixture laurel_fusion_post_norms.mlir is this layer)."""

    def __init__(self):
        super().__init__()
        self.pre_feedforward_layernorm = RMSNorm(CONFIG.hidden_size, CONFIG.rms_norm_eps)

    def forward(self, active, x, attn, right):
        h = ((active + self.post_attention_layernorm(attn)) + (x + self.laurel.post_laurel_norm(right))) / 2 ** 0.5
        normed = self.pre_feedforward_layernorm(h)
        return h + torch.tanh(normed), normed


def _case(layer, norms, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    d = CONFIG.hidden_size
    weights = {f"layers.0.{k}.weight": torch.randn(d, generator=g).to(dtype) for k in norms}
    examples = {name: tuple(torch.randn(1, t, d, generator=g) for _ in range(4)) for name, t in (("prefill", 3),
                                                                                               ("decode", 1))}
    return export_layer(layer.to(dtype), weights, examples), weights, examples


def test_post_norms_take_the_pre_feedforward_norm_into_one_reduction():
    after, stats, _ = fuse(fixture("laurel_fusion_post_norms.mlir"))
    assert stats == {"input-projections": 0, "post-norms": 2} and len(ROWS) == 8
    filecheck(after, "laurel_fusion_post_norms.mlir")
    filecheck(after, "laurel_fusion_post_norms.mlir", "ABSENT")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_post_norms_numerics(tmp_path, dtype):
    """The two post norms alone (f32 or bf16 norm weights): a 2-row reduction per function; numerics unchanged."""
    ir_text, weights, examples = _case(_ResidualLayer(), ("post_attention_layernorm", "laurel.post_laurel_norm"), 4, dtype)
    after, stats, ctx = fuse(ir_text)
    assert stats == {"input-projections": 0, "post-norms": 2}
    filecheck(after, """
// CHECK: torch.aten.sum.dim_IntList {{.*}} -> !torch.vtensor<[1,3,2],f32>
// CHECK: torch.aten.sum.dim_IntList {{.*}} -> !torch.vtensor<[1,1,2],f32>
// CHECK-NOT: torch.aten.mean.dim
""", tmp_path=tmp_path)
    compare_compiled(ir_text, after, tmp_path, ctx, weights, examples)


def test_post_norms_with_the_pre_feedforward_norm_numerics(tmp_path):
    ir_text, weights, examples = _case(_ResidualNormLayer(), ("post_attention_layernorm", "laurel.post_laurel_norm",
                                                              "pre_feedforward_layernorm"), 6)
    after, _, ctx = fuse(ir_text)
    compare_compiled(ir_text, after, tmp_path, ctx, weights, examples)
