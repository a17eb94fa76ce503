"""int4-pack: the quantisation and its layout, the pass on a fixture (FileCheck'd IR, numerics against the
dequantised weights), the sites it must find, and int4 end to end on tiny-random and (slow tier) on the
E2B-proportioned model."""

import json

import numpy as np
import pytest
import torch

from g3n_compile.checkpoint import load_model
from g3n_compile.checkpoint.tiny_random import CONFIG
from g3n_compile.compile import compile_model
from helpers import context, filecheck, fixture, parameter_names, run_compiled
from passes import run_passes
from passes.altup_fusion import AltUpFusion
from passes.int4_pack import QUANTIZED, Int4Pack, dequantize, linear_depths, quantize
from reference import CONFIGS, hf_model, save_checkpoint
from runtime import load
from runtime.archive import ArchiveReader


def test_quantize_roundtrip_and_layout():
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    packed, scale = quantize(w, 32)
    assert packed.dtype == torch.int8 and packed.shape == (6, 32) and scale.dtype == torch.float16 and scale.shape == (6, 2)
    back = dequantize(packed, scale)
    step = scale.float().abs().repeat_interleave(32, dim=1)
    # Rounding error at most half a step, except where a weight of the extreme's size but opposite sign
    # lands on +8 and is clamped to 7.
    assert ((back - w).abs() <= step / 2 + 1e-6).float().mean() > 0.95 and ((back - w).abs() <= step + 1e-6).all()
    group_max = w.reshape(6, 2, 32).abs().amax(-1)
    group_err = (back - w).reshape(6, 2, 32).abs().amax(-1)
    assert (group_err <= group_max / 8 + 1e-6).all()
    # The extreme maps to -8 (scale 1 for a group whose extreme is -8); the low nibble holds the even
    # column: a code of 3 at k=0 and -2 at k=1 packs to 0xE3.
    codes = torch.zeros(1, 32)
    codes[0, 0], codes[0, 1], codes[0, 31] = 3.0, -2.0, -8.0
    p, s = quantize(codes, 32)
    assert float(s[0, 0]) == 1.0 and p.view(torch.uint8)[0, 0] == 0xE3 and p.view(torch.uint8)[0, 15] == 0x80
    assert float(quantize(-codes, 32)[1][0, 0]) == -1.0


def test_int4_pack_rewrites_linears_and_matches_dequantised_weights(tmp_path):
    ctx = context(quant="int4", group_size=32)
    after, report = run_passes(fixture("int4_pack.mlir"), ctx, [AltUpFusion, Int4Pack], check_sites=False,
                               log=lambda *_: None)
    assert report[1]["stats"] == {"int4-linear": 1, "weights": 1, "kernels": 1, "parameters_dropped": 1}
    assert report[0]["stats"]["router-reduction"] == 1  # the router: a multiply-reduce, not quantised
    filecheck(after, "int4_pack.mlir")
    filecheck(after, "int4_pack.mlir", "ABSENT")

    g = torch.Generator().manual_seed(1)
    w, r = torch.randn(48, 64, generator=g), torch.randn(4, 64, generator=g)
    source = ctx.derived.getter({"layers.0.mlp.gate_proj.weight": w, "layers.0.altup.modality_router.weight": r}.__getitem__)
    x = torch.randn(3, 64, generator=g)
    y, z = run_compiled(after, tmp_path, [x.numpy()], {n: source(n) for n in parameter_names(after)}, quant="int4")
    want = x @ dequantize(*quantize(w, 32)).T
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z, (x @ r.T).numpy(), rtol=1e-5, atol=1e-5)


def test_expected_linears_follow_the_config():
    """Per function: the model's global linears (per-layer model projection, 2 x 3 AltUp projections, the head)
    and per layer q/k/v/LAuReL-left (one fused matmul, or 4 / 2 in KV-shared layers), o, gate, up, down, LAuReL
    right, the per-layer input gate and projection; those whose K the group divides."""
    fused = context(quant="int4", enabled=frozenset({"laurel-fusion", "int4-pack"}))
    apart = context(quant="int4", enabled=frozenset({"int4-pack"}))
    owners = CONFIG.num_hidden_layers - CONFIG.num_kv_shared_layers
    assert len(linear_depths(fused)) == 8 + 8 * CONFIG.num_hidden_layers
    assert len(linear_depths(apart)) == len(linear_depths(fused)) + 3 * owners + CONFIG.num_kv_shared_layers
    quantised = sum(k % 32 == 0 for k in linear_depths(fused))
    assert Int4Pack().expected(fused) == {"int4-linear": 2 * quantised}


