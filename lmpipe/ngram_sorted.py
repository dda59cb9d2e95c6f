"""Interpolated modified Kneser-Ney from sorted count arrays, order by order, without joins.

The SQL estimator (:mod:`lmpipe.ngram`) pairs every k-gram with its context's sums and with its suffix's
probability through hash aggregates and hash joins, one per order and step. This one follows the design
of KenLM's ``lmplz`` instead: it reads each order's counts once, sorts them by their packed key (a radix
sort; the first word is the highest digit, so the k-grams of one context are adjacent and the contexts
come in the order of the order below), and then needs only sequential passes and short searches:

- the *parent* of a k-gram (the index of its context w1..wk-1 among the (k-1)-grams) by merging two
  sorted arrays; the parents are non-decreasing, so each context's continuations form one run of rows;
- the *suffix* of a k-gram (the index of w2..wk among the (k-1)-grams) through the trie the parents
  make: the suffix's context is the parent's suffix, so it is a binary search among that context's
  children, which are adjacent and sorted by their last word;
- Σa, n1, n2, n3+ and γ(h) in one pass over each context's run, and with them
  p(w|h) = (a(hw) - D(a(hw))) / Σa(h·) + γ(h) p(w|h').

The arithmetic is the SQL estimator's, operation for operation, so both give the same numbers. What it
holds at a time: two adjacent orders' keys, probabilities and suffix indices (about 40 bytes per n-gram
of the larger), and the radix sort's scratch copy while one order is sorted; :func:`memory_needed`
says how much, and the caller keeps the SQL estimator, which spills, for counts larger than its budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from numba import njit, prange

from lmpipe import ngram_count
from lmpipe.wordtok import BOS_ID

if TYPE_CHECKING:
    from lmpipe.ngram import Counts

_DIGIT = 11  # radix sort digit width: 2,048 buckets, whose counters stay in the L1 cache
_U64 = np.uint64


def memory_needed(ngrams: dict[int, int], order: int) -> int:
    """Bytes :func:`kn_sections` holds at its peak for these n-gram counts (per order) up to ``order``."""
    peak = 0
    for k in range(2, order + 1):
        n, below, below2 = ngrams[k], ngrams[k - 1], ngrams.get(k - 2, 0)
        # while order k is sorted: its keys and their scratch copy, order k - 1's keys, p and suffixes,
        # and order k - 2's child offsets; then order k's counts, parents, suffixes and p with order k - 1's
        # γ; then order k - 1's section (keys, log10 p and γ) with order k's child offsets
        peak = max(peak, 32 * n + 28 * below + 8 * below2, 40 * n + 32 * below, 28 * n + 40 * below)
    return peak


@njit(inline="always")
def _digit(hi: np.uint64, lo: np.uint64, shift: int) -> int:
    """The ``_DIGIT``-bit digit of the 128-bit number (hi, lo) starting at bit ``shift``."""
    if shift >= 64:
        v = hi >> _U64(shift - 64)
    elif shift + _DIGIT > 64 and shift > 0:
        v = (lo >> _U64(shift)) | (hi << _U64(64 - shift))
    else:
        v = lo >> _U64(shift)
    return np.int64(v & _U64((1 << _DIGIT) - 1))


_CHUNKS = 16  # row chunks of the parallel passes


@njit(cache=True, parallel=True, nogil=True)
def _radix_sort(hi: np.ndarray, lo: np.ndarray, key_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (hi, lo) sorted by the low ``key_bits`` bits of the 128-bit number (hi, lo); bits above ride along.

    Least significant digit first, each pass stable: per-chunk histograms, then every chunk scatters its
    rows to its own offsets, in parallel. Digits that are the same in every row are skipped. The result
    may be the input arrays or their scratch copies."""
    n = len(lo)
    hi2, lo2 = np.empty_like(hi), np.empty_like(lo)
    buckets = 1 << _DIGIT
    bounds = np.linspace(0, n, _CHUNKS + 1).astype(np.int64)
    count = np.empty((_CHUNKS, buckets), np.int64)
    for shift in range(0, key_bits, _DIGIT):
        width = min(_DIGIT, key_bits - shift)
        keep = (1 << width) - 1  # bits of this digit that belong to the key
        for c in prange(_CHUNKS):
            count[c, :] = 0
            for i in range(bounds[c], bounds[c + 1]):
                count[c, _digit(hi[i], lo[i], shift) & keep] += 1
        if n == 0 or count.sum(axis=0).max() == n:
            continue
        total = 0
        for b in range(buckets):
            for c in range(_CHUNKS):
                here = count[c, b]
                count[c, b] = total
                total += here
        for c in prange(_CHUNKS):
            for i in range(bounds[c], bounds[c + 1]):
                d = _digit(hi[i], lo[i], shift) & keep
                j = count[c, d]
                count[c, d] = j + 1
                hi2[j], lo2[j] = hi[i], lo[i]
        hi, hi2 = hi2, hi
        lo, lo2 = lo2, lo
    return hi, lo


