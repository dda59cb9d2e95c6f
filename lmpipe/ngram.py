"""Statistical n-gram language models: smoothing, perplexity, generation, and the ``ngram`` stage.

P(w_1..w_l) = Π_i p(w_i | w_{i-n+1}..w_{i-1}) under the Markov assumption, with one ``<s>`` before and
one ``</s>`` after each sentence (KenLM/SRILM conventions: ``</s>`` and ``<unk>`` are predicted, ``<s>`` is
context only). V, the number of types a model predicts, counts the words, ``</s>`` and ``<unk>``.

Counting happens in DuckDB (:mod:`lmpipe.ngram_count`); estimation is SQL over those counts, so the
small-corpus :func:`fit` (an in-memory DuckDB) and the stage (the warehouse) run the same code. Kneser-Ney
has a second engine (:mod:`lmpipe.ngram_sorted`) that sorts each order's counts once and needs no joins;
it gives the same numbers, faster, and is used whenever its arrays fit DuckDB's memory limit (``engine``
of :func:`estimate` and :func:`estimate_arpa`). Every
method but add-k is estimated in back-off form, the form ARPA files store: a stored n-gram h·w has
its probability p(w|h), any other falls back as p(w|h) = bow(h) · p(w|h') with h' = h minus its
first word, and bow(h) = 1 for a context never seen. Smoothing methods (Chen & Goodman 1998,
"An Empirical Study of Smoothing Techniques for Language Modeling", for all of them):

- ``mle``: c(h·w) / c(h·); unseen continuations of a seen context get 0 (bow = 0).
- ``addk``: (c(h·w) + k) / (c(h·) + k·V); Laplace when k = 1.
- ``katz``: Katz (1987) back-off with Good-Turing discounts d_r for r ≤ K (5), α(h) from the left-over mass;
  unigrams are discounted too and their left-over mass spread uniformly, so ``<unk>`` is never 0.
- ``stupid``: Brants et al. (2007) stupid back-off, relative frequency or α · score of the shorter context.
  A score, not a probability: it does not sum to 1, so its "perplexity" only ranks.
- ``jm``: Jelinek-Mercer interpolation λ_n·p_ML + (1-λ_n)·p_{n-1}, one λ per order fitted on held-out data.
- ``kn``: interpolated modified Kneser-Ney with discounts D1, D2, D3+ per order (Chen & Goodman, eq. 26),
  continuation counts for lower orders, unigrams interpolated with the uniform 1/V (as KenLM does). Where
  the closed-form discounts are undefined or out of range (small or deduplicated data) an order falls
  back to KenLM's defaults 0.5, 1, 1.5 and says so in ``model.notes`` (see :func:`kn_discounts`).

Logarithms in the API are base 10, as in ARPA files and KenLM.
"""

from __future__ import annotations

import abc
import hashlib
import itertools
import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from safetensors.numpy import load_file, save_file

from lmpipe import ngram_count, ngram_sorted, warehouse, wordtok
from lmpipe.arpa import ArpaWriter
from lmpipe.config import NgramConfig
from lmpipe.scoring import TextScore, make_score
from lmpipe.stage import StageContext, StageOutput, StageResult
from lmpipe.wordtok import BOS_ID, EOS, EOS_ID, UNK_ID, Vocabulary
from lmpipe.workspace import Workspace

METHODS = ("mle", "addk", "katz", "stupid", "jm", "kn")
ENGINES = ("auto", "sql", "sorted")
NORMALISED = ("mle", "addk", "katz", "jm", "kn")
KN_FALLBACK = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback defaults
LOG2_10 = math.log2(10)
_SORT_QUERIES = 256  # lookups of more keys than this are sorted first
_ARPA_BATCH = 1 << 18  # n-grams per batch from DuckDB to the ARPA writer
_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constants of splitmix64


# ----------------------------------------------------------------------------------------------
# n-gram tables: the packed n-gram of the SQL side, hashed to 64 bits, sorted, binary search

_U64 = np.uint64


def pack(ids: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) 64-bit halves of each row's packed n-gram: word ``id + 1`` every ``bits`` bits, first word
    highest, -1 (no word) as 0; the same integer as the SQL keys of :mod:`lmpipe.ngram_count`."""
    ids = np.asarray(ids)
    n, k = ids.shape if ids.ndim == 2 else (len(ids), 0)
    hi, lo = np.zeros(n, _U64), np.zeros(n, _U64)
    for j in range(k):
        digit = (ids[:, j].astype(np.int64) + 1).astype(_U64)
        shift = bits * (k - 1 - j)
        if shift >= 64:
            hi |= digit << _U64(shift - 64)
            continue
        lo |= digit << _U64(shift)  # bits above 64 drop off here and go to hi below
        if shift and shift + bits > 64:
            hi |= digit >> _U64(64 - shift)
    return hi, lo


def unpack(hi: np.ndarray, lo: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Word ids (n, k) of packed n-grams; the inverse of :func:`pack`."""
    mask = _U64((1 << bits) - 1)
    out = np.empty((len(lo), k), np.int32)
    for j in range(k):
        shift = bits * (k - 1 - j)
        if shift >= 64:
            digit = hi >> _U64(shift - 64)
        elif shift and shift + bits > 64:
            digit = (lo >> _U64(shift)) | (hi << _U64(64 - shift))
        else:
            digit = lo >> _U64(shift)
        out[:, j] = (digit & mask).astype(np.int64) - 1
    return out


