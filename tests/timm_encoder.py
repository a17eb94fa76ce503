"""Run timm's MobileNetV5 encoder on given weights and pixels. Runs in the timm reference venv
(see timm_reference.py), not in g3n's: it imports only torch, timm and numpy.

usage: python timm_encoder.py WORKDIR
    WORKDIR/weights.safetensors  timm parameter names (strict load: every name and shape must match)
    WORKDIR/pixels-NAME.npy      float32 [B, 3, H, W], any number of them
    WORKDIR/arch.json            optional {stem_size, stages: [[block string]], msfa_output_resolution}
writes WORKDIR/features-NAME.npy float32 forward_features output [B, 2048, r, r] for each
"""

import json
import sys
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import load_file
from timm.models._efficientnet_builder import decode_arch_def


def main(workdir: Path) -> None:
    torch.set_num_threads(2)
    kwargs = {}
    if (workdir / "arch.json").is_file():
        arch = json.loads((workdir / "arch.json").read_text())
        # timm's block strings carry a repeat count; g3n's give one block per string.
        stages = [[s if "_r" in s else s.replace("_", "_r1_", 1) for s in stage] for stage in arch["stages"]]
        kwargs = dict(block_args=decode_arch_def(stages), stem_size=arch["stem_size"],
                      msfa_output_resolution=arch["msfa_output_resolution"])
    model = timm.create_model("mobilenetv5_300m_enc", pretrained=False, **kwargs).eval()
    model.load_state_dict(load_file(workdir / "weights.safetensors"), strict=True)
    for path in sorted(workdir.glob("pixels-*.npy")):
        with torch.no_grad():
            out = model.forward_features(torch.from_numpy(np.load(path)))
        np.save(workdir / path.name.replace("pixels-", "features-"), out.numpy())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
