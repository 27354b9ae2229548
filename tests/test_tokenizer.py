import json
import shutil

import pytest

from longcat_service.demo_model import ensure_demo_model
from longcat_service.tokenizer import load_tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and\nnew lines\n\n\ttabs",
    "Ünïcödé façade — naïve café",
    "中文测试：猫坐在窗边。日本語もテスト。",
    "emoji 🐱🚀👩‍👩‍👧 and flags 🇫🇷",
    "",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tok(demo_dir):
    return load_tokenizer(demo_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_merges_compress_common_english(tok):
    text = "the cat sat in the sun"
    assert len(tok.encode(text)) < len(text.encode())


def test_special_token_ids(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    assert tok.vocab_size == 512
    assert tok.special_tokens == {"<unk>": 0, "<longcat_s>": 1, "</longcat_s>": 2, "<longcat_pad>": 3}
    assert tok.all_special_ids == [0, 1, 2, 3]
    assert tok.bos_token == "<longcat_s>" and tok.eos_token == "</longcat_s>"


def test_special_tokens_in_text_encode_as_one_id_and_are_skipped_on_decode(tok):
    ids = tok.encode("<longcat_s>hi</longcat_s>")
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<longcat_s>hi</longcat_s>"


def test_no_bos_added_by_default(tok):
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")


def test_tokens_reassemble_through_the_decoder(tok):
    text = "naïve 🐱 cat"
    ids = tok.encode(text)
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens == [tok.id_to_token(i) for i in ids]
    assert tok.id_to_token(2) == "</longcat_s>"
    assert tok.convert_tokens_to_string(tokens) == text
    # a multi-byte character split across tokens is not valid text until all its bytes are present
    emoji_tokens = tok.convert_ids_to_tokens(tok.encode("🐱"))
    assert len(emoji_tokens) > 1
    assert tok.convert_tokens_to_string(emoji_tokens[:1]) != "🐱"


def test_chat_template_from_checkpoint(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert tok.chat_template is not None
    assert tok.apply_chat_template(messages) == "SYSTEM:S [Round 0] USER:hi ASSISTANT:"


def test_matches_transformers_on_the_demo_tokenizer(demo_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(demo_dir))
    for text in TEXTS + ["<longcat_s>x</longcat_s>"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q0"},
        {"role": "assistant", "content": "a0"},
        {"role": "user", "content": "q1"},
    ]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_falls_back_to_config_json_ids_and_default_template(demo_dir, tmp_path):
    shutil.copy(demo_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 3]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, None)
    assert tok.chat_template is None
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]) == "[Round 0] USER:q ASSISTANT:"
    # tokenizer.json itself marks the special tokens, so decode still skips them
    assert tok.decode([1, *tok.encode("x"), 2]) == "x"


def test_tokenizer_config_variants(demo_dir, tmp_path):
    shutil.copy(demo_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {
        "bos_token": {"content": "<longcat_s>", "special": True},  # AddedToken dict form
        "eos_token": "<longcat_pad>",
        "add_bos_token": True,
        "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))  # tokenizer_config wins
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 3)
    assert tok.encode("hi", add_special_tokens=True) == [1, *tok.encode("hi")]
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]) == "<longcat_s>q"


def test_chat_template_jinja_file_takes_precedence(demo_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_dir / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text("{{ eos_token }}{{ messages[-1]['content'] }}")
    tok = load_tokenizer(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]) == "</longcat_s>q"


def test_encode_rejects_non_string(tok):
    with pytest.raises(TypeError, match="text"):
        tok.encode([1, 2])


def test_encode_rejects_a_lone_surrogate_naming_it_and_takes_a_pair(tok):
    with pytest.raises(ValueError, match="unpaired UTF-16 surrogate at character 1"):
        tok.encode("a\ud800b")
    assert tok.decode(tok.encode("a\U0001f600b")) == "a\U0001f600b"
