"""Test-set contamination: which test documents each training stage has seen, found by shared word n-grams.

A test document counts as contaminated for a stage when one of its word n-grams (13 by default, as in the
GPT-3 paper's overlap analysis, Brown et al. 2020, arXiv:2005.14165, appendix C) also occurs in the text that
stage trains on. What each stage trains on:

- ``ngram``, ``embeddings``, ``pretrain``: the train-split documents (checked once, reported for each);
- ``sft``: the train rows of ``instructions``: system message, earlier turns, prompt and response (the
  built-in rows only when ``sft.builtin`` is on);
- ``reward``: the train rows of ``preferences``: system message, earlier turns, prompt, chosen and rejected
  answers, the ranked model samples included (built-in pairs only when ``reward.builtin`` is on);
- ``ppo``: the prompts of the single-turn train rows of ``instructions``, with their system message.

Each stage is charged for its own data only; a later stage also inherits what its starting model saw
(pretrain → sft → reward and ppo).

Words are the tokens of :mod:`lmpipe.wordtok` that hold a letter or a digit, lower-cased, with ``’`` read
as ``'``: case, punctuation and spacing cannot hide a leak. Rows of the instruction and preference tables
are normalised as ingestion normalises documents (:func:`lmpipe.clean.normalize`) before they are split
into words. A shingle is ``n`` consecutive words of one text (never across two documents or two fields of
a row), hashed to 64 bits: each word by DuckDB's ``hash()``, the ``n`` word hashes combined by a polynomial
modulo 2^64. The test split's shingles are held in memory as a sorted array; the training text streams
from the warehouse batch by batch, so memory stays bounded by the test split and one batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import regex

from lmpipe import instructions, preferences, warehouse, wordtok
from lmpipe.clean import normalize_many
from lmpipe.config import PipelineConfig
from lmpipe.stage import StageResult
from lmpipe.workspace import Workspace

STAGES = ("ngram", "embeddings", "pretrain", "sft", "reward", "ppo")
DOCUMENT_STAGES = ("ngram", "embeddings", "pretrain")
PASSAGE_CHARS = 300  # an example passage is cut to about this many characters
BATCH_ROWS = 8192  # texts per batch streamed from the warehouse

_WORD = r"[\p{L}\p{N}]"  # a kept token holds a letter or a digit (same class in RE2 and the regex module)
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it modulo 2^64 loses no bit of a word hash
_token_re = regex.compile(wordtok.TOKEN_PATTERN)
_segmented_re = regex.compile(wordtok.SEGMENTED_PATTERN)
_segmented_test = regex.compile(wordtok.SEGMENTED_TEST)
_word_re = regex.compile(_WORD)


# ----------------------------------------------------------------------------------------------
# words and shingles


def word_hashes_sql(column: str) -> str:
    """A DuckDB expression: the 64-bit hashes of the normalised words of the text in ``column``."""
    tokens = wordtok.sql_expression(column)
    return (f"list_transform(list_filter({tokens}, lambda t: regexp_matches(t, '{_WORD}')), "
            f"lambda t: hash(replace(lower(t), '’', '''')))")


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of ``text``, in the order :func:`word_hashes_sql` hashes them."""
    pattern = _segmented_re if _segmented_test.search(text) else _token_re
    return [m.span() for m in pattern.finditer(text) if _word_re.search(m.group())]


def shingles(words: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ``n`` consecutive words within one text of a batch: (hash, text index, first word in the text).

    ``words`` holds the word hashes of all the texts one after another, ``lengths`` each text's word count;
    the shingles come out ordered by text, then position.
    """
    words = np.asarray(words, dtype=np.uint64)
    lengths = np.asarray(lengths, dtype=np.int64)
    m = len(words) - n + 1
    if m <= 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, np.int64)
    h = words[:m].copy()
    for j in range(1, n):  # h = w[i]·M^(n-1) + w[i+1]·M^(n-2) + ... + w[i+n-1], wrapping modulo 2^64
        h *= _MULTIPLIER
        h += words[j:j + m]
    ends = np.cumsum(lengths)
    text_of = np.repeat(np.arange(len(lengths)), lengths)[:m]  # the text of each window's first word
    start = np.flatnonzero(np.arange(m) + n <= ends[text_of])  # the windows that end inside their text
    text = text_of[start]
    return h[start], text, start - (ends - lengths)[text]


def runs(doc: np.ndarray, position: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge matched shingles, sorted by (document, first word), into runs of overlapping ones.

    Returns each run's document, first word and end (one past its last word).
    """
    doc, position = np.asarray(doc), np.asarray(position)
    if not len(doc):
        return doc, position, position
    new = np.ones(len(doc), bool)
    new[1:] = (doc[1:] != doc[:-1]) | (position[1:] - position[:-1] >= n)
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(doc)) - 1
    return doc[first], position[first], position[last] + n