def test_int4_model_end_to_end(tmp_path):
    """tiny-random in int4 (after LAuReL fusion) with IREE's generic int4 code: the compiled module
    computes the model with dequantised weights (so the kernel is exact), linear weights cost <= 0.6
    bytes each, and the manifest records it all. Quantising the fused q/k/v/LAuReL weight row-wise
    equals quantising each. (The C kernel's int8 activations: test_int4_cpu_kernel.py and the E2B test.)"""
    out = tmp_path / "out"
    compile_model("tiny-random", "cpu", out, max_context=64, chunk=16, quant="int4",
                  disabled_passes=["int4-cpu-kernel"], log=lambda *_: None)
    manifest = json.loads((out / "g3n.json").read_text())
    assert manifest["quantization"]["weights"] == "int4"
    assert next(p for p in manifest["targets"]["cpu"]["passes"] if p["name"] == "int4-pack")["stats"]["int4-linear"] > 0

    model = load_model("tiny-random")
    quantized = {n: p for n, p in model.named_parameters() if QUANTIZED.fullmatch(n) and p.shape[1] % 32 == 0}
    entries = ArchiveReader(out / "model.irpa").entries
    codes = sum(length for name, (_, length) in entries.items() if name.endswith(".int4"))
    scales = sum(length for name, (_, length) in entries.items() if name.endswith(".int4_scale"))
    assert 2 * codes == sum(p.numel() for p in quantized.values())  # every quantisable weight, once
    assert (codes + scales) / (2 * codes) <= 0.6  # bytes per weight
    # Quantised weights leave the archive, except the token embedding: the tied LM head reads its int4
    # copy, the embedding lookup still gathers rows of the original.
    assert set(quantized) & set(entries) == {"embed_tokens.weight"}

    ids = torch.randint(0, CONFIG.vocab_size, (21,), generator=torch.Generator().manual_seed(2)).tolist()
    result = load(out).generate(ids, max_new_tokens=8, keep_logits=True, ignore_eos=True)
    with torch.no_grad():
        reference = model(torch.tensor([ids + result.output_ids]))[0, len(ids) - 1:-1].numpy()
        table = model.embed_tokens.weight.clone()
        # The lookup keeps the original table; only the head (the same parameter) is dequantised.
        model.embed = lambda input_ids: torch.nn.functional.embedding(input_ids, table) * CONFIG.hidden_size ** 0.5
        for p in quantized.values():
            p.copy_(dequantize(*quantize(p, 32)))
        dequantised = model(torch.tensor([ids + result.output_ids]))[0, len(ids) - 1:-1].numpy()
    got = np.stack(result.logits)
    assert np.abs(got - dequantised).max() <= 1e-3 * np.abs(dequantised).max()
    cosine = (got * reference).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(reference, axis=-1)
    print(f"int4 tiny-random: logits cosine vs f32 min {cosine.min():.4f}, "
          f"greedy agreement {(got.argmax(-1) == reference.argmax(-1)).mean():.2f}")


@pytest.mark.slow  # ~3 min on 2 cores: the E2B-proportioned model compiled twice
def test_int4_quality_on_the_e2b_proportioned_model(tmp_path):
    """int4 (group 32, with the C kernel's int8 activations on x86-64) against f32 on the E2B-proportioned
    config (branch_scale 0.1: see tests/reference.py):
    compiled int4 logits over a 16-token prompt and 32 generated tokens, vs transformers in f32
    teacher-forced on the same sequence: cosine >= 0.99 at every position."""
    cfg = CONFIGS["e2b-proportioned"]
    hf = hf_model(cfg, seed=21, branch_scale=0.1)
    folder = save_checkpoint(hf, cfg, tmp_path / "ckpt", layout="multimodal")
    out = tmp_path / "out"
    compile_model(str(folder), "cpu", out, max_context=64, chunk=16, quant="int4", log=lambda *_: None)
    passes = {p["name"]: p for p in json.loads((out / "g3n.json").read_text())["targets"]["cpu"]["passes"]}
    kernel = passes["int4-cpu-kernel"]["stats"]  # on x86-64 the C kernel (int8 activations) computes every linear
    assert kernel["kernel-call"] == kernel["generic_calls"] > 0 or kernel["isa"] == "none"
    ids = torch.randint(0, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(3)).tolist()
    result = load(out).generate(ids, max_new_tokens=32, keep_logits=True, ignore_eos=True)
    with torch.no_grad():
        reference = hf(torch.tensor([ids + result.output_ids]), use_cache=False).logits[0, len(ids) - 1:-1].numpy()
    got = np.stack(result.logits)
    cosine = (got * reference).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(reference, axis=-1)
    agreement = (got.argmax(-1) == reference.argmax(-1)).mean()
    print(f"int4 e2b-proportioned (C kernel: {kernel['isa']}): logits cosine vs f32 min {cosine.min():.4f} "
          f"mean {cosine.mean():.4f}, greedy agreement {agreement:.2f}")
    assert cosine.min() >= 0.99


