"""`tiny-random`: the built-in default model, a deterministic random-weight Gemma 3n of about 6 MB.

Every feature of the text decoder is switched on (per-layer widths, AltUp with 4 streams, LAuReL, PLE,
sliding and full layers, KV sharing, activation sparsity, logit softcapping), and it has small audio and
vision towers (`tiny_audio_config`: real 128-bin features and attention geometry, 30 s clips -> 188 soft
tokens; `TINY_MOBILENETV5`: 128 x 128 images -> 16 soft tokens) with the multimodal token ids after the
512 text ids, as in the real vocabulary. It is written in the real Hub layout of
`Gemma3nForConditionalGeneration` (sharded safetensors + index, config.json, preprocessor_config.json,
tokenizer.json, tokenizer_config.json with the Gemma chat template), so the code that loads it is the
code that loads real checkpoints.
A random model generates nonsense; it exists to exercise the whole pipeline in seconds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

from runtime.abi import PromptTokens

from ..model.audio import AudioModel
from ..model.audio_config import tiny_audio_config
from ..model.config import FULL, SLIDING, TextConfig
from ..model.multimodal_config import multimodal_config
from ..model.text import Gemma3nTextModel
from ..model.vision import Gemma3nVisionModel
from ..model.vision_config import TINY_IMAGE_SIZE, TINY_MOBILENETV5, custom_config
from .safetensors import write_safetensors

NAME = "tiny-random"
VERSION = 2  # bump when the weights, config or tokenizer change: the cache folder is keyed on it

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<start_of_audio>"]
TEXT_VOCAB = 512
MEDIA_VOCAB = 8  # ids per embedder: vision TEXT_VOCAB.., audio after them (the real model has 128 each)
# The first ids of each embedder's range, as in Gemma 3n (<end_of_image> = 262144, <image_soft_token> = 262145, ...).
MEDIA_TOKENS = {TEXT_VOCAB: "<end_of_image>", TEXT_VOCAB + 1: "<image_soft_token>",
                TEXT_VOCAB + MEDIA_VOCAB: "<end_of_audio>", TEXT_VOCAB + MEDIA_VOCAB + 1: "<audio_soft_token>"}

CONFIG = TextConfig(
    vocab_size=TEXT_VOCAB + 2 * MEDIA_VOCAB, vocab_size_per_layer_input=TEXT_VOCAB, hidden_size=128,
    hidden_size_per_layer_input=16, intermediate_size=(256, 192, 256, 320, 256, 192), num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    layer_types=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL), sliding_window=16,
    rope_theta_full=1_000_000.0, rope_theta_sliding=10_000.0, rms_norm_eps=1e-6, final_logit_softcapping=30.0,
    altup_num_inputs=4, altup_active_idx=0, altup_correct_scale=True, altup_coef_clip=120.0, laurel_rank=16,
    num_kv_shared_layers=2, activation_sparsity_pattern=(0.95, 0.95, 0.0, 0.0, 0.0, 0.0),
    max_position_embeddings=2048, pad_token_id=0, bos_token_id=2,
    eos_token_id=(1, SPECIAL_TOKENS.index("<end_of_turn>")),
)
AUDIO = tiny_audio_config(CONFIG.hidden_size, CONFIG.vocab_size, MEDIA_VOCAB)
VISION = custom_config(TINY_MOBILENETV5, 64, CONFIG.hidden_size, vocab_offset=TEXT_VOCAB, vocab_size=MEDIA_VOCAB)
TOKENS = PromptTokens(boi_token_id=SPECIAL_TOKENS.index("<start_of_image>"), eoi_token_id=TEXT_VOCAB,
                      image_token_id=TEXT_VOCAB + 1, boa_token_id=SPECIAL_TOKENS.index("<start_of_audio>"),
                      eoa_token_id=TEXT_VOCAB + MEDIA_VOCAB, audio_token_id=TEXT_VOCAB + MEDIA_VOCAB + 1)
# What the Hub's preprocessor_config.json holds (audio feature extractor and image processor), at this size.
PREPROCESSOR = {"processor_class": "Gemma3nProcessor", "feature_extractor_type": "Gemma3nAudioFeatureExtractor",
                "feature_size": 128, "sampling_rate": 16_000, "padding_value": 0.0, "dither": 0.0,
                "image_processor_type": "SiglipImageProcessorFast", "size": {"height": TINY_IMAGE_SIZE,
                                                                               "width": TINY_IMAGE_SIZE},
                "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False}

# Gemma 3n's chat template (as shipped in the Hub's tokenizer_config.json).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' -%}{{ '<audio_soft_token>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image_soft_token>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)

# What the tokenizer is trained on: enough text for a few hundred merges.
_CORPUS = """
Gemma is a family of lightweight, state-of-the-art open models built from the same research and technology
used to create the Gemini models. Gemma 3n is optimized for use in everyday devices, such as phones,
laptops, and tablets. It handles text, image, video and audio input, and generates text output.
The model uses per-layer embeddings to reduce memory use, alternating updates to widen the residual
stream cheaply, and a learned augmented residual layer. Sliding window attention keeps the key value cache
small, and the last layers share their keys and values with earlier layers.
A compiler turns the model into code for a processor: it reads the weights, exports the graph, rewrites it
into a faster form, and emits a module for the target. The runtime loads the module and the parameters,
keeps the cache on the device, and samples one token at a time until it sees a stop token.
Hello! How are you today? Tell me a story about a cat who lives in a lighthouse by the sea.
What is the capital of France? Paris is the capital and largest city of France.
Write a short poem about the moon. The quick brown fox jumps over the lazy dog, 0123456789.
"""


def _build_tokenizer():
    """A real SentencePiece-style BPE tokenizer.json (byte fallback, ▁ for spaces, <bos> prepended),
    trained offline on a small corpus, carrying Gemma's special tokens at fixed ids."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=TEXT_VOCAB, special_tokens=SPECIAL_TOKENS + byte_tokens,
                                  show_progress=False)
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer)
    bos = SPECIAL_TOKENS.index("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    # Byte tokens are ordinary vocabulary (they must decode), not special tokens.
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in byte_tokens]
    for token_id, token in MEDIA_TOKENS.items():  # after the trained vocabulary, at the embedders' ids
        data["model"]["vocab"][token] = token_id
        data["added_tokens"].append({"id": token_id, "content": token, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    return data


def write_tiny_random(folder: Path) -> Path:
    """Write the tiny-random checkpoint into `folder` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    assert max(tokenizer["model"]["vocab"].values()) < CONFIG.vocab_size, "tokenizer outgrew the embedding table"

    with torch.device("meta"):
        shapes = {"model.language_model." + n: tuple(p.shape) for n, p in Gemma3nTextModel(CONFIG).named_parameters()}
        for tower in (AudioModel(AUDIO), Gemma3nVisionModel(VISION)):
            shapes |= {"model." + n: tuple(p.shape) for n, p in tower.named_parameters()}
    gen = torch.Generator().manual_seed(0)

    def produce(stored: str) -> torch.Tensor:
        shape = shapes[stored]
        noise = torch.randn(shape, generator=gen)
        if stored.endswith("correct_output_scale"):
            return 0.5 * noise
        if len(shape) == 1:  # norm weights, layer scales, the vision stem's bias
            return 1.0 + 0.1 * noise
        return noise * (0.5 / (noise[0].numel() ** 0.5))  # linears, convs and tables, by fan-in

    names = list(shapes)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file_name, group in shards.items():
        write_safetensors(folder / file_name, {n: (torch.float32, shapes[n]) for n in group},
                          produce, metadata={"format": "pt"})
    weight_map = {n: f for f, group in shards.items() for n in group}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = multimodal_config(CONFIG.to_hf_dict(), AUDIO, VISION, TOKENS)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE}, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": CONFIG.bos_token_id, "eos_token_id": list(CONFIG.eos_token_id),
        "pad_token_id": CONFIG.pad_token_id}, indent=2))
    return folder


def ensure_tiny_random(cache_root: Path) -> Path:
    """The cached tiny-random checkpoint, written on first use (atomically, so a crash leaves no half folder)."""
    folder = cache_root / f"{NAME}-v{VERSION}"
    if (folder / "config.json").is_file():
        return folder
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=cache_root))
    try:
        write_tiny_random(tmp)
        tmp.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not a concurrent writer that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
