"""Bad checkpoints give one clear CheckpointError naming what is wrong."""

import json
import shutil
import time
import tracemalloc

import pytest
import torch

from g3n_compile.checkpoint import Checkpoint, CheckpointError, load_text_model, resolve_checkpoint
from g3n_compile.checkpoint import load_model
from g3n_compile.checkpoint.preflight import check_checkpoint
from g3n_compile.checkpoint.safetensors import SafetensorsFile, write_safetensors
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


# ---- the preflight: every fault found from headers and small files, before any export ----------------------------

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture
def tiny(tmp_path):
    """A copy of tiny-random (multimodal, sharded, with tokenizer files) to break."""
    return shutil.copytree(resolve_checkpoint("tiny-random"), tmp_path / "tiny")


def preflight_error(folder) -> str:
    """The one-line error of opening and checking `folder`, which must leave every file as it was, in seconds."""
    before = {p: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        check_checkpoint(Checkpoint(folder))
    assert time.perf_counter() - t0 < 30
    assert {p: p.read_bytes() for p in before} == before
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def header_of(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(path, header_text: str, data: bytes):
    blob = header_text.encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def test_preflight_accepts_tiny_random(tiny):
    check_checkpoint(Checkpoint(tiny))


def test_overlapping_tensors(tiny):
    header, data = header_of(tiny / SHARD1)
    first, second = [n for n in header if n != "__metadata__"][:2]
    header[second]["data_offsets"] = [header[first]["data_offsets"][0] + 4,
                                      header[first]["data_offsets"][0] + 4 + header[second]["data_offsets"][1]
                                      - header[second]["data_offsets"][0]]
    write_header(tiny / SHARD1, json.dumps(header), data)
    msg = preflight_error(tiny)
    assert "overlap" in msg and SHARD1 in msg


def test_duplicate_tensor_name_in_one_file(tiny):
    header, data = header_of(tiny / SHARD1)
    name = next(n for n in header if n != "__metadata__")
    text = json.dumps(header)
    write_header(tiny / SHARD1, text[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}", data)
    msg = preflight_error(tiny)
    assert "appears twice" in msg and name in msg and SHARD1 in msg


def test_tensor_in_two_shards(tiny):
    header1, _ = header_of(tiny / SHARD1)
    name = next(n for n in header1 if n != "__metadata__")
    st = SafetensorsFile(tiny / SHARD2)
    tensors = {n: st.tensor(n).clone() for n in st.keys()} | {name: SafetensorsFile(tiny / SHARD1).tensor(name).clone()}
    write_safetensors(tiny / SHARD2, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, lambda n: tensors[n])
    msg = preflight_error(tiny)
    assert "in both" in msg and name in msg


def test_index_and_shards_disagree(tiny):
    edit_json(tiny / INDEX, lambda d: d["weight_map"].update({"model.language_model.embed_tokens.weight": SHARD2}))
    assert "not in the shard it names" in preflight_error(tiny)
    edit_json(tiny / INDEX, lambda d: d["weight_map"].pop("model.language_model.embed_tokens.weight"))
    assert "does not list tensors" in preflight_error(tiny)


def test_index_with_a_key_twice(tiny):
    text = (tiny / INDEX).read_text()
    twice = f'"weight_map": {{"x.weight": "{SHARD1}", "x.weight": "{SHARD1}", '
    (tiny / INDEX).write_text(text.replace('"weight_map": {', twice, 1))
    assert "'x.weight' appears twice" in preflight_error(tiny)


def outside_copy(tiny):
    outside = tiny.parent / "elsewhere.safetensors"
    shutil.copyfile(tiny / SHARD2, outside)
    return outside


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_index_pointing_outside_the_folder(tiny, how):
    outside = outside_copy(tiny)
    target = "../" + outside.name if how == "dotdot" else str(outside)
    edit_json(tiny / INDEX, lambda d: d["weight_map"].update({n: target for n, f in d["weight_map"].items()
                                                               if f == SHARD2}))
    assert "is not a file name in the checkpoint folder" in preflight_error(tiny)


def test_symlink_out_of_the_folder(tiny):
    outside = outside_copy(tiny)
    (tiny / SHARD2).unlink()
    (tiny / SHARD2).symlink_to(outside)
    msg = preflight_error(tiny)
    assert "outside the checkpoint folder" in msg and SHARD2 in msg


def test_hugging_face_cache_links_are_accepted(tiny):
    """A downloaded snapshot's files are links into the cache's blob store: that is not escaping."""
    repo = tiny.parent / "models--google--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, p in enumerate(sorted(tiny.iterdir())):
        shutil.copyfile(p, repo / "blobs" / f"blob{i}")
        (snapshot / p.name).symlink_to(f"../../blobs/blob{i}")
    check_checkpoint(Checkpoint(snapshot))


def test_huge_header_length_is_not_allocated(tiny):
    path = tiny / SHARD1
    path.write_bytes((1 << 40).to_bytes(8, "little") + path.read_bytes()[8:])
    tracemalloc.start()
    msg = preflight_error(tiny)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "over the 104857600-byte bound" in msg and peak < 50e6


@pytest.mark.parametrize("entry,expect", [
    ({"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}, "dtype 'F8_E4M3' is not one g3n reads"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "is not a list of non-negative integers"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "declares 4 bytes for shape [2] F32 (8 bytes expected)"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}, "is not [begin, end] with begin <= end"),
    ({"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}, "truncated"),
])
def test_bad_header_entry(tiny, entry, expect):
    header, data = header_of(tiny / SHARD1)
    header["extra.weight"] = entry
    write_header(tiny / SHARD1, json.dumps(header), data)
    msg = preflight_error(tiny)
    assert expect in msg and "'extra.weight'" in msg


def test_corrupt_tokenizer_json(tiny):
    path = tiny / "tokenizer.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    msg = preflight_error(tiny)
    assert "tokenizer.json: not a readable tokenizer" in msg


@pytest.mark.parametrize("text,expect", [
    ("{ nope", "tokenizer_config.json: not valid JSON"),
    ('["a list"]', "tokenizer_config.json: expected a JSON object"),
    ('{"add_bos_token": "yes"}', "add_bos_token: expected true or false"),
    ('{"chat_template": [{"name": "default", "template": "x"}]}', "chat_template: expected a string"),
])
def test_corrupt_tokenizer_config(tiny, text, expect):
    (tiny / "tokenizer_config.json").write_text(text)
    assert expect in preflight_error(tiny)


@pytest.mark.parametrize("template,expect", [
    ("{% for m in messages %}{{ m['content'] }}", "chat_template.jinja: the chat template does not parse (template "
                                                  "line 1"),
    ("{{ bos_token }}{{ tools_description }}", "chat_template.jinja: the chat template fails on a one-message chat"),
    ("{{ raise_exception('no') }}", "fails on a one-message chat"),
])
def test_bad_chat_template(tiny, template, expect):
    (tiny / "chat_template.jinja").write_text(template)
    assert expect in preflight_error(tiny)


def test_chat_template_not_utf8(tiny):
    (tiny / "chat_template.jinja").write_bytes(b"{{ bos_token }}\xff\xfe")
    assert "not UTF-8" in preflight_error(tiny)


@pytest.mark.parametrize("edit,expect", [
    (lambda d: d.update(feature_size="128"), "feature_size: expected a positive integer, got '128'"),
    (lambda d: d.update(feature_size=64), "feature_size 64 does not match audio_config.input_feat_size 128"),
    (lambda d: d.update(sampling_rate=0), "sampling_rate: expected a positive integer"),
    (lambda d: d.update(hop_length_ms=0.001), "under one sample"),
    (lambda d: d.update(per_bin_mean=["a"]), "per_bin_mean: expected a list of numbers"),
    (lambda d: d.update(size={"height": 0, "width": 0}), "size: expected"),
    (lambda d: d.update(size={"height": 128, "width": 64}), "the vision encoder takes square images"),
    (lambda d: d.update(resample=9), "resample: expected a Pillow resampling filter"),
    (lambda d: d.update(do_normalize=True, image_std=[0.5, 0, 0.5]), "image_std: [0.5, 0, 0.5] divides by zero"),
    (lambda d: d.update(do_normalize=True, image_mean=[0.5]), "image_mean: expected 3 numbers"),
])
def test_bad_preprocessor_config(tiny, edit, expect):
    edit_json(tiny / "preprocessor_config.json", edit)
    msg = preflight_error(tiny)
    assert expect in msg and "preprocessor_config.json" in msg


def test_preprocessor_config_not_json(tiny):
    (tiny / "preprocessor_config.json").write_text('{"feature_size": 128,')
    assert "preprocessor_config.json: not valid JSON" in preflight_error(tiny)


@pytest.mark.parametrize("field,value,expect", [
    ("conf_num_attention_heads", 3, "audio_config.conf_num_attention_heads: 3 does not divide"),
    ("conf_num_hidden_layers", 10 ** 9, "audio_config.conf_num_hidden_layers: 1000000000 is more than 1000"),
    ("hidden_size", "64", "audio_config.hidden_size: expected an integer"),
    ("sscp_conv_stride_size", [2, 2], "audio_config.sscp_conv_stride_size: expected [[time, freq]"),
    ("vocab_offset", 0, "do not include the last text id"),
])
def test_bad_audio_config(tiny, field, value, expect):
    edit_json(tiny / "config.json", lambda d: d["audio_config"].update({field: value}))
    assert expect in preflight_error(tiny)


def test_audio_tower_shapes_against_config(tiny):
    edit_json(tiny / "config.json", lambda d: d["audio_config"].update(conf_num_hidden_layers=2))
    assert "unexpected tensors" in preflight_error(tiny)


@pytest.mark.parametrize("edit,expect", [
    (lambda v: v["g3n_arch"]["stages"][0].append("er_k3_s1_e4_c16_r999999999"), "more than 1000 blocks"),
    (lambda v: v.update(vocab_offset=100), "are not adjacent"),
    (lambda v: v.update(architecture="vit"), "vision_config.architecture: 'vit' is not supported"),
])
def test_bad_vision_config(tiny, edit, expect):
    edit_json(tiny / "config.json", lambda d: edit(d["vision_config"]))
    assert expect in preflight_error(tiny)


@pytest.mark.parametrize("value,expect", [
    (10 ** 6, "image_token_id: 1000000 is outside the vocabulary"),
    ("513", "image_token_id: expected an integer >= 0"),
    (521, "image_token_id: 521 is also audio_token_id"),
    (515, "image_token_id: 515 is not a token of tokenizer.json"),
])
def test_bad_image_token_id(tiny, value, expect):
    edit_json(tiny / "config.json", lambda d: d.update(image_token_id=value))
    assert expect in preflight_error(tiny)


def test_default_media_id_outside_a_small_vocabulary(tiny):
    edit_json(tiny / "config.json", lambda d: d.pop("boa_token_id"))
    assert "boa_token_id: 256000 (the default, as it is not set) is outside the vocabulary" in preflight_error(tiny)


def test_eos_outside_the_vocabulary(tiny):
    edit_json(tiny / "config.json", lambda d: d["text_config"].update(eos_token_id=[1, 100000]))
    assert "eos_token_id[1]: 100000 is outside the vocabulary" in preflight_error(tiny)


@pytest.mark.parametrize("section,field,value,expect", [
    ("text_config", "altup_num_inputs", 2 ** 63, "text_config.altup_num_inputs: 9223372036854775808 is larger than"),
    ("text_config", "intermediate_size", [256, 192, 256, 2 ** 40, 256, 192], "text_config.intermediate_size[3]"),
    ("audio_config", "hidden_size", 2 ** 31, "audio_config.hidden_size: 2147483648 is larger than"),
    ("audio_config", "vocab_size", 10 ** 18, "audio_config.vocab_size: 1000000000000000000 is larger than"),
    ("audio_config", "sscp_conv_kernel_size", [[3, 3], [3, 200]], "the subsampling convs leave no mel bin"),
    ("text_config", "rope_parameters", {"full_attention": 0.5},
     "text_config.rope_parameters.full_attention: expected an object, got 0.5"),
])
def test_corrupt_sizes_stop_before_any_model_is_built(tiny, section, field, value, expect):
    edit_json(tiny / "config.json", lambda d: d[section].update({field: value}))
    assert expect in preflight_error(tiny)
