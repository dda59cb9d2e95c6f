"""The word tokenizer: hand-checked splits, and the Python and DuckDB versions agreeing on tricky text."""

from collections import Counter

import duckdb
import pytest

from lmpipe import wordtok
from lmpipe.wordtok import Vocabulary

TRICKY = [
    "Don't stop—it's 3.14, not 1,000!",
    "我吃苹果。",
    "我 吃 苹果 。",
    "東京タワーへ行く and then 東京 again",
    "naïve café, l’homme; «quoted» (paren) [x] {y} <s> </s>",
    "e.g. os.path.join(a, b) -> str | None  # comment",
    "tabs\tand\nnewlines\u00a0and\u2003spaces",
    "Ünïcödé ΣΑΣ İstanbul Straße",
    "emoji 🙂 and math ½ ≤ π² x_1",
    "12:30 v3.14 1990s $5.00 50% a--b ...",
    "",
]


def test_hand_checked_splits():
    assert wordtok.tokenize("Don't stop: 3.14, 1,000 apples.") == [
        "Don't", "stop", ":", "3.14", ",", "1,000", "apples", "."]
    assert wordtok.tokenize("我吃苹果。") == ["我", "吃", "苹", "果", "。"]
    assert wordtok.tokenize("我 吃 苹果 。") == ["我", "吃", "苹果", "。"]  # pre-segmented: words kept
    assert wordtok.tokenize("the word 苹果 means apple") == ["the", "word", "苹", "果", "means", "apple"]
    assert wordtok.tokenize("os_path v3.14") == ["os_path", "v3", ".", "14"]
    assert wordtok.tokenize("<s> x") == ["<", "s", ">", "x"]  # text never produces a special token
    assert wordtok.tokenize("Hello World", lowercase=True) == ["hello", "world"]


@pytest.mark.parametrize("lowercase", [False, True])
def test_python_and_duckdb_agree(lowercase):
    con = duckdb.connect()
    macro = wordtok.create_macro(con, lowercase)
    for text in TRICKY:
        got = con.execute(f"SELECT {macro}(?)", [text]).fetchall()[0][0]
        assert got == wordtok.tokenize(text, lowercase), text


def test_vocabulary_min_count_and_ids(tmp_path):
    counts = Counter(["a", "a", "a", "b", "b", "c"])
    vocab = Vocabulary.build(counts, min_count=2)
    assert vocab.words == ["<unk>", "<s>", "</s>", "a", "b"]
    assert vocab.counts[0] == 1  # "c" counts towards <unk>
    assert vocab.n_predictable == 4  # a, b, </s>, <unk>
    assert vocab.encode(["a", "c", "zzz"]) == [3, 0, 0]
    again = Vocabulary.load(vocab.save(tmp_path / "vocab.tsv"))
    assert again.words == vocab.words and again.counts == vocab.counts