def _flat(lists: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list<uint64> column as (all values, length of each list)."""
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return values, lengths


# ----------------------------------------------------------------------------------------------
# the test split


@dataclass
class HeldOutShingles:
    """The shingles of the test documents: the sorted distinct hashes; per shingle its document and first word."""

    doc_ids: np.ndarray  # (D,) every test document, by doc_id
    words: np.ndarray  # (D,) words per document
    unique: np.ndarray  # (U,) sorted distinct shingle hashes
    inverse: np.ndarray  # (S,) index into unique of each shingle
    doc: np.ndarray  # (S,) document index of each shingle
    position: np.ndarray  # (S,) first word of each shingle within its document
    n: int
    # a quick pre-filter: which values of a hash's top bits some test shingle has (the top bits of the polynomial
    # mix every word; the low ones do not), sized so that few train shingles pass it by chance
    buckets: np.ndarray = field(init=False)
    shift: np.uint64 = field(init=False)

    def __post_init__(self) -> None:
        bits = int(np.clip(np.ceil(np.log2(max(len(self.unique), 1) * 32)), 16, 24))
        self.shift = np.uint64(64 - bits)
        self.buckets = np.zeros(1 << bits, bool)
        self.buckets[self.unique >> self.shift] = True

    @property
    def checked(self) -> int:
        """Test documents long enough to hold a shingle."""
        return int((self.words >= self.n).sum())

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """Indices into ``unique`` of the given hashes that are test shingles."""
        if not len(self.unique):
            return np.empty(0, np.int64)
        hashes = hashes[self.buckets[hashes >> self.shift]]
        idx = np.searchsorted(self.unique, hashes)
        idx[idx == len(self.unique)] = 0
        return idx[self.unique[idx] == hashes]


def held_out_shingles(con: duckdb.DuckDBPyConnection, n: int) -> HeldOutShingles:
    """The shingles of the test split's documents (held in memory: the split is a few percent of the corpus)."""
    table = con.sql(f"SELECT doc_id, {word_hashes_sql('text')} AS h FROM documents WHERE split = 'test' "
                    "ORDER BY doc_id").to_arrow_table()
    words, lengths = _flat(table.column("h"))
    hashes, doc, position = shingles(words, lengths, n)
    unique, inverse = np.unique(hashes, return_inverse=True)
    doc_ids = table.column("doc_id").to_numpy().astype(np.int64)
    return HeldOutShingles(doc_ids, lengths, unique, inverse, doc, position, n)


# ----------------------------------------------------------------------------------------------
# what each stage trains on


@dataclass(frozen=True)
class TrainingText:
    """Text one or more stages train on: ``query`` yields a column ``text``; ``normalize`` for raw table rows."""

    description: str
    query: str = ""  # empty: nothing to check
    params: tuple[Any, ...] = ()
    normalize: bool = False


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [name]).fetchall()[0][0])


def _rows(con: duckdb.DuckDBPyConnection, table: str, where: str, params: Sequence[Any]) -> int:
    return int(con.execute(f"SELECT count(*) FROM {table} WHERE {where}", list(params)).fetchall()[0][0])


def _fields(columns: Sequence[str]) -> str:
    """One text per non-null field of a row, the contents of the earlier turns (JSON ``history``) included."""
    history = "coalesce(json_extract_string(history, '$[*].content'), []::VARCHAR[])"
    return f"unnest(list_filter([{', '.join(columns)}] || {history}, lambda x: x IS NOT NULL)) AS text"


def _table_text(con: duckdb.DuckDBPyConnection, table: str, what: str, columns: Sequence[str], builtin: bool,
                builtin_sources: Sequence[str], extra: str = "") -> TrainingText:
    if not _has_table(con, table):
        return TrainingText(f"no {table} table: nothing to check")
    excluded = [] if builtin else list(builtin_sources)
    where = "split = 'train'" + extra + (f" AND source NOT IN ({', '.join('?' * len(excluded))})" if excluded else "")
    rows = _rows(con, table, where, excluded)
    if not rows:
        return TrainingText(f"no train rows in the {table} table: nothing to check")
    source = "" if builtin else ", built-in rows excluded"
    return TrainingText(f"{what} of {_count(rows, 'train row')} of {table}{source}",
                        f"SELECT {_fields(columns)} FROM {table} WHERE {where}", tuple(excluded), normalize=True)


def training_texts(con: duckdb.DuckDBPyConnection, cfg: PipelineConfig) -> dict[str, TrainingText]:
    """What each stage trains on; the three document stages share one object."""
    n_train = _rows(con, "documents", "split = 'train'", [])
    docs = TrainingText(_count(n_train, "train-split document"), "SELECT text FROM documents WHERE split = 'train'")
    sft = _table_text(con, "instructions", "system, history, prompt and response",
                      ["system", "prompt", "response"], cfg.sft.builtin, [instructions.BUILTIN_SOURCE])
    reward = _table_text(con, "preferences", "system, history, prompt, chosen and rejected",
                         ["system", "prompt", "chosen", "rejected"], cfg.reward.builtin, preferences.BUILTIN_SOURCES)
    ppo = _table_text(con, "instructions", "system and prompt (no responses)", ["system", "prompt"],
                      cfg.sft.builtin, [instructions.BUILTIN_SOURCE], " AND history IS NULL")
    return {**dict.fromkeys(DOCUMENT_STAGES, docs), "sft": sft, "reward": reward, "ppo": ppo}


