"""Our audio tower + embedder vs transformers' Gemma3nAudioEncoder / Gemma3nMultimodalEmbedder on the same
re-randomised weights, loaded from a real multimodal checkpoint; fixed-shape inputs with padding masks."""

import json

import pytest
import torch

from audio_reference import CONFIGS, TEXT, hf_audio, hf_soft_tokens, save_multimodal_checkpoint
from g3n_compile.checkpoint import CheckpointError, load_text_model
from g3n_compile.checkpoint.safetensors import SafetensorsFile, write_safetensors
from g3n_compile.model.audio import AudioModel
from g3n_compile.model.audio_config import AudioConfig
from loaders import load_audio_model

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    encoder, embedder = hf_audio(cfg, seed=3)
    folder = save_multimodal_checkpoint(cfg, encoder, embedder, tmp_path_factory.mktemp(request.param))
    return request.param, cfg, encoder, embedder, folder, load_audio_model(folder)


def clip(cfg: AudioConfig, frames: int, seed: int) -> torch.Tensor:
    """Log-mel-like features: around -5 with a spread of 2."""
    return torch.randn(1, frames, cfg.input_feat_size, generator=torch.Generator().manual_seed(seed)) * 2 - 5


def bucket_frames(cfg: AudioConfig) -> int:
    """A frame count that fills several attention chunks after subsampling (and fits the soft tokens)."""
    return 36 * cfg.conf_attention_chunk_size


def padded(cfg: AudioConfig, features: torch.Tensor, frames: int):
    """The fixed-shape input: features after the clip hold garbage (it must not matter), mask False there."""
    n = features.shape[1]
    x = torch.full((1, frames, cfg.input_feat_size), 123.0)
    x[:, :n] = features
    return x, torch.arange(frames)[None] < n