def table_keys(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """64-bit lookup keys: a bijective mix of ``lo`` when ``hi`` is 0 (n-grams of up to 64 bits never collide),
    a hash of both halves beyond; tables check their keys for collisions when built."""
    x = lo ^ (hi * _MUL)
    x ^= x >> _U64(31)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(29)
    return x


@dataclass
class NgramTable:
    """One order's entries: sorted lookup keys, value columns, and the packed n-grams when kept (for ARPA)."""

    keys: np.ndarray
    values: dict[str, np.ndarray]
    order: int
    bits: int
    packed: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def build(cls, hi: np.ndarray, lo: np.ndarray, order: int, bits: int, keep_ngrams: bool = True,
              **values: np.ndarray) -> NgramTable:
        keys, perm = ngram_sorted.argsort_keys(table_keys(hi, lo))
        if len(keys) > 1 and (keys[1:] == keys[:-1]).any():
            raise ValueError("64-bit n-gram key collision; please report this corpus")
        vals = {k: np.asarray(v)[perm] for k, v in values.items()}
        return cls(keys, vals, order, bits, (hi[perm], lo[perm]) if keep_ngrams else None)

    @classmethod
    def from_ids(cls, ids: np.ndarray, bits: int, **values: np.ndarray) -> NgramTable:
        ids = np.asarray(ids).reshape(len(ids), -1)
        return cls.build(*pack(ids, bits), ids.shape[1], bits, **values)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def ids(self) -> np.ndarray:
        """The n-grams as word ids (n, order); only for tables built with ``keep_ngrams``."""
        if self.packed is None:
            raise ValueError("this table was built without its n-grams; estimate with keep_ngrams=True")
        return unpack(*self.packed, self.order, self.bits)

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, row index) of each row of ``ids``."""
        q = table_keys(*pack(ids, self.bits))
        if not len(self.keys):
            return np.zeros(len(q), bool), np.zeros(len(q), np.int64)
        if len(q) > _SORT_QUERIES:  # in key order, each search starts where the last ended: ~8x fewer cache misses
            order = np.argsort(q)
            idx = np.empty(len(q), np.int64)
            idx[order] = np.searchsorted(self.keys, q[order])
        else:
            idx = np.searchsorted(self.keys, q)
        idx = np.minimum(idx, len(self.keys) - 1)
        return self.keys[idx] == q, idx

    def get(self, ids: np.ndarray, column: str, default: float) -> np.ndarray:
        found, idx = self.find(ids)
        return np.where(found, self.values[column][idx] if len(self.keys) else default, default)


# ----------------------------------------------------------------------------------------------
# discounts (pure functions of count-of-counts n_r = number of n-grams seen exactly r times)


def kn_discounts(n: Sequence[int], fallback: Sequence[float] = KN_FALLBACK) -> tuple[tuple[float, float, float], bool]:
    """Modified Kneser-Ney discounts (D1, D2, D3+) from n_1..n_4; Chen & Goodman (1998), eq. 26.

    Y = n1 / (n1 + 2 n2), D_r = r - (r + 1) Y n_{r+1} / n_r. The closed form needs n1..n4 > 0 and gives
    D_r in (0, r) only on data with a natural count spectrum; on small or deduplicated corpora (no
    singletons, say) it is undefined or out of range, the failure KenLM reports as "discount out of
    range". Then ``fallback`` (KenLM's 0.5, 1, 1.5) is used and the second value is True.
    """
    n1, n2, n3, n4 = (int(x) for x in n[:4])
    if min(n1, n2, n3, n4) > 0:
        y = n1 / (n1 + 2 * n2)
        d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
        if all(0 < d[r] < r + 1 for r in range(3)):
            return d, False
    return (float(fallback[0]), float(fallback[1]), float(fallback[2])), True


def good_turing_discounts(n: Sequence[int], k: int = 5) -> tuple[list[float], bool]:
    """Katz's discount ratios d_1..d_k (counts above k are trusted); Katz (1987), Chen & Goodman eq. 12.

    r* = (r + 1) n_{r+1} / n_r and d_r = (r*/r - (k+1) n_{k+1}/n_1) / (1 - (k+1) n_{k+1}/n_1), from
    ``n`` = [n_1, ..., n_{k+1}]. Where a ratio is undefined or outside (0, 1] (sparse count spectra),
    d_r = 1 - 0.5/r (absolute discounting by 0.5) is used and the second value is True.
    """
    n = [int(x) for x in n[: k + 1]] + [0] * max(0, k + 1 - len(n))
    common = (k + 1) * n[k] / n[0] if n[0] else 1.0
    out, fell_back = [], False
    for r in range(1, k + 1):
        d = float("nan")
        if n[r - 1] and n[r] and common < 1:
            d = ((r + 1) * n[r] / n[r - 1] / r - common) / (1 - common)
        if not 0 < d <= 1:
            d, fell_back = 1 - 0.5 / r, True
        out.append(d)
    return out, fell_back


# ----------------------------------------------------------------------------------------------
# models


def token_batch(order: int, sentences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(contexts, words) of every predicted token of id sentences ``[<s>, ..., </s>]``; pads are -1."""
    pad = order - 1
    flat, targets, base = [], [], 0
    for s in sentences:
        flat.extend([-1] * pad + list(s))
        targets.extend(range(base + pad + 1, base + pad + len(s)))
        base += pad + len(s)
    flat_a, t = np.array(flat, np.int64), np.array(targets, np.int64)
    ctx = flat_a[t[:, None] + np.arange(-pad, 0)] if pad else np.zeros((len(t), 0), np.int64)
    return ctx, flat_a[t] if len(t) else np.zeros(0, np.int64)


class NgramModel(abc.ABC):
    """Shared API; subclasses implement :meth:`log10_batch` for (context, word) id batches."""

    method: str = ""

    def __init__(self, order: int, vocab: Vocabulary) -> None:
        self.order = order
        self.vocab = vocab
        self.notes: dict[str, float] = {}  # estimation details worth logging (discounts, fallbacks)

    @property
    def normalised(self) -> bool:
        return self.method in NORMALISED

    @abc.abstractmethod
    def log10_batch(self, ctx: np.ndarray, words: np.ndarray) -> np.ndarray:
        """log10 p(words[i] | ctx[i]); ``ctx`` is (n, order-1) ids, left-padded with -1 before ``<s>``."""

    # -- single queries --------------------------------------------------------------------------

    def _context_ids(self, context: Sequence[str]) -> np.ndarray:
        ids = [BOS_ID if t == wordtok.BOS else self.vocab.index.get(t, UNK_ID) for t in context]
        ids = ids[len(ids) - (self.order - 1):] if self.order > 1 else []
        return np.array([-1] * (self.order - 1 - len(ids)) + ids, np.int64).reshape(1, self.order - 1)

    def logprob(self, word: str, context: Sequence[str] = ()) -> float:
        """log10 p(word | context); the context is a token list (start it with ``<s>`` for a sentence start)."""
        wid = np.array([self.vocab.index.get(word, UNK_ID)])
        return float(self.log10_batch(self._context_ids(context), wid)[0])

    def prob(self, word: str, context: Sequence[str] = ()) -> float:
        return 10.0 ** self.logprob(word, context)

    def distribution_ids(self, context: Sequence[str]) -> np.ndarray:
        """p(w | context) for every id of the vocabulary (0 for ``<s>``)."""
        words = np.arange(len(self.vocab))
        ctx = np.repeat(self._context_ids(context), len(words), axis=0)
        p = 10.0 ** self.log10_batch(ctx, words)
        p[BOS_ID] = 0.0
        return p

    def next_word_distribution(self, context: Sequence[str]) -> dict[str, float]:
        """p(w | context) for every word the model predicts, most likely first."""
        p = self.distribution_ids(context)
        order = np.argsort(-p, kind="stable")
        return {self.vocab.words[i]: float(p[i]) for i in order if i != BOS_ID}

    # -- sentences -------------------------------------------------------------------------------

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """``<s>`` + word ids + ``</s>``."""
        return [BOS_ID, *self.vocab.encode(tokens), EOS_ID]

    def token_log10(self, sentences: Sequence[Sequence[int]]) -> np.ndarray:
        """log10 p of every predicted token (words and ``</s>``) of id sentences that start with ``<s>``."""
        return self.log10_batch(*token_batch(self.order, sentences))

    def sentence_logprob(self, tokens: Sequence[str]) -> float:
        """log10 P(tokens ``</s>`` | ``<s>``)."""
        return float(self.token_log10([self.encode(tokens)]).sum())

    def perplexity(self, sentences: Iterable[Sequence[str]]) -> float:
        """10^(-Σ log10 p / tokens) over words and ``</s>``; infinite if any token has probability 0."""
        lp = self.token_log10([self.encode(s) for s in sentences])
        return float(10.0 ** (-lp.sum() / len(lp))) if len(lp) else float("nan")

    def zero_probability_count(self, sentences: Iterable[Sequence[str]]) -> int:
        """How many tokens of ``sentences`` the model gives probability 0 (MLE on unseen n-grams)."""
        return int(np.isneginf(self.token_log10([self.encode(s) for s in sentences])).sum())

    def generate(self, prefix: str | Sequence[str] = (), max_tokens: int = 30, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 0) -> list[str]:
        """Sample a continuation of ``prefix`` (text or tokens) until ``</s>`` or ``max_tokens``.

        ``<unk>`` is never sampled; ``temperature`` rescales log-probabilities, ``top_k`` keeps the k likeliest.
        """
        rng = np.random.default_rng(seed)
        context = [wordtok.BOS, *(wordtok.tokenize(prefix) if isinstance(prefix, str) else prefix)]
        out: list[str] = []
        for _ in range(max_tokens):
            p = self.distribution_ids(context)
            p[UNK_ID] = 0.0
            if temperature != 1.0:
                p = np.where(p > 0, p ** (1.0 / max(temperature, 1e-6)), 0.0)
            if top_k:
                p[np.argsort(-p, kind="stable")[top_k:]] = 0.0
            if p.sum() <= 0:
                break
            word = self.vocab.words[rng.choice(len(p), p=p / p.sum())]
            if word == EOS:
                break
            out.append(word)
            context.append(word)
        return out


