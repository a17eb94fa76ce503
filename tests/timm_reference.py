"""timm's MobileNetV5 as the numerical reference for the vision encoder, run in its own cached virtualenv.

timm imports torchvision, and the registry's torchvision wheels need the default (CUDA) build of torch,
which cannot sit next to the CPU build in g3n's venv. A CUDA build runs on the CPU, so the reference gets
a venv of its own: created on first use (5.5 GB installed, CUDA libraries included) under
`$G3N_TIMM_VENV`, else `~/.cache/g3n/timm-ref-venv-<versions>`, and reused afterwards. The test writes
the weights (safetensors with timm's names) and the pixels (.npy); `timm_encoder.py` builds timm's own
`mobilenetv5_300m_enc` in that venv, loads the weights strictly and writes its `forward_features` back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from g3n_compile.checkpoint.safetensors import write_safetensors

TORCH, TORCHVISION, TIMM = "2.14.1", "0.29.1", "1.0.29"  # a matching torch/torchvision pair
SCRIPT = Path(__file__).with_name("timm_encoder.py")


def venv_dir() -> Path:
    default = Path.home() / ".cache" / "g3n" / f"timm-ref-venv-torch{TORCH}-timm{TIMM}"
    return Path(os.environ.get("G3N_TIMM_VENV") or default)


def ensure_venv(log=print) -> Path:
    """The reference venv's python, created on first use; a marker file written last tells a finished
    venv from an interrupted install, which is started over."""
    folder = venv_dir()
    marker = folder / "g3n-ready"
    if not marker.is_file():
        log(f"creating the timm reference venv in {folder} (torch {TORCH}, torchvision {TORCHVISION}, timm {TIMM})")
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet",
                        f"torch=={TORCH}", f"torchvision=={TORCHVISION}", f"timm=={TIMM}", "numpy"], check=True)
        marker.write_text(json.dumps({"torch": TORCH, "torchvision": TORCHVISION, "timm": TIMM}))
    return folder / "bin" / "python"


def timm_forward(weights: dict[str, torch.Tensor], pixels: dict[str, np.ndarray], workdir: Path,
                 arch: dict | None = None) -> dict[str, np.ndarray]:
    """timm's `mobilenetv5_300m_enc` (or, with `arch` = {stem_size, stages, msfa_output_resolution}, the
    same model built from those block strings) with `weights` (timm names): `forward_features` of each
    named pixel batch."""
    python = ensure_venv()
    workdir.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().float().contiguous() for n, t in weights.items()}
    write_safetensors(workdir / "weights.safetensors", {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()},
                      lambda n: tensors[n])
    for name, batch in pixels.items():
        np.save(workdir / f"pixels-{name}.npy", batch.astype(np.float32))
    if arch is not None:
        (workdir / "arch.json").write_text(json.dumps(arch))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # nothing of g3n's venv
    done = subprocess.run([str(python), str(SCRIPT), str(workdir)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"timm reference failed:\n{done.stderr[-4000:]}")
    return {name: np.load(workdir / f"features-{name}.npy") for name in pixels}
