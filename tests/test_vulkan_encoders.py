"""Both encoders on Vulkan (issue 18): `g3n-compile --target vulkan` on tiny-random writes the audio and vision
modules, they run on llvmpipe with the CPU modules' soft tokens (1e-4 relative), and an image + audio prompt
generates the CPU module's greedy tokens.

The vision tower compiles for Vulkan in another form (targets/vulkan.py, model/vision.py's RMSNorm2d): its
channel norms sum by matmul, and its padding is fused into the convs that read it."""

import iree.compiler as ic
import numpy as np
import pytest
import torch
from PIL import Image

from g3n_compile.checkpoint import Checkpoint, resolve_checkpoint
from g3n_compile.checkpoint.towers import find_towers
from g3n_compile.compile import compile_model
from g3n_compile.export.encoders import export_encoder
from g3n_compile.model.vision import RMSNorm2d, sum_channels_by_matmul
from runtime import load
from targets import cuda, vulkan
from test_cpu_targets import assert_close, soft_tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("vulkan-encoders") / "tiny"
    compile_model("tiny-random", "cpu,vulkan", out, max_context=256, chunk=32, log=lambda *_: None)
    return out


def test_the_matmul_form_of_the_channel_norm_is_the_norm():
    torch.manual_seed(0)
    norm = RMSNorm2d(64, act=True)
    norm.weight.data.normal_()
    x = torch.randn(1, 64, 12, 10)
    plain = norm(x)
    norm.sums_by_matmul = True
    torch.testing.assert_close(norm(x), plain, rtol=1e-5, atol=1e-6)


def test_vulkan_encoders_give_the_cpu_soft_tokens(folder):
    assert {p.name for p in folder.glob("vulkan*.vmfb")} == {"vulkan.vmfb", "vulkan-audio.vmfb", "vulkan-vision.vmfb"}
    cpu, vk = soft_tokens(folder, "cpu"), soft_tokens(folder, "vulkan")
    for kind in ("audio", "vision"):
        assert_close(vk[kind], cpu[kind], f"vulkan {kind} soft tokens")


def test_an_image_and_audio_prompt_on_vulkan_generates_what_the_cpu_generates(folder, tmp_path):
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 255, (96, 128, 3), np.uint8))
    audio = (0.3 * np.sin(np.arange(48000) / 8)).astype(np.float32)
    tokens = {}
    for device in ("cpu", "vulkan"):
        llm = load(folder, device=device)
        ids = llm.chat_ids([{"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "audio", "audio": audio},
                                                         {"type": "text", "text": "What do you see and hear?"}]}])
        tokens[device] = llm.generate(ids, max_new_tokens=12, ignore_eos=True, images=[image],
                                      audios=[audio]).output_ids
    assert tokens["vulkan"] == tokens["cpu"] and len(tokens["cpu"]) == 12


@pytest.mark.slow  # five compiles, ~100 s on 2 cores
@pytest.mark.parametrize("target,arch", [(vulkan, "rdna3"), (vulkan, "ampere"), (vulkan, "valhall"), (cuda, "sm_80"),
                                         (cuda, "sm_90")])
def test_the_vision_encoder_compiles_for_real_gpus(target, arch, tmp_path):
    """Compile only (no such GPU here), in the form and with the flags g3n-compile gives that target."""
    tower = next(t for t in find_towers(Checkpoint(resolve_checkpoint("tiny-random")), torch.float32)
                 if t.kind == "vision")
    sum_channels_by_matmul(tower.model, target.SUPPORTS.channel_sums_by_matmul)
    source = tmp_path / "vision.mlir"
    source.write_text(export_encoder("vision", tower.model, tower.preprocessing).mlir)
    flags = target.compile_flags(arch) + list((target.SUPPORTS.encoder_flags or {}).get("vision", ()))
    ic.compile_file(str(source), output_file=str(tmp_path / "vision.vmfb"), input_type="torch", extra_args=flags)
    assert (tmp_path / "vision.vmfb").stat().st_size > 0