class BackoffModel(NgramModel):
    """A model in back-off (ARPA) form: log10 p and log10 bow per stored n-gram, one table per order."""

    def __init__(self, order: int, vocab: Vocabulary, tables: list[NgramTable], method: str,
                 missing_bow: float = 0.0) -> None:
        super().__init__(order, vocab)
        self.tables = tables  # tables[k-1]: k-grams with "logp" and "bow"
        self.method = method
        self.missing_bow = missing_bow  # log10 bow of a context that is not stored (0: bow = 1)

    def log10_batch(self, ctx: np.ndarray, words: np.ndarray) -> np.ndarray:
        n = len(words)
        best = np.full(n, -np.inf)
        back = np.zeros(n)
        for k in range(1, self.order + 1):
            rows = np.arange(n) if k == 1 else np.flatnonzero(ctx[:, ctx.shape[1] - (k - 1)] >= 0)
            hist = ctx[rows, ctx.shape[1] - (k - 1):]
            found, idx = self.tables[k - 1].find(np.column_stack([hist, words[rows]]))
            hit = rows[found]
            best[hit] = self.tables[k - 1].values["logp"][idx[found]]
            back[hit] = 0.0
            if k > 1:  # p(w|h) = bow(h) p(w|h') when h·w is not stored: accumulate bow(h)
                miss = rows[~found]
                back[miss] += self.tables[k - 2].get(hist[~found], "bow", self.missing_bow)
        return best + back


class AddKModel(NgramModel):
    """Add-k smoothing: p(w|h) = (c(h·w) + k) / (c(h·) + k·V), with the longest available context."""

    method = "addk"

    def __init__(self, order: int, vocab: Vocabulary, counts: list[NgramTable], contexts: list[NgramTable],
                 k: float = 1.0) -> None:
        super().__init__(order, vocab)
        self.counts = counts  # counts[j-1]: j-grams with "c"
        self.contexts = contexts  # contexts[j-1]: (j-1)-word contexts with "total" (j = 1: the empty context)
        self.k = k

    def log10_batch(self, ctx: np.ndarray, words: np.ndarray) -> np.ndarray:
        avail = (ctx >= 0).sum(axis=1) if ctx.shape[1] else np.zeros(len(words), np.int64)
        out = np.empty(len(words))
        v = self.vocab.n_predictable
        for j in range(1, self.order + 1):
            rows = np.flatnonzero(np.minimum(avail + 1, self.order) == j)
            hist = ctx[rows, ctx.shape[1] - (j - 1):]
            c = self.counts[j - 1].get(np.column_stack([hist, words[rows]]), "c", 0)
            total = self.contexts[j - 1].get(hist, "total", 0)
            out[rows] = np.log10((c + self.k) / (total + self.k * v))
        out[words == BOS_ID] = -np.inf
        return out


# ----------------------------------------------------------------------------------------------
# estimation in SQL


@dataclass
class Counts:
    """N-gram counts of orders 1..``order`` in DuckDB tables ``<prefix>_c<k>(key, c, a)`` (see ngram_count)."""

    con: duckdb.DuckDBPyConnection
    prefix: str
    vocab: Vocabulary
    order: int
    ngrams: dict[int, int]

    @property
    def bits(self) -> int:
        return ngram_count.key_bits(len(self.vocab))


def count(sentences: Iterable[Sequence[str]], order: int, min_count: int = 1,
          vocab: Vocabulary | None = None) -> Counts:
    """Count tokenized ``sentences`` in an in-memory DuckDB (the small-corpus path of :func:`fit`)."""
    con = duckdb.connect()
    tok = ngram_count.load_sentences(con, "m", [list(s) for s in sentences])
    if vocab is None:
        vocab = ngram_count.build_vocabulary(con, "m", tok, min_count)
    else:
        ngram_count.store_vocabulary(con, "m", vocab)
    ngram_count.encode_sentences(con, "m", tok)
    bits = ngram_count.key_bits(len(vocab))
    return Counts(con, "m", vocab, order, ngram_count.count_ngrams(con, "m", order, bits))


def _count_of_counts(counts: Counts, k: int, x: str, top: int) -> list[int]:
    rows = counts.con.sql(
        f"SELECT {x}, count(*) FROM {counts.prefix}_c{k} WHERE {x} BETWEEN 1 AND {top} GROUP BY ALL").fetchall()
    got = dict(rows)
    return [int(got.get(r, 0)) for r in range(1, top + 1)]


def _case(x: str, values: Sequence[float], otherwise: str) -> str:
    """``CASE WHEN x = 1 THEN values[0] ... ELSE otherwise END``."""
    whens = " ".join(f"WHEN {x} = {r} THEN {v!r}" for r, v in enumerate(values, start=1))
    return f"CASE {whens} ELSE {otherwise} END"


