import numpy as np
import pytest

from g3n_compile.presets import resolve_checkpoint
from g3n_compile.tiny_random import CHAT_TEMPLATE
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import Tokenizer, TokenizerError


def test_greedy_and_repetition_penalty():
    logits = np.array([0.0, 3.0, 2.0, -1.0])
    assert Sampler(SamplingParams(temperature=0))(logits, []) == 1
    # 3.0 / 2 = 1.5 < 2.0: the repeated token loses
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=2.0))(logits, [1]) == 2


def test_top_k_top_p_and_seed():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = lambda **kw: {Sampler(SamplingParams(seed=s, **kw))(logits, []) for s in range(200)}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.75) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert draws() == {0, 1, 2, 3}
    a = [Sampler(SamplingParams(seed=7))(logits, []) for _ in range(5)]
    assert len(set(a)) == 1  # same seed, same draw
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_chat_template_renders_gemma_turns():
    tok = Tokenizer(resolve_checkpoint("tiny-random"), bos_token_id=2, chat_template=CHAT_TEMPLATE)
    text = tok.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 2 and ids.count(2) == 1 and tok.token_to_id("<start_of_turn>") in ids
    with pytest.raises(TokenizerError, match="alternate"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
