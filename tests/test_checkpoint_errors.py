"""Bad checkpoints give one clear CheckpointError naming what is wrong."""

import json
import shutil

import pytest
import torch

from g3n_compile.checkpoint import CheckpointError, load_text_model
from g3n_compile.checkpoint import load_model
from g3n_compile.checkpoint.safetensors import write_safetensors
from reference import CONFIGS, hf_model, save_checkpoint

CFG = CONFIGS["hf-test"]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_checkpoint(hf_model(CFG), CFG, tmp_path_factory.mktemp("good"), shards=2)


@pytest.fixture
def ckpt(good, tmp_path):
    return shutil.copytree(good, tmp_path / "ckpt")


def error_of(folder) -> str:
    with pytest.raises(CheckpointError) as e:
        load_text_model(folder)
    return str(e.value)


def rewrite_shard(folder, edit):
    """Rewrite the first shard with edit(dict name -> tensor)."""
    from g3n_compile.checkpoint.safetensors import SafetensorsFile
    path = sorted(folder.glob("model-*.safetensors"))[0]
    st = SafetensorsFile(path)
    tensors = {n: st.tensor(n).clone() for n in st.keys()}
    st.close()
    edit(tensors)
    write_safetensors(path, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, lambda n: tensors[n])
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {n: f for n, f in data["weight_map"].items() if f != path.name}
    data["weight_map"].update({n: path.name for n in tensors})
    index.write_text(json.dumps(data))


def test_truncated_safetensors(ckpt):
    path = sorted(ckpt.glob("model-*.safetensors"))[0]
    path.write_bytes(path.read_bytes()[:-100])
    msg = error_of(ckpt)
    assert "truncated" in msg and path.name in msg


def test_not_safetensors(ckpt):
    path = sorted(ckpt.glob("model-*.safetensors"))[0]
    path.write_bytes(b"this is not a tensor file at all")
    assert path.name in error_of(ckpt)


def test_missing_tensor(ckpt):
    rewrite_shard(ckpt, lambda t: t.pop(next(n for n in sorted(t) if "layers." in n)))
    msg = error_of(ckpt)
    assert "missing tensors (1)" in msg


def test_wrong_shape_and_unexpected_are_listed_together(ckpt):
    def edit(t):
        name = next(n for n in sorted(t) if n.endswith("q_proj.weight"))
        t[name] = torch.zeros(3, 3)
        t["model.layers.0.mystery.weight"] = torch.zeros(2)
    rewrite_shard(ckpt, edit)
    msg = error_of(ckpt)
    assert "wrong shapes (1)" in msg and "[3, 3] in the file" in msg
    assert "unexpected tensors (1)" in msg and "mystery" in msg


def test_missing_shard(ckpt):
    sorted(ckpt.glob("model-*.safetensors"))[1].unlink()
    assert "missing" in error_of(ckpt)


def test_not_a_checkpoint_folder(tmp_path):
    assert "no config.json" in error_of(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="ships no E2B weights"):
        load_model("e2b")


def test_no_weights(ckpt):
    for p in ckpt.glob("*.safetensors*"):
        p.unlink()
    assert "no weights" in error_of(ckpt)


@pytest.mark.parametrize("field,value,expect", [
    ("hidden_activation", "silu", "hidden_activation: 'silu' is not supported"),
    ("num_key_value_heads", 3, "num_key_value_heads: 3 does not divide"),
    ("layer_types", ["chunked_attention"] * 4, "layer_types[0]: 'chunked_attention'"),
    ("intermediate_size", [21, 21], "intermediate_size: expected 4 entries"),
    ("sliding_window", 0, "sliding_window: expected an integer >= 1"),
    ("rope_parameters", {"full_attention": {"rope_type": "yarn"}}, "rope_type: 'yarn' is not supported"),
    ("tie_word_embeddings", False, "tie_word_embeddings: False is not supported"),
])
def test_bad_config_values(ckpt, field, value, expect):
    path = ckpt / "config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    msg = error_of(ckpt)
    assert expect in msg and "config.json" in msg


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{ nope")
    assert "not valid JSON" in error_of(ckpt)