class _Estimator:
    """Builds ``<q>_p<k>(key, p)`` and ``<q>_b<k>(key, bow)`` order by order for one method.

    Keys are packed n-grams (:func:`lmpipe.ngram_count.count_ngrams`): ``key >> bits`` is the context
    (the (k-1)-gram before the last word), ``key & mask(k-1)`` the suffix h'·w.
    """

    def __init__(self, counts: Counts, order: int, method: str, q: str) -> None:
        self.c, self.order, self.method, self.q = counts, order, method, q
        self.con, self.src, self.bits = counts.con, counts.prefix, counts.bits
        self.notes: dict[str, float] = {}
        self.views: list[str] = []

    def x(self, k: int) -> str:
        """The count column of order k: KN's adjusted counts below the top order, raw counts otherwise."""
        return "a" if self.method == "kn" and k < self.order else "c"

    def unigrams(self) -> str:
        """Every type of the vocabulary (unseen ``<unk>`` and never-predicted ``<s>`` included) with its count x,
        and the totals over all of them: Σx and how many have x = 1, 2, >= 3."""
        u = (f"SELECT v.id + 1 AS key, coalesce(c.{self.x(1)}, 0)::DOUBLE AS x FROM {self.src}_vocab v "
             f"LEFT JOIN {self.src}_c1 c ON c.key = v.id + 1")
        return (f"(SELECT * FROM ({u}) u, (SELECT sum(x) AS total, count(*) FILTER (x = 1) AS n1, "
                f"count(*) FILTER (x = 2) AS n2, count(*) FILTER (x >= 3) AS n3 FROM ({u})) t)")

    def contexts(self, k: int, x: str, **columns: str) -> None:
        """``<q>_h<k>``: per context of order k, Σx as ``total`` and any further ``columns`` (name: aggregate SQL)
        over its continuations ``c`` in the same pass. The rows are the back-off weights' keys, so the lean
        table also serves as the next order's join side (fewer and narrower columns: less memory, less spill)."""
        extra = "".join(f", {sql} AS {name}" for name, sql in columns.items())
        self.con.execute(
            f"""CREATE OR REPLACE TEMP TABLE {self.q}_h{k} AS
            SELECT {ngram_count.context('key', k, self.bits)} AS key, sum({x})::DOUBLE AS total{extra}
            FROM {self.src}_c{k} GROUP BY 1""")

    def table(self, name: str, sql: str, view: bool = False) -> None:
        """A temporary table, or a view when its rows are read only once (the top order's probabilities,
        which go straight to the model or the ARPA file instead of being stored first)."""
        self.con.execute(f"CREATE OR REPLACE TEMP {'VIEW' if view else 'TABLE'} {self.q}_{name} AS {sql}")
        if view:
            self.views.append(f"{self.q}_{name}")

    def join_lower(self, k: int) -> str:
        """FROM clause pairing each k-gram ``c`` with its context stats ``h`` and lower-order probability ``lo``."""
        return (f"FROM {self.src}_c{k} c JOIN {self.q}_h{k} h ON h.key = {ngram_count.context('c.key', k, self.bits)} "
                f"JOIN {self.q}_p{k - 1} lo ON lo.key = {ngram_count.suffix('c.key', k, self.bits)}")

    def fetch(self, keep_ngrams: bool) -> list[NgramTable]:
        """Each order's probabilities and back-off weights as a lookup table (log10, float32 like KenLM)."""
        tables = []
        for k in range(1, self.order + 1):
            bow = f"LEFT JOIN {self.q}_b{k} b USING (key)" if k < self.order else ""
            data = self.con.sql(f"SELECT {ngram_count.halves('p.key', k, self.bits)}, p.p, "
                                f"{'coalesce(b.bow, 1.0)' if bow else '1.0'} AS bow FROM {self.q}_p{k} p {bow}"
                                ).fetchnumpy()
            with np.errstate(divide="ignore"):
                logp = np.log10(np.asarray(data.pop("p"), float)).astype(np.float32)
                bow_ = np.log10(np.asarray(data.pop("bow"), float)).astype(np.float32)
            tables.append(NgramTable.build(np.asarray(data["hi"]), np.asarray(data["lo"]), k, self.bits, keep_ngrams,
                                           logp=logp, bow=bow_))
        return tables

    def release(self, k: int) -> None:
        """Drop what only order k's ARPA section still needed: its probabilities and back-off weights and the
        context table of order k + 1 (everything of order k + 1 that outlives it is already a table)."""
        for name in (f"{self.q}_b{k}", f"{self.q}_p{k}", f"{self.q}_h{k + 1}"):
            self.con.execute(f"DROP {'VIEW' if name in self.views else 'TABLE'} IF EXISTS {name}")

    def drop(self) -> None:
        for name in self.views:
            self.con.execute(f"DROP VIEW IF EXISTS {name}")
        self.views.clear()
        for k in range(1, self.order + 1):
            for t in ("p", "b", "h"):
                self.con.execute(f"DROP TABLE IF EXISTS {self.q}_{t}{k}")


def _kn_gamma(d: Sequence[float], n1: str, n2: str, n3: str, total: str) -> str:
    """SQL for KN's back-off mass γ = (D1 n1 + D2 n2 + D3 n3) / Σa from SQL for the counts and the total."""
    return f"({d[0]!r} * {n1} + {d[1]!r} * {n2} + {d[2]!r} * {n3}) / {total}"


def _kn(e: _Estimator) -> Iterator[int]:
    v = e.c.vocab.n_predictable
    e.notes["kn_sorted_engine"] = 0.0
    for k in range(1, e.order + 1):
        x = e.x(k)
        (d1, d2, d3), fell_back = kn_discounts(_count_of_counts(e.c, k, x, 4))
        e.notes.update({f"kn_d1_order{k}": d1, f"kn_d2_order{k}": d2, f"kn_d3_order{k}": d3,
                        f"kn_fallback_order{k}": float(fell_back)})
        if k == 1:  # p(w) = (a - D(a)) / Σa + γ / V, γ = (D1 n1 + D2 n2 + D3 n3) / Σa
            gamma = _kn_gamma((d1, d2, d3), "n1", "n2", "n3", "total")
            e.table("p1", f"""SELECT key, CASE WHEN key = {BOS_ID + 1} THEN 0
                ELSE greatest(x - CASE WHEN x = 0 THEN 0 ELSE {_case('x', (d1, d2, d3), repr(d3))} END, 0) / total
                  + {gamma} / {v} END AS p FROM {e.unigrams()}""")
        else:  # p(w|h) = (a(hw) - D(a(hw))) / Σa(h·) + γ(h) p(w|h'), γ(h) = (D1 n1(h) + D2 n2(h) + D3 n3(h)) / Σa(h·)
            e.contexts(k, x, gamma=_kn_gamma((d1, d2, d3), f"count(*) FILTER ({x} = 1)", f"count(*) FILTER ({x} = 2)",
                                             f"count(*) FILTER ({x} >= 3)", f"sum({x})"))
            e.table(f"p{k}", f"SELECT c.key, (c.{x} - {_case(f'c.{x}', (d1, d2, d3), repr(d3))}) / h.total "
                             f"+ h.gamma * lo.p AS p {e.join_lower(k)}", view=k == e.order)
            e.table(f"b{k - 1}", f"SELECT key, gamma AS bow FROM {e.q}_h{k}", view=True)
        yield k


def _mle_like(e: _Estimator, bow: str, lambdas: Sequence[float] | None = None) -> Iterator[int]:
    """Relative frequencies (MLE, stupid back-off) or their interpolation with λ per order (JM)."""
    v = e.c.vocab.n_predictable
    for k in range(1, e.order + 1):
        lam = lambdas[k - 1] if lambdas else 1.0
        if k == 1:
            mix = f" + {1 - lam!r} / {v}" if lambdas else ""
            e.table("p1", f"SELECT key, CASE WHEN key = {BOS_ID + 1} THEN 0 ELSE {lam!r} * x / total{mix} END AS p "
                          f"FROM {e.unigrams()}")
            yield k
            continue
        e.contexts(k, "c")
        mix = f" + {1 - lam!r} * lo.p" if lambdas else ""
        e.table(f"p{k}", f"SELECT c.key, {lam!r} * c.c / h.total{mix} AS p {e.join_lower(k)}", view=k == e.order)
        e.table(f"b{k - 1}", f"SELECT key, {repr(1 - lam) if lambdas else bow} AS bow FROM {e.q}_h{k}", view=True)
        yield k


def _katz(e: _Estimator, top: int = 5) -> Iterator[int]:
    v = e.c.vocab.n_predictable
    for k in range(1, e.order + 1):
        d, fell_back = good_turing_discounts(_count_of_counts(e.c, k, "c", top + 1), top)
        e.notes[f"katz_fallback_order{k}"] = float(fell_back)
        if k == 1:  # discounted unigrams, the left-over mass spread uniformly (so <unk> has some)
            e.table("p1", f"""WITH u AS (SELECT key, x, x * {_case('x', d, '1.0')} AS kept, total FROM {e.unigrams()})
                SELECT key, CASE WHEN key = {BOS_ID + 1} THEN 0
                ELSE kept / total + (1 - (SELECT sum(kept) FROM u) / total) / {v} END AS p FROM u""")
            yield k
            continue
        # a context whose continuations were all seen more than K times keeps no mass for unseen words;
        # there every continuation is discounted by 0.5 instead, so no test event gets probability 0
        e.contexts(k, "c", kept=f"sum({_case('c', d, '1.0')} * c)")
        e.table(f"p{k}", f"""SELECT c.key, CASE WHEN h.kept >= h.total * (1 - 1e-9) THEN (c.c - 0.5) / h.total
            ELSE {_case('c.c', d, '1.0')} * c.c / h.total END AS p, lo.p AS lo {e.join_lower(k)}""")
        # α(h) = (1 - Σ_seen p*(w|h)) / (1 - Σ_seen p(w|h')), Chen & Goodman eq. 13
        e.table(f"b{k - 1}", f"""SELECT {ngram_count.context('key', k, e.bits)} AS key, CASE WHEN 1 - sum(lo) > 1e-12
            THEN greatest(1 - sum(p), 0) / (1 - sum(lo)) ELSE 0 END AS bow FROM {e.q}_p{k} GROUP BY 1""")
        yield k


