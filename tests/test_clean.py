"""Tests for lmpipe.clean: normalisation rules, the batched normaliser and the length filter."""

from __future__ import annotations

import random
import re
import unicodedata
from collections import Counter

import pytest

from lmpipe import clean
from lmpipe.clean import LengthFilter, apply_filters, normalize, normalize_many

# ------------------------------------------------------------------------------------------------ normalize


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # NFKC: full-width forms, ligatures, composition
        ("Ｈｅｌｌｏ，ｗｏｒｌｄ！１２３", "Hello,world!123"),
        ("ﬁne ﬂour", "fine flour"),
        ("cafe\u0301", "café"),
        ("x²", "x2"),
        # newlines
        ("a\r\nb\rc\nd", "a\nb\nc\nd"),
        ("a\x85b\u2028c\u2029d", "a\nb\nc\nd"),
        # control characters
        ("a\x00b\x07c\x1bd\x7fe\x9ff", "abcdef"),
        # invisible format characters; ZWJ and ZWNJ stay
        ("soft\u00adware zero\u200bwidth word\u2060joiner \ufeffbom", "software zerowidth wordjoiner bom"),
        ("👨\u200d👩\u200d👧 می\u200cخواهم", "👨\u200d👩\u200d👧 می\u200cخواهم"),
        # spaces
        ("a\tb\u00a0c\u2003d\u3000e\u202ff\u1680g\x0bh\x0ci", "a b c d e f g h i"),
        ("a  \t  b", "a b"),
        ("  a  \n\t b \t\n  c  ", "a\nb\nc"),
        # blank lines
        ("a\n\n\n\nb", "a\n\nb"),
        ("a\n \n\t\n  \nb", "a\n\nb"),
        ("a\r\n\r\n\r\nb", "a\n\nb"),
        ("a\n\nb", "a\n\nb"),
        # stripping
        ("\n\n \t text \n\n", "text"),
        ("", ""),
        (" \t\r\n\u3000\u200b ", ""),
        # lone surrogates (possible after JSON escapes) cannot be stored as UTF-8
        ("a\ud800b", "ab"),
    ],
)
def test_normalize_rules(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


@pytest.mark.parametrize(
    "text",
    [
        "中文文本不应被改变。这是第二句、第三句《书名》“引号”。",
        "日本語のテキストも変わらない。ひらがなとカタカナ。",
        "한국어 텍스트도 그대로입니다.",
        "Русский текст и ελληνικά.",
        "हिन्दी पाठ में मात्राएँ हैं।",
        "النص العربي يبقى كما هو.",
        "Emoji 🎉👍🏽 and CJK extension B 𠀀𠀁 stay.",
    ],
)
def test_non_latin_text_passes_through(text: str) -> None:
    assert unicodedata.is_normalized("NFC", text)
    assert normalize(text) == text


def test_chinese_full_width_punctuation_becomes_ascii_by_nfkc() -> None:
    assert normalize("你好，世界！（测试）：完成；") == "你好,世界!(测试):完成;"


def test_normalize_is_idempotent() -> None:
    for text in _random_texts(random.Random(1), 300):
        once = normalize(text)
        assert normalize(once) == once


# A direct transcription of the rules, without the speed-ups (whole-string NFKC, plain regexes): the oracle
# for the segment-wise NFKC and the ASCII bytes path of the real implementation.
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u200b\u2060\ufeff\ud800-\udfff]")
_SPACES = re.compile("[\t\x0b\x0c \u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")


def _reference_normalize(text: str) -> str:
    text = text.replace("\x00", "").replace("\r\n", "\n")
    text = re.sub("[\r\x85\u2028\u2029]", "\n", text)
    text = unicodedata.normalize("NFKC", _CONTROLS.sub("", text))
    text = re.sub(" *\n *", "\n", _SPACES.sub(" ", text))
    return re.sub("\n{3,}", "\n\n", text).strip()


# Characters that interact: combining marks (also out of canonical order), Hangul jamo that compose, Indic
# two-part vowels, compatibility forms, removable characters between a base and its mark, astral characters.
_TRICKY = (
    "ae \n\r\t\x00\x01\x0b\x0c\x85\x9f\u00a0\u00ad\u00a8\u00b4"
    "\u0301\u0308\u0323\u0327\u0345\u1100\u1161\u11a8\uac00"
    "\u0b47\u0b3e\u0b57\u0dd9\u0dcf\u0ddf"
    "\u2003\u200b\u200c\u200d\u2028\u2060\ufeff\ufdd0\uff21\uff0c\u3000\u2126\u212b\u00c5\u1e9b\u0f73"
    "中\U0001d400\U0001f600\U0001d15e\U0001d165\U00011099\U000110ba\ud800"
)


