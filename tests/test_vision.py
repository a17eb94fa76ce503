"""The vision path without timm: the real architecture's shapes, the soft tokens vs transformers'
`get_image_features` + `Gemma3nMultimodalEmbedder`, checkpoint loading and its errors, config errors.
(The encoder's numerics vs timm: test_vision_timm.py.)"""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from g3n_compile.checkpoint import CheckpointError
from g3n_compile.model.config import ConfigError
from g3n_compile.checkpoint.safetensors import SafetensorsFile, write_safetensors
from g3n_compile.model.vision import Gemma3nVisionModel
from loaders import load_vision_model
from g3n_compile.model.vision_config import (MOBILENETV5_300M, MOBILENETV5_300M_NAME, TINY_IMAGE_SIZE, VisionConfig,
                                       parse_arch)
from reference import CONFIGS, hf_text_config
from vision_reference import random_model, save_checkpoint, tiny_config

TEXT = CONFIGS["hf-test"]
REAL = VisionConfig(MOBILENETV5_300M_NAME, MOBILENETV5_300M, 2048, 2048, 256)


def test_real_architecture_shapes():
    with torch.device("meta"):
        model = Gemma3nVisionModel(REAL)
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    tower = {n: s for n, s in shapes.items() if n.startswith("vision_tower.timm_model.")}
    assert sum(torch.Size(s).numel() for s in tower.values()) == 294_126_912
    assert [len(stage) for stage in model.encoder.blocks] == [3, 5, 37, 39]
    t = "vision_tower.timm_model."
    expect = {
        "conv_stem.conv.weight": [64, 3, 3, 3], "conv_stem.conv.bias": [64], "blocks.0.0.conv_exp.weight": [256, 64, 3, 3],
        "blocks.0.1.conv_pwl.weight": [128, 512, 1, 1], "blocks.1.0.dw_start.conv.weight": [128, 1, 3, 3],
        "blocks.1.0.dw_mid.conv.weight": [768, 1, 5, 5], "blocks.2.8.pw_exp.conv.weight": [640, 640, 1, 1],
        "blocks.2.9.attn.query.proj.weight": [768, 640, 1, 1], "blocks.2.9.attn.key.down_conv.weight": [640, 1, 3, 3],
        "blocks.2.9.attn.value.proj.weight": [64, 640, 1, 1], "blocks.2.9.layer_scale.gamma": [640],
        "blocks.3.1.attn.key.proj.weight": [96, 1280, 1, 1], "blocks.3.1.attn.output.proj.weight": [1280, 1536, 1, 1],
        "blocks.3.38.pw_proj.conv.weight": [1280, 2560, 1, 1], "msfa.ffn.pw_exp.conv.weight": [3840, 1920, 1, 1],
        "msfa.ffn.pw_proj.bn.weight": [2048], "msfa.norm.weight": [2048],
    }
    assert {n: tower[t + n] for n in expect} == expect
    assert t + "blocks.3.1.attn.key.down_conv.weight" not in tower  # stage 3 keys are not strided
    assert shapes["embed_vision.embedding_projection.weight"] == [2048, 2048]
    assert shapes["embed_vision.embedding.weight"] == [128, 2048]


def test_hub_config_parses_to_the_real_encoder():
    hub = {"model_type": "gemma3n", "text_config": {"hidden_size": 2048},
           "vision_config": {"architecture": "mobilenetv5_300m_enc", "do_pooling": False, "hidden_size": 2048,
                             "model_type": "gemma3n_vision", "num_classes": 2, "rms_norm_eps": 1e-06,
                             "vocab_offset": 262144, "vocab_size": 128},
           "vision_soft_tokens_per_image": 256}
    assert VisionConfig.from_hf_dict(hub) == REAL
    tiny = tiny_config(TEXT.hidden_size)
    assert VisionConfig.from_hf_dict({"text_config": {"hidden_size": TEXT.hidden_size}, **tiny.to_hf_dict()}) == tiny


def _hf_reference(cfg: VisionConfig, ours: Gemma3nVisionModel):
    """transformers' get_image_features (reshape, scale) and its embedder, with our encoder as the tower
    (transformers itself needs timm for the tower)."""
    from transformers import Gemma3nConfig
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nModel, Gemma3nMultimodalEmbedder

    d = cfg.to_hf_dict()
    vision = {k: v for k, v in d["vision_config"].items() if k != "g3n_arch"}
    hf_cfg = Gemma3nConfig(text_config=hf_text_config(TEXT), vision_config=vision, audio_config={},
                           vision_soft_tokens_per_image=d["vision_soft_tokens_per_image"])
    embedder = Gemma3nMultimodalEmbedder(hf_cfg.vision_config, hf_cfg.text_config).eval()
    embedder.load_state_dict({k.removeprefix("embed_vision."): v for k, v in ours.state_dict().items()
                              if k.startswith("embed_vision.")})
    tower = lambda pixel_values, **_: BaseModelOutputWithPooling(last_hidden_state=ours.encoder(pixel_values))
    model = SimpleNamespace(config=hf_cfg, vision_tower=tower, embed_vision=embedder)
    return lambda pixels: Gemma3nModel.get_image_features(model, pixels).pooler_output, embedder