def _build(counts: Counts, order: int, method: str, alpha: float, lambdas: Sequence[float] | None
           ) -> tuple[_Estimator, Iterator[int]]:
    """Check the arguments; returns the estimator of a back-off method and its steps, which build the
    probability and back-off weight tables in SQL order by order, yielding each order once its tables
    (and the back-off weights of the order below) exist. The caller drops the tables (``e.drop()``)."""
    if method not in METHODS:
        raise ValueError(f"unknown smoothing {method!r}; methods: {', '.join(METHODS)}")
    if not 1 <= order <= counts.order:
        raise ValueError(f"order {order} not in 1..{counts.order} (the counted orders)")
    if method == "jm" and (lambdas is None or len(lambdas) != order):
        raise ValueError(f"jm needs {order} lambdas (one per order); fit them with fit_lambdas()")
    e = _Estimator(counts, order, method, f"{counts.prefix}_{method}{order}")
    if method == "kn":
        return e, _kn(e)
    if method == "katz":
        return e, _katz(e)
    if method == "jm":
        return e, _mle_like(e, "", lambdas)
    return e, _mle_like(e, "0.0" if method == "mle" else repr(alpha))


_UNITS = {"B": 1, "bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "PiB": 1 << 50,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15}
_DUCKDB_FLOOR = 128 << 20  # what DuckDB keeps to stream the count tables while the sorted engine runs


def _memory_limit(con: duckdb.DuckDBPyConnection, middle: bool = False) -> int:
    """DuckDB's memory limit in bytes. DuckDB reports it rounded down to a tenth of its unit (``1.3 GiB``
    for 1500 MB); ``middle`` adds half of that step, the value that reads back as the same text."""
    value, unit = con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0].split()
    return int((float(value) + (0.05 if middle else 0.0)) * _UNITS[unit])


def _sorted_engine(counts: Counts, order: int, method: str, engine: str) -> bool:
    """Whether to estimate with :mod:`lmpipe.ngram_sorted`: Kneser-Ney only; ``auto`` when its arrays and
    DuckDB's streaming floor fit DuckDB's memory limit, so one limit bounds the whole process."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    if engine == "sorted" and method != "kn":
        raise ValueError(f"the sorted engine estimates Kneser-Ney only, not {method}")
    if engine == "sql" or method != "kn":
        return False
    if not ngram_sorted.fits(counts, order):
        if engine == "sorted":
            raise ValueError(f"{order}-gram keys of {counts.bits} bits leave too few bits for the counts; use "
                             "engine='sql'")
        return False
    return engine == "sorted" or (ngram_sorted.memory_needed(counts.ngrams, order) + _DUCKDB_FLOOR
                                  <= _memory_limit(counts.con))


class _MemoryShare:
    """Lowers DuckDB's memory limit by ``need`` bytes for the block (the sorted engine holds them outside
    DuckDB), so that the limit the user set still bounds the process: without this, DuckDB keeps the count
    tables it streamed cached up to its limit (whole 100 MB corpus: 2.74 GB peak instead of 2.15 GB).
    DuckDB tells its limit only to a tenth of a unit, so the limit comes back within 0.05 GiB (for a limit
    in GiB) of the one set, and unchanged by further rounds."""

    def __init__(self, con: duckdb.DuckDBPyConnection, need: int) -> None:
        self.con, self.need = con, need

    def __enter__(self) -> None:
        self.saved: int | None = _memory_limit(self.con, middle=True)
        left = max(_memory_limit(self.con) - self.need, _DUCKDB_FLOOR)
        try:
            self.con.execute(f"SET memory_limit = '{left >> 20}MiB'")
        except duckdb.Error:  # DuckDB could not evict enough (nowhere to spill): go on at the user's limit
            self.saved = None

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            self.con.execute(f"SET memory_limit = '{self.saved}B'")


def _kn_sorted(counts: Counts, order: int, notes: dict[str, float]) -> Iterator[tuple]:
    """:func:`lmpipe.ngram_sorted.kn_sections` with DuckDB's memory limit shared (see :class:`_MemoryShare`)."""
    notes["kn_sorted_engine"] = 1.0  # logged with the discounts: which engine a run used
    with _MemoryShare(counts.con, ngram_sorted.memory_needed(counts.ngrams, order)):
        yield from ngram_sorted.kn_sections(counts, order, notes)


def estimate(counts: Counts, order: int, method: str, *, k: float = 1.0, alpha: float = 0.4,
             lambdas: Sequence[float] | None = None, keep_ngrams: bool = True, engine: str = "auto") -> NgramModel:
    """A model of ``order`` (at most ``counts.order``) from ``counts``; see the module docstring.

    ``keep_ngrams=False`` keeps only what scoring needs (no ARPA export from the model), about half the memory.
    ``engine``: ``sql``, ``sorted`` (Kneser-Ney only) or ``auto`` (sorted where its arrays fit DuckDB's limit).
    """
    if method == "addk":
        return _addk(counts, order, k)
    if _sorted_engine(counts, order, method, engine):
        notes: dict[str, float] = {}
        tables = [NgramTable.build(hi, lo, j, counts.bits, keep_ngrams, logp=logp,
                                   bow=bow if bow is not None else np.zeros(len(lo), np.float32))
                  for j, hi, lo, logp, bow in _kn_sorted(counts, order, notes)]
        model = BackoffModel(order, counts.vocab, tables, method)
        model.notes.update(notes)
        return model
    e, steps = _build(counts, order, method, alpha, lambdas)
    try:
        for _ in steps:
            pass
        tables = e.fetch(keep_ngrams)
    finally:
        e.drop()
    missing = math.log10(alpha) if method == "stupid" else 0.0
    model = BackoffModel(order, counts.vocab, tables, method, missing_bow=missing)
    model.notes.update(e.notes)
    return model