def argsort_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted copy, permutation) of 64-bit keys by the parallel radix sort: several times numpy's argsort."""
    perm, out = _radix_sort(np.arange(len(keys), dtype=_U64), np.array(keys, _U64), 64)
    return out, perm.view(np.int64)


@njit(cache=True, nogil=True)
def _parents(hi: np.ndarray, lo: np.ndarray, bits: int, up_hi: np.ndarray, up_lo: np.ndarray) -> np.ndarray:
    """Index of each sorted k-gram's context (its key shifted down one word) among the sorted (k-1)-grams."""
    n, m = len(lo), len(up_lo)
    out = np.empty(n, np.int32)
    j = 0
    for i in range(n):
        ch = hi[i] >> _U64(bits)
        cl = (lo[i] >> _U64(bits)) | (hi[i] << _U64(64 - bits))
        while j < m and (up_hi[j] < ch or (up_hi[j] == ch and up_lo[j] < cl)):
            j += 1
        if j == m or up_hi[j] != ch or up_lo[j] != cl:
            raise ValueError("an n-gram's context is missing from the order below: the counts are inconsistent")
        out[i] = j
    return out


@njit(cache=True, nogil=True)
def _run_chunks(parent: np.ndarray) -> np.ndarray:
    """``_CHUNKS`` + 1 row bounds for the parallel passes, each moved to where a context's run begins."""
    n = len(parent)
    bounds = np.linspace(0, n, _CHUNKS + 1).astype(np.int64)
    for c in range(1, _CHUNKS):
        b = max(bounds[c], bounds[c - 1])
        while 0 < b < n and parent[b] == parent[b - 1]:
            b += 1
        bounds[c] = b
    return bounds


@njit(cache=True, parallel=True, nogil=True)
def _suffixes(parent: np.ndarray, lo: np.ndarray, bits: int, up_suffix: np.ndarray, up_children: np.ndarray,
              up_lo: np.ndarray) -> np.ndarray:
    """Index of each k-gram's suffix w2..wk among the (k-1)-grams (-1 if missing), for k >= 3.

    ``up_suffix[j]``: the suffix of (k-1)-gram j among the (k-2)-grams; ``up_children[x]..up_children[x+1]``:
    the (k-1)-grams whose context is (k-2)-gram x, sorted by last word (``up_lo``'s low digit). (Galloping
    on from the previous row's find, since a context's k-grams come in increasing last word, was measured
    no faster: the time goes to the cache misses of the first lookups.)"""
    mask = _U64((1 << bits) - 1)
    out = np.empty(len(lo), np.int32)
    for i in prange(len(lo)):
        w = lo[i] & mask
        x = up_suffix[parent[i]]
        left, right = up_children[x], up_children[x + 1]
        while left < right:
            mid = (left + right) >> 1
            if (up_lo[mid] & mask) < w:
                left = mid + 1
            else:
                right = mid
        found = left < up_children[x + 1] and (up_lo[left] & mask) == w
        out[i] = left if found else -1  # raising here would keep the loop from running in parallel
    return out


