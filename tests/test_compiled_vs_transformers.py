"""Compiled CPU modules (through g3n-compile and g3n-run) vs transformers on the same random weights."""

import json

import numpy as np
import pytest
import torch

from g3n_compile.compile import compile_model
from reference import CONFIGS, hf_model, save_checkpoint
from runtime.cli import main as g3n_run

CHUNK, MAX_CONTEXT, NEW_TOKENS = 16, 128, 48


@pytest.fixture(scope="module", params=["window-5", "e2b-proportioned"])
def compiled(request, tmp_path_factory):
    name = request.param
    cfg = CONFIGS[name]
    tmp = tmp_path_factory.mktemp(name)
    hf = hf_model(cfg, seed=21)
    folder = save_checkpoint(hf, cfg, tmp / "ckpt", layout="multimodal", shards=2)
    out = tmp / "out"
    compile_model(str(folder), "cpu", out, max_context=MAX_CONTEXT, chunk=CHUNK, log=lambda *_: None)
    return name, cfg, hf, out


def run(out, tmp_path, ids, capsys):
    logits_path = tmp_path / "logits.npy"
    rc = g3n_run([str(out), "--input-ids", ",".join(map(str, ids)), "--greedy", "--ignore-eos",
                  "--max-new-tokens", str(NEW_TOKENS), "--json", "--logits-out", str(logits_path)])
    assert rc == 0
    return json.loads(capsys.readouterr().out), np.load(logits_path)


@pytest.mark.parametrize("prompt_len", [5, 40])  # shorter than one prefill chunk, and three chunks
def test_greedy_tokens_and_logits_match_transformers(compiled, prompt_len, tmp_path, capsys):
    name, cfg, hf, out = compiled
    ids = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    result, logits = run(out, tmp_path, ids, capsys)
    assert result["input_ids"] == ids and len(result["output_ids"]) == NEW_TOKENS
    assert logits.shape == (NEW_TOKENS, cfg.vocab_size) and logits.dtype == np.float32

    # Teacher-forced reference over prompt + generated tokens: transformers' greedy choice at every step
    # must be the token g3n chose, and g3n's logits must be close to transformers'.
    seq = torch.tensor([ids + result["output_ids"]])
    with torch.no_grad():
        ref = hf(seq, use_cache=False).logits[0, prompt_len - 1:-1].numpy()
    assert ref.argmax(-1).tolist() == result["output_ids"], f"{name}: greedy tokens differ from transformers"
    err = np.abs(logits - ref).max()
    assert err <= 1e-3 * np.abs(ref).max(), f"{name}: logits differ by {err}"
    assert prompt_len + NEW_TOKENS > cfg.sliding_window  # the ring buffer wrapped


def test_module_holds_code_only(compiled):
    name, cfg, hf, out = compiled
    manifest = json.loads((out / "g3n.json").read_text())
    vmfb = out / manifest["targets"]["cpu"]["file"]
    weights = sum(p.numel() * 4 for p in hf.parameters())
    assert vmfb.stat().st_size < 2_000_000
    assert (out / "model.irpa").stat().st_size >= weights * 0.9
