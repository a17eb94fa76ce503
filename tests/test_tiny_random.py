import json

import torch

from g3n_compile.checkpoint import load_model
from g3n_compile.checkpoint import resolve_checkpoint
from g3n_compile.checkpoint.tiny_random import CONFIG, write_tiny_random


def test_load_model_contract():
    model = load_model("tiny-random")
    ids = torch.tensor([[2, 10, 20, 30, 40]])
    with torch.no_grad():
        logits = model(ids)
    assert isinstance(model, torch.nn.Module)
    assert logits.shape == (1, 5, CONFIG.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_written_in_the_hub_layout_and_deterministic(tmp_path):
    folder = resolve_checkpoint("tiny-random")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) == 2
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert 1e6 < size < 10e6
    again = write_tiny_random(tmp_path / "again")
    for shard in folder.glob("*.safetensors"):
        assert shard.read_bytes() == (again / shard.name).read_bytes()
    assert (folder / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_every_feature_is_switched_on():
    c = CONFIG
    assert len(set(c.intermediate_size)) > 1 and c.altup_num_inputs == 4 and c.num_kv_shared_layers > 0
    assert {"sliding_attention", "full_attention"} == set(c.layer_types)
    assert any(p > 0 for p in c.activation_sparsity_pattern) and c.final_logit_softcapping


def test_tokenizer_is_real_and_carries_gemma_specials():
    from tokenizers import Tokenizer
    folder = resolve_checkpoint("tiny-random")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for token, want in [("<pad>", 0), ("<eos>", 1), ("<bos>", 2), ("<unk>", 3)]:
        assert tok.token_to_id(token) == want
    assert tok.token_to_id("<end_of_turn>") in CONFIG.eos_token_id
    text = "Hello world, ünïcode! 😀"
    enc = tok.encode(text)
    assert enc.ids[0] == 2 and max(enc.ids) < CONFIG.vocab_size_per_layer_input
    assert tok.decode(enc.ids) == text  # byte fallback round-trips anything
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert "<start_of_turn>" in cfg["chat_template"]
