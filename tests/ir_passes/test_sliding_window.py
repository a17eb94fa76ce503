"""sliding-window: the ring's decode mask becomes slot validity; FileCheck'd IR, and numerics against the model's
own causal + window mask for starts before, at and long after the ring fills."""

import numpy as np
import torch

from g3n_compile.checkpoint.tiny_random import CONFIG
from g3n_compile.model.text import attention_mask, slot_positions
from helpers import context, filecheck, fixture, run_compiled
from passes import run_passes
from passes.sliding_window import SlidingWindowDecode


def test_ring_mask_becomes_slot_validity(tmp_path):
    before = fixture("sliding_window_ring_mask.mlir")
    after, report = run_passes(before, context(), [SlidingWindowDecode], check_sites=False, log=lambda *_: None)
    assert report[0]["stats"] == {"ring-mask": 1}
    filecheck(after, "sliding_window_ring_mask.mlir")

    g = np.random.default_rng(0)
    s, s_full = g.standard_normal((1, 1, 2, 1, 4), np.float32), g.standard_normal((1, 1, 2, 1, 8), np.float32)
    caches = np.zeros((1, 1, 4, 2), np.float32), np.zeros((1, 1, 8, 2), np.float32)
    for start in (0, 2, 3, 4, 7, 30):
        q = torch.tensor([start])
        ring_mask = attention_mask(q, *slot_positions(4, q + 1, ring=True), window=CONFIG.sliding_window).numpy()
        full_mask = attention_mask(q, *slot_positions(8, q + 1, ring=False), window=None).numpy()
        inputs = [np.zeros((1, 1), np.int64), np.zeros((1, 1, 4), np.float32), np.array([start], np.int64),
                  *caches, ring_mask, full_mask, s, s_full]
        want = run_compiled(before, tmp_path, inputs, function="decode_step")
        got = run_compiled(after, tmp_path, inputs, function="decode_step")
        for w, a in zip(want, got):
            np.testing.assert_array_equal(a, w)


def test_expected_sites_are_the_sliding_layers():
    layers = CONFIG.num_hidden_layers
    sliding = sum(CONFIG.is_sliding(i) for i in range(layers))
    assert SlidingWindowDecode().expected(context(max_context=64)) == {"ring-mask": sliding}
    # A context no longer than the window: every cache is ring-sized, so every layer's mask is rewritten.
    assert SlidingWindowDecode().expected(context(max_context=CONFIG.sliding_window)) == {"ring-mask": layers}