def estimate_arpa(counts: Counts, order: int, method: str, path: Path, *,
                  lambdas: Sequence[float] | None = None, engine: str = "auto") -> dict[str, float]:
    """Estimate and stream the model to an ARPA file without loading it (what KenLM's lmplz does).

    For the back-off-representable methods (mle, katz, jm, kn); returns the estimation notes. Each section
    is written as soon as its order's probabilities and back-off weights exist, and what only it needed is
    dropped then (in SQL, the top orders' joins then run with less of the buffer pool taken). ``engine``
    as in :func:`estimate`.
    """
    if method not in ("mle", "katz", "jm", "kn"):
        raise ValueError(f"{method} has no direct ARPA export (add-k: addk_to_backoff; stupid back-off: none)")
    sizes = [len(counts.vocab), *(counts.ngrams[k] for k in range(2, order + 1))]  # one line per type, per n-gram
    if _sorted_engine(counts, order, method, engine):
        notes: dict[str, float] = {}
        with ArpaWriter(path, counts.vocab.words, sizes) as out:
            for k, hi, lo, logp, bow in _kn_sorted(counts, order, notes):
                out.write_arrays(k, hi, lo, logp, bow, _ARPA_BATCH)
                del hi, lo, logp, bow  # written: free the section before the next order is estimated
        return notes
    e, steps = _build(counts, order, method, 0.4, lambdas)

    def section(out: ArpaWriter, k: int) -> None:
        bow = (f", log10(coalesce(b.bow, 1.0))::FLOAT AS bow FROM {e.q}_p{k} p LEFT JOIN {e.q}_b{k} b "
               "USING (key)") if k < order else f" FROM {e.q}_p{k} p"
        query = f"SELECT {ngram_count.halves('p.key', k, e.bits)}, log10(p.p)::FLOAT AS logp{bow}"
        out.write_batches(k, counts.con.sql(query).to_arrow_reader(_ARPA_BATCH))

    try:
        with ArpaWriter(path, counts.vocab.words, sizes) as out:
            for k in steps:  # order k's tables exist, and with them order k - 1's back-off weights
                if k > 1:
                    section(out, k - 1)
                    if k < order:  # the top order's probabilities are a view over order k - 1's tables
                        e.release(k - 1)
            section(out, order)
    finally:
        e.drop()
    return e.notes


def _addk(counts: Counts, order: int, k: float) -> AddKModel:
    ngrams, contexts = [], []
    bits = counts.bits
    for j in range(1, order + 1):
        src = f"{counts.prefix}_c{j}"
        d = counts.con.sql(f"SELECT {ngram_count.halves('key', j, bits)}, c::DOUBLE AS c FROM {src}").fetchnumpy()
        ngrams.append(NgramTable.build(np.asarray(d["hi"]), np.asarray(d["lo"]), j, bits, False, c=np.asarray(d["c"])))
        h = counts.con.sql(f"SELECT {ngram_count.halves('key', j - 1, bits)}, total FROM (SELECT "
                           f"{ngram_count.context('key', j, bits)} AS key, "
                           f"sum(c)::DOUBLE AS total FROM {src} GROUP BY 1)").fetchnumpy()
        contexts.append(NgramTable.build(np.asarray(h["hi"]), np.asarray(h["lo"]), j - 1, bits, False,
                                         total=np.asarray(h["total"])))
    return AddKModel(order, counts.vocab, ngrams, contexts, k)


# ----------------------------------------------------------------------------------------------
# Jelinek-Mercer weights: maximise held-out log-likelihood


