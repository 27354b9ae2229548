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
    tail = detok.flush()
    assert tail == tok.decode(ids) and "\ufffd" in tail
    assert detok.flush() == ""  # nothing is emitted twice


def test_special_tokens_skipped_by_default(tok):
    ids = tok.encode("hi") + [tok.eos_token_id] + tok.encode(" there")
    detok = IncrementalDetokenizer(tok)
    assert "".join([detok.add([i]) for i in ids] + [detok.flush()]) == "hi there"


class RecordingDecoder:
    """Wraps a decoder and records how many ids each decode call was given."""

    def __init__(self, inner):
        self.inner = inner
        self.window_sizes: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.window_sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decode_window_stays_short_on_a_long_stream(tok):
    """Per token, the work is a decode of the tokens since the last-but-one emission, not of the whole output."""
    text = "the quick brown fox jumps over the lazy dog. " * 10
    ids = tok.encode(text)
    assert len(ids) > 100
    recorder = RecordingDecoder(tok)
    assert "".join(stream(recorder, ids)) == text
    assert max(recorder.window_sizes) <= 8, max(recorder.window_sizes)


@pytest.fixture(scope="module")
def metaspace_tok():
    """A SentencePiece-style (Metaspace) decoder: it drops the space that starts the decoded text, so a token's
    text depends on what precedes it in the decoded window. Special token: <s>."""
    from tokenizers import Tokenizer, decoders, models

    pieces = ["<unk>", "\u2581a", "\u2581hi", "b", "\u2581", "\u00e9", "\u2581the"]
    backend = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.add_special_tokens(["<s>"])
    return backend


def test_context_sensitive_decoder_keeps_spaces_after_special_tokens(metaspace_tok):
    a, hi, special = metaspace_tok.token_to_id("\u2581a"), metaspace_tok.token_to_id("\u2581hi"), metaspace_tok.token_to_id("<s>")
    assert "".join(stream(metaspace_tok, [a, special, hi])) == "a hi"
    assert "".join(stream(metaspace_tok, [special, hi, special, special, a])) == "hi a"


@pytest.mark.parametrize("skip", [True, False])
def test_context_sensitive_decoder_random_streams_concatenate_to_full_decode(metaspace_tok, skip):
    rng = random.Random(2)
    vocab = metaspace_tok.get_vocab_size()
    for _ in range(300):
        ids = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 12))]
        assert "".join(stream(metaspace_tok, ids, skip)) == metaspace_tok.decode(ids, skip_special_tokens=skip), ids
