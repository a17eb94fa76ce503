import re

import pytest

from g3n_compile.model.config import E2B, E4B, FULL, SLIDING, ConfigError, TextConfig


def test_presets_have_the_real_values():
    assert (E2B.num_hidden_layers, E2B.intermediate_size[0], E2B.num_kv_shared_layers) == (30, 8192, 10)
    assert (E4B.num_hidden_layers, E4B.intermediate_size[0], E4B.num_kv_shared_layers) == (35, 16384, 15)
    for c in (E2B, E4B):
        assert (c.vocab_size, c.vocab_size_per_layer_input, c.hidden_size, c.head_dim) == (262400, 262144, 2048, 256)
        assert [i for i, t in enumerate(c.layer_types) if t == FULL] == list(range(4, c.num_hidden_layers, 5))
        assert c.activation_sparsity_pattern[:10] == (0.95,) * 10 and set(c.activation_sparsity_pattern[10:]) == {0.0}
        # KV sharing exactly as transformers maps it: sliding layers read layer 18, full layers layer 19.
        assert c.kv_layers == tuple(range(20))
        assert {c.kv_source(i) for i in range(20, c.num_hidden_layers) if c.is_sliding(i)} == {18}
        assert {c.kv_source(i) for i in range(20, c.num_hidden_layers) if not c.is_sliding(i)} == {19}


def test_kv_sharing_matches_transformers():
    from reference import hf_text_config
    for preset in (E2B, E4B):
        modes = hf_text_config(preset).kv_sharing_modes
        assert [m == "reuse" for m in modes] == [preset.kv_source(i) != i for i in range(preset.num_hidden_layers)]


def test_both_layouts_and_legacy_rope_keys():
    text = E2B.to_hf_dict()
    assert TextConfig.from_hf_dict(text) == E2B
    assert TextConfig.from_hf_dict({"model_type": "gemma3n", "text_config": text, "vision_config": {}}) == E2B
    legacy = {k: v for k, v in text.items() if k != "rope_parameters"}
    legacy.update(rope_theta=5e5, rope_local_base_freq=2e4, intermediate_size=8192, layer_types=None)
    c = TextConfig.from_hf_dict(legacy)
    assert (c.rope_theta_full, c.rope_theta_sliding, c.intermediate_size) == (5e5, 2e4, (8192,) * 30)
    assert c.layer_types == E2B.layer_types


def test_missing_field_is_named():
    text = E2B.to_hf_dict()
    del text["hidden_size"]
    with pytest.raises(ConfigError, match=r"text_config\.hidden_size: missing"):
        TextConfig.from_hf_dict({"text_config": text})


def test_shared_layers_need_a_producer():
    with pytest.raises(ConfigError, match="num_kv_shared_layers"):
        E2B.replace(layer_types=(SLIDING,) * 20 + (FULL,) * 10)


@pytest.mark.parametrize("field,value,expect", [
    ("num_hidden_layers", 2**40, "num_hidden_layers: 1099511627776 is more than 1000 layers"),
    ("layer_types", "abc", "layer_types: expected a list, got 'abc'"),
    ("rope_parameters", {"full_attention": 5}, "rope_parameters.full_attention: expected an object, got 5"),
])
def test_corrupt_fields_are_refused_before_anything_is_built_from_them(field, value, expect):
    raw = {**E2B.to_hf_dict(), field: value}
    with pytest.raises(ConfigError, match=re.escape(expect)):
        TextConfig.from_hf_dict(raw)
