"""Text + image + audio in, text out: the compiled CPU modules (g3n-compile, g3n-run --image --audio) against
transformers' `Gemma3nForConditionalGeneration` on the same random weights, the processor's expansion, and
the errors.

The checkpoint is tiny-random's configuration (text, audio tower, vision tower, token ids, tokenizer) with
every weight drawn afresh in transformers' model and saved in the Hub layout. transformers runs its vision
tower through timm, which cannot be installed next to the CPU build of torch; in its place stands g3n's
MobileNetV5 under timm's parameter names (held to timm's own model by tests/test_vision_timm.py), so
transformers does everything else: the image/audio feature merge, the multimodal token embeddings, the
audio padding, per-layer inputs and generation.
"""

import json
import shutil
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from g3n_compile.model.multimodal_config import multimodal_config
from g3n_compile.compile import compile_model
from g3n_compile.checkpoint import resolve_checkpoint
from g3n_compile.checkpoint.safetensors import write_safetensors
from g3n_compile.checkpoint.tiny_random import AUDIO, CONFIG, PREPROCESSOR, TOKENS, VISION
from g3n_compile.model.vision import MobileNetV5
from reference import rerandomise
from runtime import load
from runtime.audio import log_mel, load_audio
from runtime.cli import main as g3n_run
from runtime.image import ImagePreprocessing, pixels
from runtime.media import IMAGE, MediaError, Placeholders, expand_text

CHUNK, MAX_CONTEXT, NEW_TOKENS = 64, 512, 32


class _VisionTower(nn.Module):
    """Stands in for transformers' TimmWrapperModel: g3n's MobileNetV5 as `timm_model`."""

    def __init__(self, config):
        super().__init__()
        self.timm_model = MobileNetV5(VISION.arch, VISION.hidden_size)

    def forward(self, pixel_values, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=self.timm_model(pixel_values))


def hf_multimodal_model(seed: int):
    from transformers import AutoModel, Gemma3nConfig, Gemma3nForConditionalGeneration
    from transformers.models.gemma3n import modeling_gemma3n
    from transformers.models.gemma3n.configuration_gemma3n import Gemma3nVisionConfig

    class Towers:
        @staticmethod
        def from_config(config, **kwargs):
            return _VisionTower(config) if isinstance(config, Gemma3nVisionConfig) else AutoModel.from_config(config, **kwargs)

    config = Gemma3nConfig(**multimodal_config(CONFIG.to_hf_dict(), AUDIO, VISION, TOKENS))
    config.text_config._attn_implementation = "eager"
    with mock.patch.object(modeling_gemma3n, "AutoModel", Towers):
        model = Gemma3nForConditionalGeneration(config).eval()
    rerandomise(model, seed)
    return model


def save_hub_checkpoint(model, folder):
    """The model's weights in the Hub layout (lm_head tied, so left out), tiny-random's config and tokenizer."""
    folder.mkdir(parents=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file_name, group in shards.items():
        write_safetensors(folder / file_name, {n: (tensors[n].dtype, tuple(tensors[n].shape)) for n in group},
                          lambda n: tensors[n], metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, group in shards.items() for n in group}}))
    (folder / "config.json").write_text(json.dumps(multimodal_config(CONFIG.to_hf_dict(), AUDIO, VISION, TOKENS)))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(resolve_checkpoint("tiny-random") / name, folder / name)
    return folder


def write_wav(path, samples, rate=16_000):
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    tmp = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(3)
    image = tmp / "picture.png"
    Image.fromarray((rng.random((90, 150, 3)) * 255).astype(np.uint8)).save(image)
    t = np.arange(int(16_000 * 4.3)) / 16_000  # 4.3 s: 108 real audio tokens, 80 padding ones
    clip = write_wav(tmp / "clip.wav", 0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.05 * rng.standard_normal(len(t)))
    return image, clip


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multimodal")
    hf = hf_multimodal_model(seed=7)
    folder = save_hub_checkpoint(hf, tmp / "ckpt")
    out = tmp / "out"
    compile_model(str(folder), "cpu", out, max_context=MAX_CONTEXT, chunk=CHUNK, log=lambda *_: None)
    return hf, out


