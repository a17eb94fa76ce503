"""The vision encoder vs timm's own `mobilenetv5_300m_enc` on the same random weights: <= 1e-4 relative
(max |ours - timm| / max |timm|).

Slow tier (`-m slow`): timm runs in its own cached venv (timm_reference.py; the first run installs
5.5 GB). It loads our weights strictly, so every name and shape must be timm's too.
  * the real 300M encoder at 768, 512 and 256 pixels (average-pooled fusion by 3 and 2, and none);
  * the tiny variant, which timm builds from the same block strings, at 128 (pooled fusion), 96
    (bilinear fusion) and 130 (odd sizes: asymmetric TF-SAME padding everywhere).
Default tier: the tiny variant at 128 vs timm's output recorded in data/ (no timm needed). The slow
tier checks that the recording still is timm's output; `G3N_RECORD_TIMM=1 ... -m slow` rewrites it.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from g3n_compile.model.vision_config import MOBILENETV5_300M, MOBILENETV5_300M_NAME, TINY_IMAGE_SIZE, VisionConfig
from vision_reference import random_model, tiny_config, tower_weights

TOL = 1e-4
RECORDED = Path(__file__).with_name("data") / "timm_tiny_mobilenetv5.npy"


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def encode(model, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.encoder(torch.from_numpy(pixels)).numpy()


def images(size: int, batch: int = 1) -> np.ndarray:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size)).numpy()


def tiny_2048():
    """The tiny variant at timm's fixed encoder width."""
    return random_model(tiny_config(16, hidden_size=2048), seed=1)


def test_tiny_encoder_matches_recorded_timm_output():
    ours = encode(tiny_2048(), images(TINY_IMAGE_SIZE))
    assert relative_error(ours, np.load(RECORDED)) <= TOL


@pytest.mark.slow
def test_tiny_encoder_matches_timm(tmp_path):
    model = tiny_2048()
    pixels = {str(s): images(s, batch=2 if s == TINY_IMAGE_SIZE else 1) for s in (TINY_IMAGE_SIZE, 96, 130)}
    ref = timm_forward(model, pixels, tmp_path, arch=model.config.arch.to_dict())
    errors = {s: relative_error(encode(model, p), ref[s]) for s, p in pixels.items()}
    print(f"tiny MobileNetV5 vs timm, relative error by image size: {errors}")
    assert max(errors.values()) <= TOL
    recorded = ref[str(TINY_IMAGE_SIZE)][:1]
    if os.environ.get("G3N_RECORD_TIMM"):
        RECORDED.parent.mkdir(exist_ok=True)
        np.save(RECORDED, recorded)
    assert relative_error(np.load(RECORDED), recorded) <= 1e-6, "the recording is stale: G3N_RECORD_TIMM=1 rewrites it"


@pytest.mark.slow
def test_real_encoder_matches_timm(tmp_path):
    torch.set_num_threads(2)
    model = random_model(VisionConfig(MOBILENETV5_300M_NAME, MOBILENETV5_300M, 2048, 2048, 256), seed=2)
    pixels = {str(s): images(s) for s in (768, 512, 256)}
    ref = timm_forward(model, pixels, tmp_path)
    errors = {s: relative_error(encode(model, p), ref[s]) for s, p in pixels.items()}
    print(f"mobilenetv5_300m_enc vs timm, relative error by image size: {errors}")
    assert all(r.shape == (1, 2048, 16, 16) for r in ref.values())
    assert max(errors.values()) <= TOL


def timm_forward(model, pixels, workdir, arch=None):
    from timm_reference import timm_forward as run

    return run(tower_weights(model), pixels, workdir, arch)