@njit(cache=True, parallel=True, nogil=True)
def _kn_order(parent: np.ndarray, x: np.ndarray, suffix: np.ndarray, p_lower: np.ndarray, d1: float, d2: float,
              d3: float, gamma: np.ndarray) -> np.ndarray:
    """p(w|h) of each sorted k-gram; writes γ(h) of each context into ``gamma`` (indexed like the order below).

    Chunks of rows, cut where a context's run begins, are done in parallel."""
    n = len(parent)
    p = np.empty(n, np.float64)
    bounds = _run_chunks(parent)
    for c in prange(_CHUNKS):
        i = bounds[c]
        while i < bounds[c + 1]:
            h = parent[i]
            j = i
            total, n1, n2, n3 = 0, 0, 0, 0
            while j < n and parent[j] == h:
                v = x[j]
                total += v
                if v == 1:
                    n1 += 1
                elif v == 2:
                    n2 += 1
                elif v >= 3:
                    n3 += 1
                j += 1
            t = float(total)
            g = (d1 * n1 + d2 * n2 + d3 * n3) / t
            gamma[h] = g
            for r in range(i, j):
                v = x[r]
                d = d1 if v == 1 else (d2 if v == 2 else d3)
                p[r] = (v - d) / t + g * p_lower[suffix[r]]
            i = j
    return p


@njit(cache=True, nogil=True)
def _children(parent: np.ndarray, m: int) -> np.ndarray:
    """Offsets (m + 1) of each (k-1)-gram's run of children among the k-grams, from their sorted parents."""
    out = np.empty(m + 1, np.int64)
    j = 0
    for x in range(m + 1):
        while j < len(parent) and parent[j] < x:
            j += 1
        out[x] = j
    return out


@njit(cache=True, nogil=True)
def _count_of_counts_kernel(x: np.ndarray, top: int) -> np.ndarray:
    n = np.zeros(top + 1, np.int64)
    for v in x:
        if 1 <= v <= top:
            n[v] += 1
    return n


def _count_of_counts(x: np.ndarray, top: int = 4) -> list[int]:
    """n_1..n_top: how many entries of ``x`` equal 1, 2, ..., top (no temporary arrays of x's size)."""
    return [int(v) for v in _count_of_counts_kernel(x, top)[1:]]


@njit(cache=True, parallel=True, nogil=True)
def _log10(v: np.ndarray) -> np.ndarray:
    """float32 log10 of a float64 array, rounded once from the float64 logarithm (log10 0 = -inf)."""
    out = np.empty(len(v), np.float32)
    for i in prange(len(v)):
        out[i] = np.float32(np.log10(v[i])) if v[i] > 0 else -np.inf
    return out


def _payload_shift(key_bits: int) -> int:
    """Where a row's count goes in the high half of its 128-bit key: right above the key's own bits."""
    return max(key_bits - 64, 0)


def fits(counts: Counts, order: int) -> bool:
    """Whether every count of ``counts`` fits the bits its order's keys leave free (:func:`kn_sections`
    carries each count in them through the sort): no count exceeds the largest unigram count."""
    top = counts.con.sql(f"SELECT coalesce(max(c), 0) FROM {counts.prefix}_c1").fetchall()[0][0]
    return int(top) < 1 << (64 - _payload_shift(order * counts.bits))


