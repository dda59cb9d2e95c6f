"""Word-level tokenization and vocabulary, shared by the word-level language models (n-gram, NNLM, word2vec).

A token is one of, tried in this order at each position (leftmost-first alternation):

- a number with inner separators (``3.14``, ``1,000``);
- a word: letters, marks, digits and ``_``, with inner apostrophes (``don't``, ``l’homme``);
- one CJK character (Han, Hiragana, Katakana), so ``我吃苹果`` is ``我 吃 苹 果``; a document whose Han
  characters are separated by spaces is taken as pre-segmented and keeps its runs (``我 吃 苹果``);
- any other single visible character (punctuation, symbols).

The same regular expression runs in Python (the ``regex`` module) and in DuckDB (RE2), so scoring any
text in Python and bulk tokenization inside the warehouse give the same tokens. Sentence boundaries
follow KenLM and SRILM: ``<s>`` is context only, ``</s>`` and ``<unk>`` are predicted and scored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import duckdb
import regex

from lmpipe.workspace import atomic_write_text

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIALS = (UNK, BOS, EOS)

_WORD_CHAR = r"(?:[^\p{Z}\p{C}\p{P}\p{S}\p{Han}\p{Hiragana}\p{Katakana}]|_)"
_CJK = r"[\p{Han}\p{Hiragana}\p{Katakana}]"
_HEAD = rf"\p{{N}}+(?:[.,]\p{{N}}+)+|{_WORD_CHAR}+(?:['’]{_WORD_CHAR}+)*"
_OTHER = r"[^\p{Z}\p{C}]"
TOKEN_PATTERN = rf"{_HEAD}|{_CJK}|{_OTHER}"
SEGMENTED_PATTERN = rf"{_HEAD}|{_CJK}+|{_OTHER}"
SEGMENTED_TEST = r"\p{Han}[\p{Z}\t]+\p{Han}"  # Han characters separated by spaces: pre-segmented text

_token_re = regex.compile(TOKEN_PATTERN)
_segmented_re = regex.compile(SEGMENTED_PATTERN)
_segmented_test = regex.compile(SEGMENTED_TEST)


def lower(text: str) -> str:
    """Lower-case as DuckDB's ``lower()`` does (no final-sigma rule, ``İ`` → ``i``)."""
    return text.replace("Σ", "σ").replace("İ", "i").lower()


def tokenize(text: str, lowercase: bool = False) -> list[str]:
    """The word tokens of ``text`` (no sentence markers)."""
    if lowercase:
        text = lower(text)
    pattern = _segmented_re if _segmented_test.search(text) else _token_re
    return pattern.findall(text)


def _sql_literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def sql_expression(column: str, lowercase: bool = False) -> str:
    """A DuckDB expression giving the token list of the text in ``column``; same tokens as :func:`tokenize`."""
    text = f"lower({column})" if lowercase else column
    return (
        f"CASE WHEN regexp_matches({text}, {_sql_literal(SEGMENTED_TEST)}) "
        f"THEN regexp_extract_all({text}, {_sql_literal(SEGMENTED_PATTERN)}) "
        f"ELSE regexp_extract_all({text}, {_sql_literal(TOKEN_PATTERN)}) END"
    )


def create_macro(con: duckdb.DuckDBPyConnection, lowercase: bool = False, name: str = "word_tokens") -> str:
    """Define the SQL macro ``name(text)`` on ``con`` (token list of a text); returns its name."""
    con.execute(f"CREATE OR REPLACE TEMP MACRO {name}(t) AS {sql_expression('t', lowercase)}")
    return name


class Vocabulary:
    """Word ↔ id map: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, then words by descending train count."""

    def __init__(self, words: Sequence[str], counts: Sequence[int] | None = None) -> None:
        if tuple(words[:3]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}")
        self.words = list(words)
        self.counts = list(counts) if counts is not None else [0] * len(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, counts: Counter | Iterable[tuple[str, int]], min_count: int = 1) -> Vocabulary:
        """Keep words seen at least ``min_count`` times; the rest count towards ``<unk>``."""
        items = counts.items() if isinstance(counts, Counter) else counts
        kept, unk = [], 0
        for w, c in items:
            if w in SPECIALS:
                continue
            if c >= min_count:
                kept.append((w, c))
            else:
                unk += c
        kept.sort(key=lambda wc: (-wc[1], wc[0]))
        return cls([*SPECIALS, *(w for w, _ in kept)], [unk, 0, 0, *(c for _, c in kept)])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    @property
    def n_predictable(self) -> int:
        """Types a model predicts: every word, ``</s>`` and ``<unk>`` (not ``<s>``)."""
        return len(self.words) - 1

    def encode(self, tokens: Iterable[str]) -> list[int]:
        get = self.index.get
        return [get(t, UNK_ID) for t in tokens]

    def save(self, path: Path) -> Path:
        """One ``word<TAB>train count`` line per id (tokens never contain whitespace)."""
        atomic_write_text(path, "".join(f"{w}\t{c}\n" for w, c in zip(self.words, self.counts, strict=True)))
        return path

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        rows = [line.split("\t") for line in Path(path).read_text(encoding="utf-8").splitlines()]
        return cls([r[0] for r in rows], [int(r[1]) for r in rows])
