import random

import pytest

from longcat_service.demo_model import ensure_demo_model
from longcat_service.engine.detokenizer import IncrementalDetokenizer
from longcat_service.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ensure_demo_model())


def stream(tok, ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tok, skip_special_tokens)
    deltas = [detok.add([i]) for i in ids]
    deltas.append(detok.flush())
    return deltas


ALPHABET = "aé€😀 \n你好wörld.,!" + "Ωж"


def test_multibyte_characters_never_split(tok):
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30)))
        ids = tok.encode(text)
        deltas = stream(tok, ids)
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas), deltas


def test_single_emoji_is_held_until_complete(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # the demo vocabulary splits it into byte tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add([ids[-1]]) == "😀"


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_ids_concatenate_to_full_decode(tok, skip):
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_special_tokens_skipped(tok):
    ids = tok.encode("hi") + [tok.eos_token_id] + tok.encode(" there")
    assert "".join(stream(tok, ids)) == "hi there"


def test_incomplete_tail_is_flushed_as_replacement(tok):
    ids = tok.encode("😀")[:-1]
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add([i]) for i in ids) == ""
    assert detok.flush() == tok.decode(ids)
    assert "\ufffd" in detok.text
