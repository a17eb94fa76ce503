"""Weight dtypes: a bf16 checkpoint compiles to bf16 weights by default (no conversion, half the
archive), or to float32 on request; both compiled modules agree with the eager model of the same weights."""

import json

import numpy as np
import pytest
import torch

from g3n_compile.checkpoint import load_text_model
from g3n_compile.compile import compile_model
from reference import CONFIGS, hf_model, save_checkpoint
from runtime import load

CHUNK, MAX_CONTEXT = 16, 64


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    cfg = CONFIGS["window-5"]
    return cfg, save_checkpoint(hf_model(cfg, seed=5), cfg, tmp_path_factory.mktemp("bf16") / "ckpt",
                                layout="multimodal", dtype=torch.bfloat16)


def eager_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).float()[0].numpy()


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_compiled_weights_dtype(bf16_checkpoint, tmp_path, dtype):
    cfg, folder = bf16_checkpoint
    out = tmp_path / "out"
    compile_model(str(folder), "cpu", out, max_context=MAX_CONTEXT, chunk=CHUNK, dtype=dtype, log=lambda *_: None)
    manifest = json.loads((out / "g3n.json").read_text())
    stored = "bfloat16" if dtype == "auto" else "float32"
    assert manifest["weight_dtype"] == stored and manifest["per_layer_rows"]["dtype"] == stored
    weights = sum(p.numel() for p in load_text_model(folder).parameters()) * (2 if dtype == "auto" else 4)
    assert weights <= (out / "model.irpa").stat().st_size < 1.1 * weights + 65536  # + alignment, index

    llm = load(out)
    ids = torch.randint(0, cfg.vocab_size, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    result = llm.generate(ids, max_new_tokens=12, keep_logits=True, ignore_eos=True)
    got = np.stack(result.logits)
    seq = ids + result.output_ids
    # The reference is the float32 computation on these (bf16-valued) weights.
    ref = eager_logits(load_text_model(folder, dtype=torch.float32), seq)[len(ids) - 1:-1]
    scale = np.abs(ref).max()
    if dtype == "auto":
        # bf16 matmuls round differently in IREE and in torch; the compiled module must be no further
        # from float32 than torch's own bf16 computation is.
        bf16 = eager_logits(load_text_model(folder, dtype=torch.bfloat16), seq)[len(ids) - 1:-1]
        tolerance = 2 * np.abs(bf16 - ref).max()
    else:
        tolerance = 1e-3 * scale
    err = np.abs(got - ref).max()
    assert err <= tolerance, f"{dtype}: logits differ from float32 eager by {err} (allowed {tolerance})"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