def test_encoder_matches_transformers_on_the_clip_alone(case):
    """A clip padded to the bucket encodes as transformers encodes the clip unpadded; masked outputs are 0."""
    name, cfg, encoder, embedder, folder, model = case
    frames = bucket_frames(cfg)
    for n in (frames, frames - 1, frames // 2 + 3, 2 * cfg.conf_attention_chunk_size + 1, 7):
        features = clip(cfg, n, seed=n)
        with torch.no_grad():
            ref = encoder(features, torch.zeros(1, n, dtype=torch.bool)).last_hidden_state
            out, valid = model.audio_tower(*padded(cfg, features, frames))
        tokens = ref.shape[1]
        assert out.shape[1] == cfg.tokens(frames) and valid.sum().item() == tokens == cfg.tokens(n)
        err = (out[:, :tokens] - ref).abs().max().item()
        assert err <= TOL, f"{name}, {n} frames: encoder differs by {err}"
        assert ref.abs().max().item() > 0.5
        assert (out[:, tokens:] == 0).all()  # outputs past the clip are zero, as transformers masks them


def test_soft_tokens_match_transformers_merge(case):
    """The module's output: what transformers' Gemma3nModel writes into the placeholders, padding included."""
    name, cfg, encoder, embedder, folder, model = case
    frames = bucket_frames(cfg)
    for n in (frames, frames // 3):
        features = clip(cfg, n, seed=100 + n)
        with torch.no_grad():
            ref = hf_soft_tokens(cfg, encoder, embedder, features, torch.ones(1, n, dtype=torch.bool))
            out = model(*padded(cfg, features, frames))
        assert out.shape == (1, cfg.soft_tokens, cfg.text_hidden_size) == ref.shape
        err = (out - ref).abs().max().item()
        assert err <= TOL, f"{name}, {n} frames: soft tokens differ by {err}"


def test_hard_embeddings_match_transformers(case):
    name, cfg, encoder, embedder, folder, model = case
    ids = torch.arange(cfg.vocab_offset, cfg.vocab_offset + cfg.vocab_size)[None]
    with torch.no_grad():
        assert (model.embed_audio.hard(ids) - embedder(input_ids=ids)).abs().max().item() <= TOL


def test_a_wrong_weight_is_caught(case):
    name, cfg, encoder, embedder, folder, model = case
    features = clip(cfg, bucket_frames(cfg), seed=1)
    mask = torch.ones(features.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        ref = hf_soft_tokens(cfg, encoder, embedder, features, mask)
        model.audio_tower.conformer[-1].attention.attn.per_dim_scale.add_(0.05)
        try:
            assert (model(features, mask) - ref).abs().max().item() > TOL
        finally:
            model.audio_tower.conformer[-1].attention.attn.per_dim_scale.sub_(0.05)


def test_text_and_audio_load_from_one_checkpoint(case):
    name, cfg, encoder, embedder, folder, model = case
    assert model.config == cfg
    text = load_text_model(folder)  # the text loader leaves the audio tensors alone
    assert text.config.vocab_size == TEXT.vocab_size


def test_tiny_random_audio_takes_30_seconds():
    """The tiny-random tower at the real 30 s bucket: 2997 frames -> 188 tokens, a 12.3 s clip as transformers."""
    cfg = CONFIGS["tiny-random"]
    assert cfg.tokens(2997) == 188 == cfg.soft_tokens
    encoder, embedder = hf_audio(cfg, seed=4)
    model = AudioModel(cfg).eval()
    model.audio_tower.load_state_dict(encoder.state_dict())
    model.embed_audio.load_state_dict(embedder.state_dict())
    features = clip(cfg, 1228, seed=0)
    with torch.no_grad():
        ref = hf_soft_tokens(cfg, encoder, embedder, features, torch.ones(1, 1228, dtype=torch.bool))
        assert (model(*padded(cfg, features, 2997)) - ref).abs().max().item() <= TOL


def test_real_configuration_has_the_hub_tensors():
    """E2B/E4B audio config: our parameters are exactly transformers' (names and shapes), 681 M in the tower."""
    from transformers import Gemma3nAudioConfig, Gemma3nTextConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder, Gemma3nMultimodalEmbedder

    with torch.device("meta"):
        ours = AudioModel(AudioConfig())
        theirs = {"audio_tower." + n: p.shape for n, p in Gemma3nAudioEncoder(Gemma3nAudioConfig()).named_parameters()}
        theirs |= {"embed_audio." + n: p.shape for n, p in
                   Gemma3nMultimodalEmbedder(Gemma3nAudioConfig(), Gemma3nTextConfig()).named_parameters()}
    assert {n: p.shape for n, p in ours.named_parameters()} == theirs
    assert sum(p.numel() for p in ours.audio_tower.parameters()) == 681_348_640


# ---- bad checkpoints ------------------------------------------------------------------------------


@pytest.fixture
def ckpt(tmp_path):
    cfg = CONFIGS["hf-test"]
    encoder, embedder = hf_audio(cfg)
    return save_multimodal_checkpoint(cfg, encoder, embedder, tmp_path / "ckpt")


def error_of(folder) -> str:
    with pytest.raises(CheckpointError) as e:
        load_audio_model(folder)
    return str(e.value)


def edit_tensors(folder, edit):
    path = folder / "model.safetensors"
    st = SafetensorsFile(path)
    tensors = {n: st.tensor(n).clone() for n in st.keys()}
    st.close()
    edit(tensors)
    write_safetensors(path, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, lambda n: tensors[n])


def test_missing_unexpected_and_wrong_shapes_are_listed_together(ckpt):
    def edit(t):
        t.pop("model.audio_tower.conformer.1.lconv1d.linear_end.weight")
        t["model.audio_tower.conformer.0.attention.attn.per_dim_scale"] = torch.zeros(3)
        t["model.embed_audio.mystery.weight"] = torch.zeros(2)
    edit_tensors(ckpt, edit)
    msg = error_of(ckpt)
    assert "missing tensors (1): model.audio_tower.conformer.1.lconv1d.linear_end.weight" in msg
    assert "unexpected tensors (1): model.embed_audio.mystery.weight" in msg
    assert "wrong shapes (1): model.audio_tower.conformer.0.attention.attn.per_dim_scale: [3] in the file, [8] expected" in msg


def test_text_only_checkpoint_has_no_audio(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["audio_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert "audio_config: missing" in error_of(ckpt)


@pytest.mark.parametrize("field,value,expect", [
    ("conf_num_attention_heads", 5, "audio_config.conf_num_attention_heads: 5 does not divide hidden_size=32"),
    ("sscp_conv_stride_size", [2, 2], "audio_config.sscp_conv_stride_size: expected [[time, freq], [time, freq]]"),
    ("sscp_conv_channel_size", [16], "audio_config.sscp_conv_channel_size: expected 2 entries"),
    ("conf_attention_logit_cap", -1.0, "audio_config.conf_attention_logit_cap: expected a positive number"),
    ("conf_num_hidden_layers", 0, "audio_config.conf_num_hidden_layers: expected an integer >= 1"),
    ("vocab_offset", 0, "audio_config.vocab_offset: the audio ids 0..7 do not include the last text id 95"),
    ("model_type", "whisper", "audio_config.model_type: 'whisper' is not supported"),
])
def test_bad_audio_config_values(ckpt, field, value, expect):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["audio_config"][field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    msg = error_of(ckpt)
    assert expect in msg and str(ckpt) in msg


def test_bad_borrowed_fields_name_their_place(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["audio_soft_tokens_per_image"] = "many"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert "config.json: audio_soft_tokens_per_image: expected an integer >= 1, got 'many'" in error_of(ckpt)