def test_image_and_audio_prompt_generates_what_transformers_generates(compiled, media, tmp_path, capsys):
    hf, out = compiled
    image, clip = media
    logits_path = tmp_path / "logits.npy"
    assert g3n_run([str(out), "--prompt", "Describe both.", "--image", str(image), "--audio", str(clip), "--greedy",
                    "--ignore-eos", "--max-new-tokens", str(NEW_TOKENS), "--json", "--logits-out", str(logits_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    ids, logits = result["input_ids"], np.load(logits_path)
    assert ids.count(TOKENS.image_token_id) == VISION.soft_tokens and ids.count(TOKENS.audio_token_id) == AUDIO.soft_tokens
    assert len(ids) > 3 * CHUNK  # the soft tokens straddle prefill chunks

    # transformers from the same pixels and features (the runtime's, held to transformers' processor by
    # test_image.py and test_audio_features.py), generating greedily with its own cache.
    features, mask = log_mel(load_audio(clip))
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), pixel_values=torch.from_numpy(pixels(image, ImagePreprocessing(128, 128))),
                          input_features=torch.from_numpy(features)[None], input_features_mask=torch.from_numpy(mask)[None],
                          max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_tokens = ref.sequences[0, len(ids):].tolist()
    ref_logits = torch.cat(ref.logits).numpy()
    assert result["output_ids"] == ref_tokens
    err = np.abs(logits - ref_logits).max()
    print(f"max logit difference over {NEW_TOKENS} steps: {err:.2e} (max |logit| {np.abs(ref_logits).max():.1f})")
    assert err <= 1e-3 * np.abs(ref_logits).max()


def test_folder_records_the_encoders(compiled):
    _, out = compiled
    m = json.loads((out / "g3n.json").read_text())
    assert m["encoders"]["audio"]["frames"] == 2997 and m["encoders"]["audio"]["soft_tokens"] == 188
    assert m["encoders"]["vision"]["image_size"] == 128 and m["encoders"]["vision"]["soft_tokens"] == 16
    assert {e["file"] for e in m["targets"]["cpu"]["encoders"].values()} == {"cpu-audio.vmfb", "cpu-vision.vmfb"}
    assert m["multimodal_tokens"]["first_id"] == CONFIG.vocab_size_per_layer_input
    assert [a["name"] for a in m["functions"]["prefill"]["args"]][-2:] == ["embeds", "embeds_mask"]


def test_processor_expansion(compiled):
    _, out = compiled
    llm = load(out)
    ids = llm.chat_ids([{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                     {"type": "audio", "audio": "b.wav"},
                                                     {"type": "text", "text": "Hi"}]}])
    tok = llm.tokenizer
    newlines = tok.encode("\n\n", add_bos=False)
    image_run = newlines + [TOKENS.boi_token_id] + [TOKENS.image_token_id] * 16 + [TOKENS.eoi_token_id] + newlines
    audio_run = newlines + [TOKENS.boa_token_id] + [TOKENS.audio_token_id] * 188 + [TOKENS.eoa_token_id] + newlines
    head = tok.encode("<start_of_turn>user\n", add_bos=True)
    tail = tok.encode("Hi<end_of_turn>\n<start_of_turn>model\n", add_bos=False)
    assert ids == head + image_run + audio_run + tail


def test_expansion_is_the_processors():
    """transformers' Gemma3nProcessor builds `\\n\\n{boi}{image_token * 256}{eoi}\\n\\n` per image."""
    names = {1: "<start_of_image>", 2: "<image_soft_token>", 3: "<end_of_image>"}
    text = expand_text("A<image_soft_token>B", Placeholders(IMAGE, 1, 2, 3, 256), 1, names.get)
    assert text == "A\n\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\n\nB"
    with pytest.raises(MediaError, match="0 <image_soft_token> placeholders for 1 image"):
        expand_text("A", Placeholders(IMAGE, 1, 2, 3, 256), 1, names.get)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("g3n-run: error:"), err
    return err[0]


def test_bad_media_are_one_line_errors(compiled, media, tmp_path, capsys):
    _, out = compiled
    image, clip = media
    (tmp_path / "broken.png").write_bytes(image.read_bytes()[:200])
    (tmp_path / "text.wav").write_text("not audio")
    empty = write_wav(tmp_path / "empty.wav", np.zeros(0))
    cases = [(["--image", str(tmp_path / "missing.png")], "no such file"),
             (["--image", str(tmp_path / "broken.png")], "cannot decode"),
             (["--audio", str(tmp_path / "text.wav")], "not a WAV file"),
             (["--audio", str(empty)], "no samples"),
             (["--audio", str(clip)] * 3, "soft tokens"),  # 3 x 192 tokens > 512
             (["--raw", "--image", str(image)], "0 <image_soft_token> placeholders for 1 image")]
    for flags, message in cases:
        assert g3n_run([str(out), "--prompt", "Hi", "--max-new-tokens", "2", *flags]) == 1
        assert message in error_line(capsys)


def test_folder_without_the_tower(compiled, media, tmp_path, capsys):
    """A folder whose checkpoint had no vision tower (its g3n.json lists no vision encoder)."""
    _, out = compiled
    folder = shutil.copytree(out, tmp_path / "no-vision")
    m = json.loads((folder / "g3n.json").read_text())
    del m["encoders"]["vision"], m["targets"]["cpu"]["encoders"]["vision"]
    (folder / "g3n.json").write_text(json.dumps(m))
    assert g3n_run([str(folder), "--prompt", "Hi", "--image", str(media[0])]) == 1
    assert "has no vision encoder" in error_line(capsys)
