"""Our decoder vs transformers' Gemma3nForCausalLM (eager) on the same re-randomised weights."""

import pytest
import torch

from g3n_compile.checkpoint import load_text_model
from reference import CONFIGS, hf_model, save_checkpoint

TOL = 1e-4
MAX_PROMPT = 20


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    name = request.param
    cfg = CONFIGS[name]
    hf = hf_model(cfg, seed=7)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (1, MAX_PROMPT + 3 * cfg.sliding_window + 2), generator=gen)
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
    return name, cfg, hf, ids, ref, tmp_path_factory.mktemp(name)


def prefill_then_decode(model, ids, prompt_len, chunk, max_context=256):
    """Chunked prefill (padded last chunk) then one token at a time; the logits of every position from
    prompt_len - 1 on."""
    caches = model.init_caches(1, max_context)
    out = []
    with torch.no_grad():
        for start in range(0, prompt_len, chunk):
            n = min(chunk, prompt_len - start)
            part = torch.cat([ids[:, start:start + n], torch.zeros(1, chunk - n, dtype=torch.long)], dim=1)
            logits, caches = model.step(part, model.per_layer_rows(part), torch.tensor([start]), torch.tensor([n]), caches)
        out.append(logits[0, 0])
        for t in range(prompt_len, ids.shape[1]):
            tok = ids[:, t:t + 1]
            logits, caches = model.step(tok, model.per_layer_rows(tok), torch.tensor([t]), torch.tensor([1]), caches)
            out.append(logits[0, 0])
    return torch.stack(out)


@pytest.mark.parametrize("layout,shards", [("text", 1), ("text", 3), ("multimodal", 1), ("multimodal", 2)])
def test_full_sequence_matches_transformers(case, layout, shards):
    name, cfg, hf, ids, ref, tmp = case
    folder = save_checkpoint(hf, cfg, tmp / f"{layout}-{shards}", layout=layout, shards=shards,
                             with_lm_head=(shards == 1))
    model = load_text_model(folder)
    with torch.no_grad():
        out = model(ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= TOL
    assert ref.abs().max().item() > 0.5  # the comparison is not between near-zero tensors


@pytest.mark.parametrize("layout,shards", [("text", 2), ("multimodal", 1)])
@pytest.mark.parametrize("prompt_len,chunk", [(5, 8), (13, 4), (20, 32)])
def test_cached_prefill_and_decode_match_transformers(case, layout, shards, prompt_len, chunk):
    """Prefill (chunks shorter and longer than the window, a padded tail) + decode well past 3 windows."""
    name, cfg, hf, ids, ref, tmp = case
    folder = save_checkpoint(hf, cfg, tmp / f"cached-{layout}-{shards}", layout=layout, shards=shards)
    model = load_text_model(folder)
    assert ids.shape[1] - prompt_len >= 3 * cfg.sliding_window
    out = prefill_then_decode(model, ids, prompt_len, chunk)
    err = (out - ref[0, prompt_len - 1:]).abs().max().item()
    assert err <= TOL, f"{name}: cached logits differ by {err}"


def test_sliding_ring_holds_only_the_window(case):
    """The sliding caches really are rings of `sliding_window` slots and full caches max_context."""
    name, cfg, hf, ids, ref, tmp = case
    folder = save_checkpoint(hf, cfg, tmp / "ring", layout="text")
    model = load_text_model(folder)
    shapes = model.cache_shapes(1, 200)
    assert len(shapes) == 2 * (cfg.num_hidden_layers - cfg.num_kv_shared_layers)
    for i, layer in enumerate(cfg.kv_layers):
        want = cfg.sliding_window if cfg.is_sliding(layer) else 200
        assert shapes[2 * i][2] == want


def test_bf16_checkpoint_loads_in_either_dtype(tmp_path):
    cfg = CONFIGS["hf-test"]
    hf = hf_model(cfg, seed=11)
    folder = save_checkpoint(hf, cfg, tmp_path / "bf16", dtype=torch.bfloat16)
    m16 = load_text_model(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    m32 = load_text_model(folder)
    with torch.no_grad():  # the reference sees the same rounded weights (its rope buffers stay f32)
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        assert (m32(ids) - ref).abs().max().item() <= TOL
        # bf16 matmuls: a looser but still meaningful bound
        assert (m16(ids) - ref).abs().max().item() <= 0.1


def test_a_wrong_weight_is_caught(case):
    """The equivalence check can fail: perturbing one scale that the default init zeroes shows up."""
    name, cfg, hf, ids, ref, tmp = case
    folder = save_checkpoint(hf, cfg, tmp / "perturbed", layout="text")
    model = load_text_model(folder)
    with torch.no_grad():
        model.layers[0].altup.correct_output_scale.add_(0.05)
        assert (model(ids) - ref).abs().max().item() > TOL