def test_soft_and_hard_embeddings_match_transformers():
    cfg = tiny_config(TEXT.hidden_size)
    ours = random_model(cfg, seed=3)
    hf_image_features, hf_embedder = _hf_reference(cfg, ours)
    pixels = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(cfg.vocab_offset, cfg.vocab_offset + cfg.vocab_size)[None]
    with torch.no_grad():
        soft, ref_soft = ours(pixels), hf_image_features(pixels)
        hard, ref_hard = ours.embed_vision.hard(ids), hf_embedder(input_ids=ids)
    assert soft.shape == (2, cfg.soft_tokens, TEXT.hidden_size) == ref_soft.shape
    assert (soft - ref_soft).abs().max().item() <= 1e-5
    assert (hard - ref_hard).abs().max().item() <= 1e-5
    assert ref_soft.abs().max().item() > 0.5
    assert (soft[0] - soft[1]).abs().max().item() > 0.1  # the images are told apart


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = tiny_config(TEXT.hidden_size)
    model = random_model(cfg, seed=4)
    return model, save_checkpoint(model, TEXT, tmp_path_factory.mktemp("vision"))


def test_checkpoint_loads_name_for_name(saved, tmp_path):
    model, folder = saved
    loaded = load_vision_model(folder)
    pixels = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded(pixels), model(pixels))
    bf16 = load_vision_model(save_checkpoint(model, TEXT, tmp_path / "bf16", dtype=torch.bfloat16), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def _error(folder) -> str:
    with pytest.raises(CheckpointError) as e:
        load_vision_model(folder)
    return str(e.value)


def test_tensor_problems_are_listed_together(saved, tmp_path):
    folder = shutil.copytree(saved[1], tmp_path / "ckpt")
    st = SafetensorsFile(folder / "model.safetensors")
    tensors = {n: st.tensor(n).clone() for n in st.keys()}
    st.close()
    del tensors["model.vision_tower.timm_model.blocks.2.2.attn.key.down_conv.weight"]
    tensors["model.vision_tower.timm_model.msfa.norm.weight"] = torch.zeros(3)
    tensors["model.embed_vision.mystery"] = torch.zeros(2)
    tensors["model.language_model.layers.0.whatever"] = torch.zeros(2)  # not the vision loader's business
    write_safetensors(folder / "model.safetensors", {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()},
                      lambda n: tensors[n])
    msg = _error(folder)
    assert "missing tensors (1): model.vision_tower.timm_model.blocks.2.2.attn.key.down_conv.weight" in msg
    assert "wrong shapes (1): model.vision_tower.timm_model.msfa.norm.weight: [3] in the file, [64] expected" in msg
    assert "unexpected tensors (1): model.embed_vision.mystery" in msg


@pytest.mark.parametrize("edit,expect", [
    (lambda c: c.pop("vision_config"), "vision_config: missing (a text-only checkpoint"),
    (lambda c: c["vision_config"].update(architecture="mobilenetv4"), "architecture: 'mobilenetv4' is not supported"),
    (lambda c: c["vision_config"].update(architecture="mobilenetv5_300m_enc"),
     "g3n_arch: only with architecture 'mobilenetv5'"),
    (lambda c: c.update(vision_soft_tokens_per_image=256), "vision_soft_tokens_per_image: 256 does not match"),
    (lambda c: c["vision_config"]["g3n_arch"]["stages"][2].__setitem__(1, "uir_a0_k0_s2_e1_c32"),
     "stages[2][1] 'uir_a0_k0_s2_e1_c32': stride must be 1"),
    (lambda c: c["vision_config"]["g3n_arch"]["stages"][0].__setitem__(0, "er_k3_s2_x4_c16"),
     "stages[0][0]: 'er_k3_s2_x4_c16': 'x4' is not a er option"),
    (lambda c: c["vision_config"]["g3n_arch"]["stages"][3].__setitem__(1, "mqa_k3_h2_s1_c48"), "lacks d"),
    (lambda c: c["vision_config"]["g3n_arch"].pop("stem_size"), "g3n_arch.stem_size: missing"),
    (lambda c: c["vision_config"].update(hidden_size=0), "hidden_size: expected an integer >= 1"),
])
def test_bad_vision_config_is_named(saved, tmp_path, edit, expect):
    folder = shutil.copytree(saved[1], tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    msg = _error(folder)
    assert expect in msg and "config.json" in msg


def test_real_encoder_width_is_fixed():
    with pytest.raises(ConfigError, match="outputs 2048 channels"):
        VisionConfig(MOBILENETV5_300M_NAME, MOBILENETV5_300M, 1024, 2048, 256)
    with pytest.raises(ConfigError, match="at least 2 stages"):
        parse_arch({"stem_size": 8, "stages": [["er_k3_s2_e4_c16"]], "msfa_output_resolution": 2}, "g3n_arch.")