def _word_batches(con: duckdb.DuckDBPyConnection, text: TrainingText) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The word hashes of ``text``'s texts, a batch at a time: (all hashes, words per text)."""
    if not text.normalize:  # documents are normalised at ingestion: DuckDB does everything
        reader = con.sql(f"SELECT {word_hashes_sql('text')} AS h FROM ({text.query})",
                         params=list(text.params)).to_arrow_reader(BATCH_ROWS)
        for batch in reader:
            yield _flat(batch.column(0))
        return
    aux = con.cursor()  # hashes the normalised batches while `con` streams the raw ones
    try:
        for batch in con.sql(text.query, params=list(text.params)).to_arrow_reader(BATCH_ROWS):
            aux.register("_contamination_batch", pa.table({"text": normalize_many(batch.column(0).to_pylist())}))
            yield _flat(aux.sql(f"SELECT {word_hashes_sql('text')} FROM _contamination_batch").to_arrow_table()
                        .column(0))
            aux.unregister("_contamination_batch")
    finally:
        aux.close()


def seen_shingles(con: duckdb.DuckDBPyConnection, text: TrainingText, test: HeldOutShingles, n: int) -> np.ndarray:
    """Which of the test shingles (``test.unique``) occur in ``text``: a boolean mask."""
    seen = np.zeros(len(test.unique), bool)
    if not text.query or not len(test.unique):
        return seen
    for words, lengths in _word_batches(con, text):
        seen[test.lookup(shingles(words, lengths, n)[0])] = True
    return seen


# ----------------------------------------------------------------------------------------------
# the report


def passage(text: str, first: int, end: int, limit: int = PASSAGE_CHARS) -> str:
    """The original text of words [first, end) of ``text``, spaces collapsed, cut to about ``limit`` characters."""
    spans = word_spans(text)
    out = " ".join(text[spans[first][0]:spans[end - 1][1]].split())
    return out if len(out) <= limit else out[:limit].rstrip() + "…"


def _examples(con: duckdb.DuckDBPyConnection, test: HeldOutShingles, hit: np.ndarray, n: int, max_examples: int
              ) -> list[dict[str, Any]]:
    """The longest overlapping runs, one per document, longest first (then by document id)."""
    doc, first, end = runs(test.doc[hit], test.position[hit], n)
    out: list[dict[str, Any]] = []
    for i in np.lexsort((test.doc_ids[doc], first - end)):
        if len(out) == max_examples:
            break
        doc_id = int(test.doc_ids[doc[i]])
        if any(ex["document_id"] == doc_id for ex in out):
            continue
        text = con.execute("SELECT text FROM documents WHERE doc_id = ?", [doc_id]).fetchall()[0][0]
        out.append({"document_id": doc_id, "passage": passage(text, int(first[i]), int(end[i]))})
    return out


def stage_report(con: duckdb.DuckDBPyConnection, test: HeldOutShingles, seen: np.ndarray, description: str, n: int,
                 max_examples: int) -> dict[str, Any]:
    """One stage's entry: contaminated test documents, their share of the checkable ones, example passages."""
    hit = seen[test.inverse]  # (S,) which test shingles the stage saw
    contaminated = len(np.unique(test.doc[hit]))
    return {"trained_on": description, "contaminated": contaminated,
            "share": contaminated / test.checked if test.checked else 0.0,
            "examples": _examples(con, test, hit, n, max_examples)}


def check_contamination(ws: Workspace, cfg: PipelineConfig, results: Mapping[str, StageResult] | None = None,
                        n: int = 13, max_examples: int = 3) -> dict:
    """The share of test documents whose ``n``-word shingles occur in each training stage's data.

    Returns ``{"n", "test_documents", "checked", "too_short", "stages": {stage: {"trained_on", "contaminated",
    "share", "examples": [{"document_id", "passage"}]}}}``, ready for JSON. ``share`` is ``contaminated`` over
    ``checked``, the test documents of at least ``n`` words (the ``too_short`` rest cannot be checked). With
    ``results``, only the stages in it are reported (those that ran); without, all six. A stage whose data is
    absent (no instructions table, no train rows) is reported with 0 and ``trained_on`` saying so.
    """
    if n < 1 or max_examples < 0:
        raise ValueError(f"contamination check: n must be >= 1 and max_examples >= 0, got n={n}, "
                         f"max_examples={max_examples}")
    stages = [s for s in STAGES if results is None or s in results]
    with warehouse.connect(ws, read_only=True) as con:
        con.execute("SET enable_progress_bar = false")  # long scans of a big corpus would draw one on stdout
        test = held_out_shingles(con, n)
        texts = training_texts(con, cfg)
        seen: dict[TrainingText, np.ndarray] = {}  # the document stages share one pass
        report = {}
        for stage in stages:
            text = texts[stage]
            if text not in seen:
                seen[text] = seen_shingles(con, text, test, n)
            report[stage] = stage_report(con, test, seen[text], text.description, n, max_examples)
    return {"n": n, "test_documents": len(test.doc_ids), "checked": test.checked,
            "too_short": len(test.doc_ids) - test.checked, "stages": report}
