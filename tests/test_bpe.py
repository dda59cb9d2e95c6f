"""The byte-level BPE tokenizer: special-token ids, exact round trips, hand-checked merges, save/load."""

from __future__ import annotations

import hashlib
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lmpipe.bpe import (
    EOT,
    SPECIAL_TOKENS,
    USER,
    load_tokenizer,
    new_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from lmpipe.config import ConfigError, TokenizerConfig, load_config

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "def parse(self, text: str) -> list[str]:\n    return text.split()\n",
    "Return the number of items in a container; raise ValueError if it is negative.",
    "  Indented lines,\ttabs and   several spaces   appear in code and prose alike.  ",
] * 20

ROUND_TRIP = [
    "",
    " ",
    "\n",
    "  leading and trailing spaces  ",
    "multiple   inner    spaces and\n\n\nblank lines\n",
    "\t\ttabs\r\nwindows line ends\r\n",
    "中文分词测试：你好，世界！",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 (zero-width joiners)",
    "combining e\u0301 versus \u00e9, NFKC-unsafe ﬁ ligature, Ångström",
    "Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト",
    "numbers 1234567890 and 3.14159e-10, hex 0xDEADBEEF",
    "\x00 NUL, \x7f DEL and \ufeff BOM",
    "text quoting <|endoftext|> and <|user|> literally",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer([ENGLISH], TokenizerConfig(vocab_size=400, min_frequency=2))


def test_special_tokens_take_ids_0_to_5(tok):
    assert SPECIAL_TOKENS == ("<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    # then the 256 byte tokens, whatever the training text held
    assert {tok.id_to_token(i) for i in range(6, 262)} == set(pre_tokenizers.ByteLevel.alphabet())
    assert tok.get_vocab_size() == 400


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_any_text_round_trips_exactly(tok, text):
    enc = Tokenizer.from_str(tok.to_str())
    enc.encode_special_tokens = True  # special-token strings stay text
    ids = enc.encode(text, add_special_tokens=False).ids
    assert all(i >= 6 for i in ids)
    assert enc.decode(ids, skip_special_tokens=False) == text
    # characters never seen in training fall back to their UTF-8 bytes: one token per byte at most
    assert len(ids) <= len(text.encode("utf-8"))


def test_round_trip_with_special_tokens_recognised(tok):
    text = f"{USER}hello there{EOT}"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids[0] == 3 and ids[-1] == 0
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids, skip_special_tokens=True) == "hello there"


def test_merges_by_hand():
    # pieces "xy" x5 and "xz" x2 (GPT-4 pattern: each line is one letter run): pair counts 5 and 2
    texts = ["xy"] * 5 + ["xz"] * 2
    tok = train_tokenizer([texts], TokenizerConfig(vocab_size=270, min_frequency=2))
    assert tok.get_vocab_size() == 264  # 262 base + "xy" + "xz": no other pair occurs
    assert tok.token_to_id("xy") == 262 and tok.token_to_id("xz") == 263  # the more frequent merge first
    assert tok.encode("xyxz").ids == [262, 263]
    assert tok.encode("xzy").ids == [263, tok.token_to_id("y")]
    assert tok.encode("yx").ids == [tok.token_to_id("y"), tok.token_to_id("x")]
    # "xz" occurs twice: below min_frequency=3 it is never merged
    tok3 = train_tokenizer([texts], TokenizerConfig(vocab_size=270, min_frequency=3))
    assert tok3.get_vocab_size() == 263 and tok3.token_to_id("xz") is None


@pytest.mark.parametrize(
    ("pattern", "text", "pieces"),
    [
        ("gpt4", "12345", ["123", "45"]),
        ("gpt2", "12345", ["12345"]),
        ("gpt4", "self.name", ["self", ".name"]),
        ("gpt2", "self.name", ["self", ".", "name"]),
        ("gpt4", "snake_case()", ["snake", "_case", "()"]),
        ("gpt4", "a\n\n  b", ["a", "\n\n", " ", " b"]),
        ("gpt4", "I'M here", ["I", "'M", " here"]),
        ("gpt2", "I'M here", ["I", "'", "M", " here"]),
    ],
)
def test_split_patterns(pattern, text, pieces):
    tok = new_tokenizer(pattern)
    # ByteLevel shows a space as "Ġ" and a newline as "Ċ"
    shown = [p.replace("Ġ", " ").replace("Ċ", "\n") for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
    assert shown == pieces


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    sha = save_tokenizer(tok, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(path.read_text())["model"]["type"] == "BPE"
    loaded = load_tokenizer(path)
    for text in ROUND_TRIP:
        assert loaded.encode(text).ids == tok.encode(text).ids
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def test_training_is_deterministic(tok):
    again = train_tokenizer([ENGLISH[:40], ENGLISH[40:]], TokenizerConfig(vocab_size=400, min_frequency=2))
    assert again.to_str() == tok.to_str()


def test_load_rejects_other_special_tokens(tmp_path):
    other = Tokenizer(models.BPE())
    other.train_from_iterator(["abc"], trainers.BpeTrainer(vocab_size=10, special_tokens=["<s>", EOT]))
    path = tmp_path / "other.json"
    other.save(str(path))
    with pytest.raises(ValueError, match="special tokens"):
        load_tokenizer(path)


def test_config_checks_and_presets():
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        TokenizerConfig(vocab_size=262)
    with pytest.raises(ConfigError, match="min_frequency"):
        TokenizerConfig(min_frequency=0)
    tiny, gpu = load_config("tiny").tokenizer, load_config("gpu").tokenizer
    assert 2048 <= tiny.vocab_size <= 4096 < 2**16
    assert gpu.vocab_size % 64 == 0 and gpu.vocab_size <= 2**16  # fits uint16 shards