def _random_texts(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(_TRICKY) for _ in range(rng.randrange(0, 12))) for _ in range(count)]


def test_normalize_matches_the_plain_rules_on_random_tricky_text() -> None:
    rng = random.Random(7)
    for text in _random_texts(rng, 3000) + ["".join(rng.choice(_TRICKY) for _ in range(2000)) for _ in range(5)]:
        assert normalize(text) == _reference_normalize(text), ascii(text)


def test_no_astral_composition_has_a_bmp_second_character() -> None:
    # The fast path lists BMP composition seconds only from BMP composites (astral characters are always
    # treated as special); this holds for the Unicode version Python ships.
    for code in range(0x10000, 0x30000):
        parts = unicodedata.decomposition(chr(code)).split()
        if len(parts) == 2 and not parts[0].startswith("<"):
            assert int(parts[1], 16) >= 0x10000, hex(code)


# ------------------------------------------------------------------------------------------------ normalize_many


@pytest.mark.parametrize(
    "texts",
    [
        [],
        [""],
        ["", "", ""],
        ["e", "\u0301x", "\u0301"],  # a combining mark at the start must not join the previous text
        ["\u1100", "\u1161", "\uac00", "\u11a8"],  # Hangul jamo that would compose if adjacent
        ["a\r", "\nb", "\r", "\n"],  # CR at the end of one text and LF at the start of the next
        ["a \t", "\t b", "  ", "\u3000"],
        ["x\n\n\n", "\n\n\ny", "\n\n"],
        ["a\x00b", "c"],  # the separator itself inside a text
        ["\x01\x1f", "\u200b", "\ufeff\ufeff", "\ud800"],
        ["plain ascii", "mixed 中文，ｆｕｌｌ", "ascii again\r\n"],
        ["\u00a8", "\u00b4x", "e\u200b\u0301"],
    ],
)
def test_normalize_many_equals_normalize(texts: list[str]) -> None:
    assert normalize_many(texts) == [normalize(t) for t in texts]


def test_normalize_many_equals_normalize_on_random_tricky_texts() -> None:
    texts = _random_texts(random.Random(11), 5000) + ["ascii only", "more ascii\t\r\n"] * 50
    assert normalize_many(texts) == [normalize(t) for t in texts]


def test_normalize_many_in_several_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clean, "_BATCH_CHARS", 16)
    texts = _random_texts(random.Random(3), 500) + [f"line {i}\r" for i in range(100)]
    assert normalize_many(texts) == [normalize(t) for t in texts]


def test_normalize_many_accepts_a_tuple() -> None:
    assert normalize_many(("Ａ", " b ")) == ["A", "b"]


# ------------------------------------------------------------------------------------------------ filters


def test_length_filter_reasons() -> None:
    keep = LengthFilter(min_chars=3, max_chars=10)
    assert keep("hello") == (True, None)
    assert keep("") == (False, "empty")
    assert keep(" \n\t ") == (False, "empty")
    assert keep("hi") == (False, "too_short")
    assert keep("x" * 11) == (False, "too_long")
    assert keep("x" * 10) == (True, None)


def test_length_filter_min_words() -> None:
    keep = LengthFilter(min_chars=1, min_words=3)
    assert keep("two words") == (False, "too_short")
    assert keep("now three words") == (True, None)


def test_length_filter_defaults_drop_only_empty() -> None:
    assert LengthFilter()("x") == (True, None)
    assert LengthFilter()("") == (False, "empty")


def test_length_filter_validates_limits() -> None:
    with pytest.raises(ValueError):
        LengthFilter(min_chars=10, max_chars=5)
    with pytest.raises(ValueError):
        LengthFilter(min_chars=-1)


def test_apply_filters_counts_first_rejection_only() -> None:
    def no_digits(text: str) -> tuple[bool, str | None]:
        return (False, "digits") if any(ch.isdigit() for ch in text) else (True, None)

    texts = ["fine text", "", "short", "x" * 50, "has 1 digit", "12"]
    kept, dropped = apply_filters(texts, [LengthFilter(min_chars=6, max_chars=20), no_digits])
    assert kept == [0]
    assert dropped == Counter({"too_short": 2, "empty": 1, "too_long": 1, "digits": 1})
    assert apply_filters(iter(texts), []) == ([0, 1, 2, 3, 4, 5], Counter())
