"""altup-fusion: fixtures in, FileCheck'd IR out, the sites it counts against what the config says, and the
compiled numerics before vs after on AltUp exported as the model is."""

import numpy as np
import torch

from g3n_compile.checkpoint.tiny_random import CONFIG
from g3n_compile.model.text import AltUp
from helpers import compare_compiled, context, export_layer, filecheck, fixture, run_compiled
from passes import run_passes
from passes.altup_fusion import AltUpFusion


def fuse(mlir: str, ctx=None):
    ctx = ctx or context()
    after, report = run_passes(mlir, ctx, [AltUpFusion], check_sites=False, log=lambda *_: None)
    return after, report[0]["stats"], ctx


def one_layer(ctx):
    """The context for a fixture that holds one layer's AltUp: the config cut to one layer."""
    c = ctx.config
    ctx.config = c.replace(num_hidden_layers=1, intermediate_size=c.intermediate_size[:1], layer_types=c.layer_types[:1],
                           activation_sparsity_pattern=c.activation_sparsity_pattern[:1], num_kv_shared_layers=0)
    return ctx


def test_stream_contractions_are_unrolled():
    after, stats, _ = fuse(fixture("altup_fusion_stream_mix.mlir"))
    assert stats == {"one-token-predict": 0, "one-token-correct": 0, "split-streams": 0, "stream-mix": 3,
                     "router-reduction": 0}
    filecheck(after, "altup_fusion_stream_mix.mlir")
    filecheck(after, "altup_fusion_stream_mix.mlir", "ABSENT")


def test_stream_contractions_numerics(tmp_path):
    before = fixture("altup_fusion_stream_mix.mlir")
    after, _, _ = fuse(before)
    g = np.random.default_rng(0)
    inputs = [g.standard_normal(s).astype(np.float32) for s in ((3, 4), (3, 5, 4), (2, 1, 4), (2, 4, 16), (3, 8), (8, 2))]
    weights = {f"layers.0.{name}.weight": torch.randn(shape) for name, shape in (
        ("altup.prediction_coefs", (16, 4)), ("altup.correction_coefs", (4, 4)), ("laurel.linear_right", (8, 4)))}
    for b, f in zip(run_compiled(before, tmp_path, inputs, weights), run_compiled(after, tmp_path, inputs, weights)):
        np.testing.assert_allclose(f, b, rtol=1e-5, atol=1e-5)


def test_one_token_forms_and_the_split_streams():
    """decode_step: router + predict and router + correct become masked reductions and the corrected streams' two
    readers are split; prefill_step keeps the unrolled forms. The counts are what `expected` says for one layer."""
    ctx = one_layer(context())
    after, stats, _ = fuse(fixture("altup_fusion_one_token.mlir"), ctx)
    assert stats == {"one-token-predict": 1, "one-token-correct": 1, "split-streams": 1, "stream-mix": 3,
                     "router-reduction": 2}
    assert stats == AltUpFusion().expected(ctx)
    filecheck(after, "altup_fusion_one_token.mlir")
    filecheck(after, "altup_fusion_one_token.mlir", "DECODE")


def test_bf16_weights_expect_no_one_token_forms():
    ctx = one_layer(context(weight_dtype="bfloat16"))
    assert AltUpFusion().expected(ctx) == {"one-token-predict": 0, "one-token-correct": 0, "split-streams": 0,
                                           "stream-mix": 6, "router-reduction": 4}


class _AltUpLayer(torch.nn.Module):
    """g3n_compile.model.text.AltUp as a decoder layer uses it: predict, an update of the active stream, correct; the
    streams come out of a concatenation, as from the layer before."""

    def __init__(self):
        super().__init__()
        self.altup = AltUp(CONFIG)

    def forward(self, streams, update):
        streams = torch.cat([streams[:1], streams[1:] * 0.5])
        predictions = self.altup.predict(streams)
        return predictions, self.altup.correct(predictions, predictions[self.altup.active] * 2.0 + update)


class _AltUpTailLayer(_AltUpLayer):
    """The decoder layer's end: the corrected active stream, scaled, makes the per-layer input (here a tanh of
    it), which is added to every stream but the first (the fixture altup_fusion_one_token.mlir is this layer)."""

    def forward(self, streams, update):
        predictions = self.altup.predict(streams)
        corrected = self.altup.correct(predictions, predictions[self.altup.active] * 2.0 + update)
        first = corrected[self.altup.active] * self.altup.correct_output_scale.float()
        return torch.cat([corrected[:1], corrected[1:] + torch.tanh(first)], dim=0), first


def _altup_case(layer: torch.nn.Module, seed: int):
    """`layer` exported with random AltUp weights for a 3-token prefill and a 1-token decode: (IR, weights,
    example inputs (streams, update) per function)."""
    g = torch.Generator().manual_seed(seed)
    d = CONFIG.hidden_size
    weights = {f"layers.0.altup.{k}": torch.randn(*shape, generator=g) * scale for k, shape, scale in (
        ("correct_output_scale", (d,), 1.0), ("correction_coefs.weight", (4, 4), 0.5),
        ("prediction_coefs.weight", (16, 4), 0.5), ("modality_router.weight", (4, d), 1.0),
        ("router_norm.weight", (d,), 1.0))}
    examples = {name: (torch.randn(4, 1, t, d, generator=g), torch.randn(1, t, d, generator=g))
                for name, t in (("prefill", 3), ("decode", 1))}
    return export_layer(layer, weights, examples), weights, examples


def test_one_token_predict_and_correct_numerics(tmp_path):
    """Predictions and corrected streams equal before and after (f32 reassociation), both functions."""
    ir_text, weights, examples = _altup_case(_AltUpLayer(), seed=5)
    after, stats, ctx = fuse(ir_text)
    assert stats["one-token-predict"] == stats["one-token-correct"] == 1 and stats["split-streams"] == 0
    compare_compiled(ir_text, after, tmp_path, ctx, weights, examples)


def test_split_streams_numerics(tmp_path):
    ir_text, weights, examples = _altup_case(_AltUpTailLayer(), seed=7)
    after, stats, ctx = fuse(ir_text)
    assert stats["split-streams"] == 1
    compare_compiled(ir_text, after, tmp_path, ctx, weights, examples)
