import numpy as np
import pytest

from g3n_compile.checkpoint import resolve_checkpoint
from g3n_compile.checkpoint.tiny_random import CHAT_TEMPLATE
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
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "Hi"}]), add_bos=False)
    assert ids[0] == 2 and ids.count(2) == 1 and tok.token_to_id("<start_of_turn>") in ids
    with pytest.raises(TokenizerError, match="alternate"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_tokenizer_model_only_folder(tmp_path):
    """A folder with only a SentencePiece `tokenizer.model` (no tokenizer.json) still tokenizes and
    renders chats, with the Gemma turn markers as single pieces."""
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The cat {i} sat on the lighthouse and looked at the sea number {i}." for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=120,
                                   user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], bos_id=2, eos_id=1,
                                   pad_id=0, unk_id=3, minloglevel=2)
    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "tokenizer.model").rename(folder / "tokenizer.model")
    tok = Tokenizer(folder, bos_token_id=2, chat_template=CHAT_TEMPLATE)
    ids = tok.encode("The cat sat on the sea.")
    assert ids[0] == 2 and all(0 <= i < 120 for i in ids) and tok.decode(ids[1:]) == "The cat sat on the sea."
    chat = tok.encode(tok.render_chat([{"role": "user", "content": "The cat"}]), add_bos=False)
    assert chat.count(tok.token_to_id("<start_of_turn>")) == 2 and tok.token_to_id("<end_of_turn>") in chat
    assert tok.token_to_id("<no_such_piece>") is None