def _fetch(con, table: str, column: str, k: int, bits: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n rows of a count table as 128-bit keys (hi, lo), each row's count in the bits above its key."""
    hi, lo = np.empty(n, _U64), np.empty(n, _U64)
    shift = _U64(_payload_shift(k * bits))
    pos = 0
    for batch in con.sql(f"SELECT {ngram_count.halves('key', k, bits)}, {column} AS x FROM {table}"
                         ).to_arrow_reader(1 << 20):
        m = batch.num_rows
        if pos + m > n:
            raise ValueError(f"{table} has more rows than the {n} counted")
        x = batch.column("x").to_numpy().astype(_U64)
        np.bitwise_or(batch.column("hi").to_numpy(), x << shift, out=hi[pos:pos + m])
        lo[pos:pos + m] = batch.column("lo").to_numpy()
        pos += m
    if pos != n:
        raise ValueError(f"{table} has {pos} rows, {n} were counted")
    return hi, lo


def _unpack_counts(hi: np.ndarray, key_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts, key high halves) from the sorted high halves that carry both; reuses ``hi``."""
    shift = _payload_shift(key_bits)
    x = (hi >> _U64(shift)).view(np.int64)  # counts are far below 2**63: the same bits, no second copy
    hi &= _U64((1 << shift) - 1)
    return x, hi


def kn_sections(counts: Counts, order: int, notes: dict[str, float]
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
    """The interpolated modified Kneser-Ney model of ``order`` from ``counts`` (:class:`lmpipe.ngram.Counts`),
    one order at a time: yields ``(k, hi, lo, log10 p, log10 bow)`` for k = 1..order (no back-off weights at
    the top order), order k as soon as order k + 1 has given its contexts' γ. The unigrams are every type
    of the vocabulary in id order, the higher orders sorted by key. Discounts go into ``notes``."""
    from lmpipe.ngram import kn_discounts  # the one definition of the discounts (ngram imports this module)

    con, src, bits, vocab = counts.con, counts.prefix, counts.bits, counts.vocab

    def column(k: int) -> str:
        return "a" if k < order else "c"

    def discounts(k: int, x: np.ndarray) -> tuple[float, float, float]:
        d, fell_back = kn_discounts(_count_of_counts(x))
        notes.update({f"kn_d1_order{k}": d[0], f"kn_d2_order{k}": d[1], f"kn_d3_order{k}": d[2],
                      f"kn_fallback_order{k}": float(fell_back)})
        return d

    # order 1: dense over the vocabulary (unseen <unk> has x = 0, <s> is never predicted)
    v = len(vocab)
    rows = con.sql(f"SELECT key - 1 AS id, {column(1)} AS x FROM {src}_c1").fetchnumpy()
    x1 = np.zeros(v, np.int64)
    x1[np.asarray(rows["id"], np.int64)] = np.asarray(rows["x"], np.int64)
    d1, d2, d3 = discounts(1, x1)
    total = float(x1.sum())
    gamma = (d1 * int((x1 == 1).sum()) + d2 * int((x1 == 2).sum()) + d3 * int((x1 >= 3).sum())) / total
    disc = np.select([x1 == 0, x1 == 1, x1 == 2], [0.0, d1, d2], d3)
    p = np.maximum(x1 - disc, 0) / total + gamma / vocab.n_predictable
    p[BOS_ID] = 0.0
    key_hi, key_lo = np.zeros(v, _U64), np.arange(1, v + 1, dtype=_U64)
    suffix = np.arange(v, dtype=np.int32)  # the unigrams' "suffix" links to itself: index = word id
    children = None
    mask = _U64((1 << bits) - 1)
    for k in range(2, order + 1):
        hi, lo = _radix_sort(*_fetch(con, f"{src}_c{k}", column(k), k, bits, counts.ngrams[k]), k * bits)
        x, hi = _unpack_counts(hi, k * bits)
        if k == 2:
            parent = ((lo >> _U64(bits)).astype(np.int64) - 1).astype(np.int32)
            suffix_k = ((lo & mask).astype(np.int64) - 1).astype(np.int32)
        else:
            parent = _parents(hi, lo, bits, key_hi, key_lo)
            suffix_k = _suffixes(parent, lo, bits, suffix, children, key_lo)
            if len(suffix_k) and suffix_k.min() < 0:
                raise ValueError(f"a {k}-gram's suffix is missing from the {k - 1}-grams: the counts are inconsistent")
        suffix = children = None  # order k - 1's links are used up; free them before the next arrays
        d1, d2, d3 = discounts(k, x)
        gamma = np.ones(len(key_lo), np.float64)  # contexts without continuations keep bow 1 (log10 0)
        p_k = _kn_order(parent, x, suffix_k, p, d1, d2, d3, gamma)
        del x
        logp = _log10(p)
        del p
        children = _children(parent, len(key_lo))
        del parent
        yield k - 1, key_hi, key_lo, logp, _log10(gamma)
        del gamma, logp
        key_hi, key_lo, p, suffix = hi, lo, p_k, suffix_k
        del hi, lo, p_k, suffix_k
    yield order, key_hi, key_lo, _log10(p), None