def _ml_matrix(counts_model: AddKModel, sentences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per held-out token and order j: p_ML(w | j-1 words of context), and whether that context was seen."""
    ctx, words = token_batch(counts_model.order, sentences)
    n, order = len(words), counts_model.order
    ml, seen = np.zeros((n, order)), np.zeros((n, order), bool)
    for j in range(1, order + 1):
        rows = np.arange(n) if j == 1 else np.flatnonzero(ctx[:, ctx.shape[1] - (j - 1)] >= 0)
        hist = ctx[rows, ctx.shape[1] - (j - 1):]
        c = counts_model.counts[j - 1].get(np.column_stack([hist, words[rows]]), "c", 0)
        total = counts_model.contexts[j - 1].get(hist, "total", 0)
        seen[rows, j - 1] = total > 0
        ml[rows, j - 1] = np.divide(c, total, out=np.zeros(len(rows)), where=total > 0)
    return ml, seen


def _jm_loglik(lambdas: np.ndarray, ml: np.ndarray, seen: np.ndarray, v: int) -> float:
    p = np.full(len(ml), 1.0 / v)
    for j in range(ml.shape[1]):  # p_j = λ_j p_ML,j + (1 - λ_j) p_{j-1} where the context was seen
        p = np.where(seen[:, j], lambdas[j] * ml[:, j] + (1 - lambdas[j]) * p, p)
    return float(np.log(p).sum())


def fit_lambdas(counts: Counts, order: int, val: Sequence[Sequence[str]], sweeps: int = 3) -> list[float]:
    """Jelinek-Mercer λ_1..λ_order maximising the log-likelihood of ``val`` (coordinate golden-section search)."""
    ml, seen = _ml_matrix(_addk(counts, order, 0.0), [[BOS_ID, *counts.vocab.encode(s), EOS_ID] for s in val])
    v, lam = counts.vocab.n_predictable, np.full(order, 0.5)
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(sweeps):
        for j in range(order):
            lo, hi = 1e-3, 1 - 1e-3

            def f(x: float, j: int = j) -> float:
                trial = lam.copy()
                trial[j] = x
                return _jm_loglik(trial, ml, seen, v)

            for _ in range(40):
                a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
                lo, hi = (lo, b) if f(a) >= f(b) else (a, hi)
            lam[j] = (lo + hi) / 2
    return [float(x) for x in lam]


def fit(data: Iterable[Sequence[str]] | Counts, order: int = 3, smoothing: str = "kn", *, min_count: int = 1,
        k: float = 1.0, alpha: float = 0.4, lambdas: Sequence[float] | None = None,
        val: Sequence[Sequence[str]] | None = None) -> NgramModel:
    """Fit an n-gram model on tokenized sentences (or on :class:`Counts` already made).

    ``k``: add-k's pseudo-count; ``alpha``: stupid back-off's factor; Jelinek-Mercer needs ``lambdas`` or
    held-out sentences ``val`` to fit them on.
    """
    counts = data if isinstance(data, Counts) else count(data, order, min_count)
    try:
        if smoothing == "jm" and lambdas is None:
            if val is None:
                raise ValueError("jm needs lambdas or held-out sentences (val=) to fit them on")
            lambdas = fit_lambdas(counts, order, val)
        return estimate(counts, order, smoothing, k=k, alpha=alpha, lambdas=lambdas)
    finally:
        if counts is not data:  # the in-memory database made here is no longer needed
            counts.con.close()


def addk_to_backoff(model: AddKModel, max_entries: int = 2_000_000) -> BackoffModel:
    """Add-k in back-off form by enumerating every context over the vocabulary (small vocabularies only)."""
    v = len(model.vocab)
    words = np.array([i for i in range(v) if i != BOS_ID])
    if sum(v ** (j - 1) * len(words) for j in range(1, model.order + 1)) > max_entries:
        raise ValueError(f"add-k with {v} types and order {model.order} is too large to enumerate")
    tables = []
    for j in range(1, model.order + 1):
        contexts = np.array(list(itertools.product(range(v), repeat=j - 1)), np.int64).reshape(v ** (j - 1), j - 1)
        ctx = np.repeat(contexts, len(words), axis=0)
        w = np.tile(words, len(contexts))
        padded = np.hstack([np.full((len(w), model.order - j), -1), ctx])
        logp = model.log10_batch(padded, w)
        tables.append(NgramTable.from_ids(np.column_stack([ctx, w]), ngram_count.key_bits(v), logp=logp,
                                          bow=np.zeros(len(w))))
    return BackoffModel(model.order, model.vocab, tables, "addk")


# ----------------------------------------------------------------------------------------------
# saving and loading (safetensors; the vocabulary as a TSV beside it)


def save_model(model: NgramModel, path: Path) -> Path:
    """Write a model's lookup tables (without the n-grams themselves: use ARPA for those)."""
    tables = model.tables if isinstance(model, BackoffModel) else [*model.counts, *model.contexts]
    meta = {"method": model.method, "order": str(model.order), "bits": str(tables[0].bits)}
    tensors: dict[str, np.ndarray] = {}
    if isinstance(model, BackoffModel):
        meta["missing_bow"] = repr(model.missing_bow)
        for j, t in enumerate(model.tables, 1):
            tensors.update({f"{j}.keys": t.keys, f"{j}.logp": t.values["logp"], f"{j}.bow": t.values["bow"]})
    else:
        assert isinstance(model, AddKModel)
        meta["k"] = repr(model.k)
        for j, (c, h) in enumerate(zip(model.counts, model.contexts, strict=True), 1):
            tensors.update({f"{j}.keys": c.keys, f"{j}.c": c.values["c"], f"{j}.ctx_keys": h.keys,
                            f"{j}.total": h.values["total"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_model(path: Path, vocab: Vocabulary) -> NgramModel:
    """A model written by :func:`save_model`, with the vocabulary it was fitted with."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        meta = fh.metadata()
    t = load_file(str(path))
    order, bits = int(meta["order"]), int(meta["bits"])
    if meta["method"] == "addk":
        counts = [NgramTable(t[f"{j}.keys"], {"c": t[f"{j}.c"]}, j, bits) for j in range(1, order + 1)]
        contexts = [NgramTable(t[f"{j}.ctx_keys"], {"total": t[f"{j}.total"]}, j - 1, bits)
                    for j in range(1, order + 1)]
        return AddKModel(order, vocab, counts, contexts, float(meta["k"]))
    tables = [NgramTable(t[f"{j}.keys"], {"logp": t[f"{j}.logp"], "bow": t[f"{j}.bow"]}, j, bits)
              for j in range(1, order + 1)]
    return BackoffModel(order, vocab, tables, meta["method"], float(meta["missing_bow"]))


# ----------------------------------------------------------------------------------------------
# scoring text: perplexity, bits per byte, out-of-vocabulary words charged for their spelling


def fit_spelling(words: Iterable[str], order: int = 3) -> NgramModel:
    """A character model of word spellings (``</s>`` ends a word), Kneser-Ney over the train word types."""
    return fit([list(w) for w in words], order, "kn")


def spelling_log10(spelling: NgramModel, words: Sequence[str]) -> np.ndarray:
    """log10 p(spelling) per word; a character the model never saw costs 8 bits per UTF-8 byte on top."""
    lp = spelling.token_log10([spelling.encode(list(w)) for w in words])
    bounds = np.cumsum([0, *(len(w) + 1 for w in words)])
    per_word = np.add.reduceat(lp, bounds[:-1]) if len(words) else np.zeros(0)
    unseen = [sum(len(ch.encode("utf-8")) for ch in w if ch not in spelling.vocab) for w in words]
    return per_word - 8 * np.log10(2) * np.array(unseen, float)


def score_texts(model: NgramModel, texts: Sequence[str], spelling: NgramModel | None = None,
                lowercase: bool = False, name: str = "") -> TextScore:
    """Perplexity, bits per byte and OOV rate of ``texts`` (one document each) under ``model``."""
    tokens = [wordtok.tokenize(t, lowercase) for t in texts]
    ids = [[BOS_ID, *model.vocab.encode(s), EOS_ID] for s in tokens]
    lp = model.token_log10(ids)
    oov_words = [w for s in tokens for w in s if w not in model.vocab.index]
    nll_unk = -lp.sum() * LOG2_10
    extra = -spelling_log10(spelling, oov_words).sum() * LOG2_10 if spelling is not None and oov_words else 0.0
    return make_score(name or f"ngram {model.method} order {model.order}", texts, len(lp), len(oov_words),
                      float(nll_unk + extra), float(nll_unk), int(np.isneginf(lp).sum()))


# ----------------------------------------------------------------------------------------------
# the pipeline stage


def _split_texts(con: duckdb.DuckDBPyConnection, split: str) -> list[str]:
    return [r[0] for r in con.execute("SELECT text FROM documents WHERE split = ? ORDER BY doc_id", [split]).fetchall()]


def _fit_all(counts: Counts, cfg: NgramConfig, val_tokens: list[list[str]]) -> Iterable[tuple[NgramModel, float]]:
    """Every configured (method, order) model with its fit time in seconds."""
    for method in cfg.methods:
        for order in sorted(cfg.orders):
            t0 = time.perf_counter()
            lambdas = fit_lambdas(counts, order, val_tokens) if method == "jm" else None
            model = estimate(counts, order, method, k=cfg.add_k, alpha=cfg.stupid_alpha, lambdas=lambdas,
                             keep_ngrams=False)
            if lambdas:
                model.notes.update({f"jm_lambda_order{j}": lam for j, lam in enumerate(lambdas, 1)})
            yield model, time.perf_counter() - t0


def _model_row(model: NgramModel, fit_s: float, val: TextScore, test: TextScore) -> dict[str, float | str]:
    return {"method": model.method, "order": model.order, "val_perplexity": val.perplexity,
            "val_perplexity_unk": val.perplexity_unk, "val_bits_per_byte": val.bits_per_byte,
            "val_zero_prob": val.zero_prob, "test_perplexity": test.perplexity,
            "test_perplexity_unk": test.perplexity_unk, "test_bits_per_byte": test.bits_per_byte,
            "test_zero_prob": test.zero_prob, "fit_seconds": fit_s}


def comparison_markdown(rows: list[dict[str, float | str]]) -> str:
    """The comparison table of every fitted model, as Markdown."""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    note = "Stupid back-off is a score, not a probability: its perplexity only ranks."
    return "\n".join(["# N-gram models", "", note, "", *lines, ""])


def _plot(rows: list[dict[str, float | str]], path: Path) -> Path:
    from lmpipe.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["order"], r["val_perplexity"]) for r in rows if r["method"] == method
               and math.isfinite(float(r["val_perplexity"]))]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=str(method))
    ax.set_yscale("log")
    ax.set_xlabel("order")
    ax.set_ylabel("val perplexity (OOV spelled)")
    ax.set_title("Perplexity by order and smoothing")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _samples(model: NgramModel, cfg: NgramConfig) -> str:
    lines = [f"## {model.method} order {model.order}", ""]
    for prompt in cfg.prompts:
        words = model.generate(prompt, cfg.sample_tokens, top_k=50, seed=cfg.seed)
        lines.append(f"- **{prompt}** {' '.join(words)}")
    return "\n".join(lines + [""])


def _best(rows: list[dict[str, float | str]], methods: Sequence[str]) -> dict[str, float | str] | None:
    """The row with the lowest val bits per byte among ``methods`` (ties: lower order)."""
    candidates = [r for r in rows if r["method"] in methods]
    return min(candidates, key=lambda r: (float(r["val_bits_per_byte"]), r["order"])) if candidates else None


def _write_reports(out: Path, rows: list[dict[str, float | str]], samples: list[str], ctx: StageContext) -> dict:
    table_md = out / "ngram_models.md"
    table_md.write_text(comparison_markdown(rows), encoding="utf-8")
    table_csv = out / "ngram_models.csv"
    table_csv.write_text("\n".join([",".join(rows[0]), *(",".join(str(v) for v in r.values()) for r in rows)]) + "\n",
                         encoding="utf-8")
    plot = _plot(rows, out / "ngram_perplexity.png")
    for path in (table_md, table_csv, plot):
        ctx.log.artifact(path)
    ctx.log.text("\n".join(["# Samples", "", *samples]), "ngram_samples.md")
    return {"table": table_md, "table_csv": table_csv, "plot": plot}


def _fingerprint(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def run_stage(ctx: StageContext) -> StageOutput:
    """The ``ngram`` stage: count the train split in the warehouse, fit every order × method, score val/test."""
    cfg: NgramConfig = ctx.section("ngram")
    ws, out = ctx.workspace, ctx.out_dir
    models_dir = out / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"ngram_{out.name[:16]}"  # the output folder is named by the cache key
    top = max(cfg.orders)
    t0 = time.perf_counter()
    with warehouse.connect(ws) as con:
        if cfg.memory_limit:
            con.execute(f"SET memory_limit = '{cfg.memory_limit}'")
        con.execute("SET preserve_insertion_order = false")  # lets DuckDB aggregate and spill more freely
        ngram_count.drop_tables(con, prefix)
        train = "SELECT text FROM documents WHERE split = 'train' ORDER BY doc_id"
        tok = ngram_count.load_texts(con, prefix, train, cfg.lowercase)
        vocab = ngram_count.build_vocabulary(con, prefix, tok, cfg.min_count)
        ngram_count.encode_sentences(con, prefix, tok)
        ngrams = ngram_count.count_ngrams(con, prefix, top, ngram_count.key_bits(len(vocab)))
        counts = Counts(con, prefix, vocab, top, ngrams)
        train_tokens = int(con.sql(f"SELECT coalesce(sum(len(ids) - 1), 0) FROM {prefix}_sents").fetchall()[0][0])
        types = [r[0] for r in con.sql(f"SELECT DISTINCT unnest(toks) FROM {tok} ORDER BY 1").fetchall()]
        con.execute(f"DROP TABLE {prefix}_sents; DROP TABLE {tok}")  # the counts stay, keyed by the prefix
        count_s = time.perf_counter() - t0
        texts = {s: _split_texts(con, s) for s in ("val", "test")}
        spelling = fit_spelling(types)
        val_tokens = [wordtok.tokenize(t, cfg.lowercase) for t in texts["val"]]
        rows, samples, notes = [], [], {}
        for model, fit_s in _fit_all(counts, cfg, val_tokens):
            name = f"{model.method}-{model.order}"
            scores = {s: score_texts(model, texts[s], spelling, cfg.lowercase) for s in ("val", "test")}
            rows.append(_model_row(model, fit_s, scores["val"], scores["test"]))
            notes[name] = model.notes
            ctx.log.metrics({f"{name}.{k}": float(v) for k, v in rows[-1].items()
                             if k not in ("method", "order") and math.isfinite(float(v))}
                            | {f"{name}.{k}": v for k, v in model.notes.items()})
            save_model(model, models_dir / f"{name}.safetensors")
            if model.order == top:
                samples.append(_samples(model, cfg))
            del model
        best_arpa = _best(rows, ("mle", "katz", "jm", "kn"))
        arpa_path = None
        if best_arpa is not None:  # estimated again, streaming to the file: saved tables keep no n-grams
            m, o = str(best_arpa["method"]), int(best_arpa["order"])
            lambdas = [notes[f"{m}-{o}"][f"jm_lambda_order{j}"] for j in range(1, o + 1)] if m == "jm" else None
            arpa_path = out / f"{m}-{o}.arpa"
            estimate_arpa(counts, o, m, arpa_path, lambdas=lambdas)
    vocab.save(models_dir / "vocab.tsv")
    save_model(spelling, models_dir / "spelling.safetensors")
    spelling.vocab.save(models_dir / "spelling_vocab.tsv")
    best = _best(rows, NORMALISED)
    index = {"lowercase": cfg.lowercase, "best": f"{best['method']}-{best['order']}" if best else None,
             "models": rows, "notes": notes}
    (models_dir / "index.json").write_text(json.dumps(index, indent=2, default=str), encoding="utf-8")
    reports = _write_reports(out, rows, samples, ctx)
    metrics = {"train_tokens": float(train_tokens), "tokens_processed": float(train_tokens),
               "vocab_size": float(len(vocab)), "count_seconds": count_s,
               "count_tokens_per_s": train_tokens / count_s if count_s else 0.0,
               **{f"ngrams_order{k}": float(n) for k, n in counts.ngrams.items()}}
    for split in ("val", "test"):
        metrics[f"oov_rate_{split}"] = _oov_rate(vocab, texts[split], cfg.lowercase)
    if best:
        metrics |= {"best_val_perplexity": float(best["val_perplexity"]),
                    "best_val_bits_per_byte": float(best["val_bits_per_byte"]),
                    "best_test_bits_per_byte": float(best["test_bits_per_byte"])}
    ctx.log.metrics(metrics)
    outputs = {"models": ws.rel(models_dir), **{k: ws.rel(v) for k, v in reports.items()}}
    if arpa_path is not None:
        outputs["arpa"] = ws.rel(arpa_path)
        ctx.log.artifact(arpa_path)
    fingerprint = _fingerprint([*models_dir.iterdir(), *([arpa_path] if arpa_path else [])])
    summary = (f"{len(rows)} models on {train_tokens} train tokens; best {index['best']}: "
               f"val ppl {metrics.get('best_val_perplexity', float('nan')):.1f}, "
               f"{metrics.get('best_val_bits_per_byte', float('nan')):.3f} bits/byte")
    return StageOutput(fingerprint, outputs, metrics, summary)


def _oov_rate(vocab: Vocabulary, texts: Sequence[str], lowercase: bool) -> float:
    tokens = [w for t in texts for w in wordtok.tokenize(t, lowercase)]
    return sum(w not in vocab.index for w in tokens) / max(len(tokens), 1)


# ----------------------------------------------------------------------------------------------
# the scorer behind ``lmpipe score --stage ngram``


def load_stage_models(models_dir: Path, method: str | None = None, order: int | None = None
                      ) -> tuple[NgramModel, NgramModel, dict]:
    """(model, spelling model, index) from a stage's model folder; default: the best model on val."""
    index = json.loads((models_dir / "index.json").read_text(encoding="utf-8"))
    rows = [r for r in index["models"] if r["method"] in NORMALISED or r["method"] == method]
    candidates = [r for r in rows
                  if (method is None or r["method"] == method) and (order is None or r["order"] == order)]
    if not candidates:
        raise KeyError(f"no {method or 'normalised'} model of order {order or 'any'}; fitted: "
                       + ", ".join(f"{r['method']}-{r['order']}" for r in index["models"]))
    chosen = min(candidates, key=lambda r: (float(r["val_bits_per_byte"]), r["order"]))  # best on val
    vocab = Vocabulary.load(models_dir / "vocab.tsv")
    model = load_model(models_dir / f"{chosen['method']}-{chosen['order']}.safetensors", vocab)
    spelling = load_model(models_dir / "spelling.safetensors", Vocabulary.load(models_dir / "spelling_vocab.tsv"))
    return model, spelling, index


def score_stage(ws: Workspace, result: StageResult, texts: Sequence[str], options: Mapping[str, Any]) -> TextScore:
    """Scorer registered in :mod:`lmpipe.scoring`: options ``method`` and ``order`` pick the model."""
    model, spelling, index = load_stage_models(ws.abs(result.outputs["models"]), options.get("method"),
                                               options.get("order"))
    return score_texts(model, texts, spelling, index["lowercase"])
