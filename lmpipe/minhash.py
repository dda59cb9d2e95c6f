"""MinHash signatures and LSH banding for near-duplicate text removal.

Pipeline: :func:`signatures` turns texts into MinHash signatures, :func:`lsh_params` picks a banding for a
Jaccard threshold, :func:`band_keys` hashes each band to a 64-bit key (storable in a database column so that
candidates can be found with an equality join), and :func:`near_duplicates` decides, for a batch of new
signatures, which documents to keep.

Signature scheme (it defines what is stored, so changing any step invalidates previously stored signatures):

1. The text is lower-cased and every run of whitespace becomes a single space; leading and trailing whitespace
   is dropped.
2. Shingles are the character ``shingle``-grams of that normalised text, over Unicode code points; a text
   shorter than ``shingle`` is a single shingle.
3. Each shingle is hashed to 64 bits with FNV-1a taken over whole code points (one xor and one multiply per
   code point), then reduced modulo the Mersenne prime ``p = 2**61 - 1``.
4. Hash function ``j`` maps ``x`` to ``((a[j] * x + b[j]) mod p) & 0xFFFFFFFF``, with ``a[j]`` in ``[1, p)`` and
   ``b[j]`` in ``[0, p)`` drawn (all ``a`` first, then all ``b``) from ``np.random.default_rng(seed)``.
   Position ``j`` of the signature is the minimum of that value over the text's shingles. An empty text has no
   shingles and gets ``0xFFFFFFFF`` everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from numba import njit

__all__ = ["band_keys", "estimated_jaccard", "lsh_params", "near_duplicates", "signatures"]

_U64 = np.uint64
# Inside the kernels every constant is a uint64: numba turns uint64 (op) int64 into float64.
_P61 = _U64((1 << 61) - 1)
_MASK32 = _U64(0xFFFFFFFF)
_MASK29 = _U64((1 << 29) - 1)
_SH3 = _U64(3)
_SH27 = _U64(27)
_SH29 = _U64(29)
_SH30 = _U64(30)
_SH31 = _U64(31)
_SH32 = _U64(32)
_SH61 = _U64(61)
_FNV_OFFSET = _U64(0xCBF29CE484222325)
_FNV_PRIME = _U64(0x100000001B3)
_MIX_1 = _U64(0xBF58476D1CE4E5B9)
_MIX_2 = _U64(0x94D049BB133111EB)
_BAND_SEED = _U64(0x9E3779B97F4A7C15)

_EMPTY = np.uint32(0xFFFFFFFF)


@njit(inline="always")
def _mod61(v: np.uint64) -> np.uint64:
    # 2**61 = 1 (mod p): adding the bits above bit 61 back in leaves at most p + 7 < 2p, so one subtraction
    # finishes the reduction; unsigned wrap-around makes it a min instead of a branch.
    v = (v & _P61) + (v >> _SH61)
    return min(v, v - _P61)


@njit(inline="always")
def _affine61(a_hi: np.uint64, a_lo: np.uint64, b: np.uint64, x_hi: np.uint64, x_lo: np.uint64) -> np.uint64:
    """``(a * x + b) mod p`` for ``a, x < p`` given as 32-bit halves, using only 64-bit arithmetic.

    a*x = hi*2**64 + mid*2**32 + lo, and 2**64 = 8 (mod p). ``mid`` (< 2**62) is split at bit 29 so that
    ``mid * 2**32 = (mid >> 29) * 2**61 + (mid & (2**29 - 1)) * 2**32 = (mid >> 29) + ... (mod p)``.
    Every partial product is at most 32x32 bits, so nothing overflows and the loop over shingles vectorises.
    """
    hi = (a_hi * x_hi) << _SH3
    mid = a_hi * x_lo + a_lo * x_hi
    lo = a_lo * x_lo
    # Each term is < 2**61 except the small (mid >> 29) and (lo >> 61), so the sum cannot overflow 64 bits.
    return _mod61(hi + (mid >> _SH29) + ((mid & _MASK29) << _SH32) + (lo & _P61) + (lo >> _SH61) + b)


@njit(cache=True)
def _minhash_kernel(
    codes: np.ndarray,
    offsets: np.ndarray,
    shingle: int,
    a_hi: np.ndarray,
    a_lo: np.ndarray,
    b: np.ndarray,
    out: np.ndarray,
) -> None:
    n_docs = offsets.shape[0] - 1
    num_perm = a_hi.shape[0]
    longest = 0
    for d in range(n_docs):
        longest = max(longest, offsets[d + 1] - offsets[d])
    x_hi = np.empty(longest, np.uint64)
    x_lo = np.empty(longest, np.uint64)
    for d in range(n_docs):
        start = offsets[d]
        length = offsets[d + 1] - start
        if length == 0:
            continue  # `out` is pre-filled with the empty-text signature
        width = min(shingle, length)
        n_shingles = length - width + 1
        for i in range(n_shingles):
            h = _FNV_OFFSET
            for k in range(width):
                h = (h ^ _U64(codes[start + i + k])) * _FNV_PRIME
            x = _mod61(h)
            x_hi[i] = x >> _SH32
            x_lo[i] = x & _MASK32
        # Hash-function-outer, shingle-inner: the inner loop is a plain min-reduction that vectorises.
        for j in range(num_perm):
            ah = a_hi[j]
            al = a_lo[j]
            bj = b[j]
            m = _EMPTY
            for i in range(n_shingles):
                m = min(m, np.uint32(_affine61(ah, al, bj, x_hi[i], x_lo[i]) & _MASK32))
            out[d, j] = m


def _hash_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = (1 << 61) - 1
    a = rng.integers(1, p, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, p, size=num_perm, dtype=np.uint64)
    return a, b


def signatures(texts: Sequence[str], num_perm: int = 128, shingle: int = 5, seed: int = 0) -> np.ndarray:
    """MinHash signatures of ``texts``, shape ``(len(texts), num_perm)``, dtype uint32.

    See the module docstring for the exact scheme. Deterministic for a given ``seed``; signatures are only
    comparable when computed with the same ``num_perm``, ``shingle`` and ``seed``.
    """
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    if shingle < 1:
        raise ValueError(f"shingle must be >= 1, got {shingle}")
    normalised = [" ".join(text.lower().split()) for text in texts]
    offsets = np.zeros(len(normalised) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in normalised], out=offsets[1:])
    # UTF-32 gives exactly one unit per code point, so str lengths are valid offsets into the buffer;
    # surrogatepass keeps lone surrogates (possible in decoded-with-errors input) from raising.
    codes = np.frombuffer("".join(normalised).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    a, b = _hash_params(num_perm, seed)
    out = np.full((len(normalised), num_perm), _EMPTY, dtype=np.uint32)
    _minhash_kernel(codes, offsets, shingle, a >> _SH32, a & _MASK32, b, out)
    return out


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures: the fraction of positions where they are equal."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"expected two non-empty signatures of equal length, got shapes {a.shape} and {b.shape}")
    return np.count_nonzero(a == b) / a.size


@lru_cache(maxsize=256)
def lsh_params(num_perm: int, threshold: float) -> tuple[int, int]:
    """Banding ``(bands, rows)`` with ``bands * rows <= num_perm`` suited to a Jaccard ``threshold`` in (0, 1].

    Two documents with Jaccard similarity ``s`` agree on one signature position with probability ``s``, so on
    a whole band of ``r`` rows with probability ``s**r``, and share at least one of ``b`` band keys (become a
    candidate pair) with probability ``P(s) = 1 - (1 - s**r)**b``. With ``t`` the threshold, the false-positive
    mass is ``FP = integral_0^t P(s) ds`` and the false-negative mass is ``FN = integral_t^1 (1 - P(s)) ds``.
    Every ``(b, r)`` with ``b * r <= num_perm`` is tried and the one minimising ``FP + FN`` (equal weights,
    trapezoid rule on 1001 points per interval) is returned; on ties the fewest bands, then fewest rows, wins.
    """
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    below = np.linspace(0.0, threshold, 1001)
    above = np.linspace(threshold, 1.0, 1001)
    best = (np.inf, 1, 1)
    for bands in range(1, num_perm + 1):
        rows = np.arange(1, num_perm // bands + 1)[:, None]
        fp = np.trapezoid(1.0 - (1.0 - below**rows) ** bands, below, axis=1)
        fn = np.trapezoid((1.0 - above**rows) ** bands, above, axis=1)
        err = fp + fn
        i = int(np.argmin(err))
        if err[i] < best[0]:
            best = (float(err[i]), bands, i + 1)
    return best[1], best[2]


@njit(inline="always")
def _mix64(z: np.uint64) -> np.uint64:
    # splitmix64 finaliser: a bijection on 64 bits with good avalanche.
    z = (z ^ (z >> _SH30)) * _MIX_1
    z = (z ^ (z >> _SH27)) * _MIX_2
    return z ^ (z >> _SH31)


@njit(cache=True)
def _band_keys_kernel(sigs: np.ndarray, bands: int, rows: int, out: np.ndarray) -> None:
    for i in range(sigs.shape[0]):
        for band in range(bands):
            h = _mix64(_BAND_SEED + _U64(band))
            for r in range(band * rows, (band + 1) * rows):
                h = _mix64(h ^ _U64(sigs[i, r]))
            out[i, band] = h


def _as_signatures(sigs: np.ndarray, name: str) -> np.ndarray:
    sigs = np.asarray(sigs)
    if sigs.ndim != 2 or sigs.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D array of signatures, got shape {sigs.shape}")
    if sigs.dtype != np.uint32:
        raise TypeError(f"{name} must have dtype uint32, got {sigs.dtype}")
    return np.ascontiguousarray(sigs)


def _check_banding(num_perm: int, bands: int, rows: int) -> None:
    if bands < 1 or rows < 1 or bands * rows > num_perm:
        raise ValueError(f"need bands, rows >= 1 and bands * rows <= {num_perm}, got {bands} x {rows}")


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """64-bit key per band, shape ``(n, bands)``, dtype uint64.

    Band ``k`` covers signature positions ``k * rows`` to ``(k + 1) * rows - 1``. The band index is mixed into
    the key, so equal contents in different bands give different keys and keys can be joined on directly.
    """
    sigs = _as_signatures(sigs, "sigs")
    _check_banding(sigs.shape[1], bands, rows)
    out = np.empty((sigs.shape[0], bands), dtype=np.uint64)
    _band_keys_kernel(sigs, bands, rows, out)
    return out


@njit(cache=True)
def _dedup_kernel(
    existing: np.ndarray,
    sigs: np.ndarray,
    bucket: np.ndarray,
    bucket_start: np.ndarray,
    threshold: float,
    out: np.ndarray,
) -> None:
    n_existing = existing.shape[0]
    total = n_existing + sigs.shape[0]
    num_perm = sigs.shape[1]
    n_bands = bucket.shape[1]
    # Buckets only ever list kept documents, in increasing index order, so a scan can stop at the first match.
    members = np.empty(bucket_start[-1], np.int64)
    fill = np.zeros(bucket_start.shape[0] - 1, np.int64)
    # Stamp of the last document each candidate was compared with: pairs sharing several bands compare once.
    seen = np.full(total, -1, np.int64)
    for i in range(total):
        if i >= n_existing:
            doc = sigs[i - n_existing]
            best = total
            for band in range(n_bands):
                g = bucket[i, band]
                if g < 0:
                    continue
                for slot in range(bucket_start[g], bucket_start[g] + fill[g]):
                    c = members[slot]
                    if c >= best:
                        break
                    if seen[c] == i:
                        continue
                    seen[c] = i
                    other = existing[c] if c < n_existing else sigs[c - n_existing]
                    equal = 0
                    for j in range(num_perm):
                        equal += doc[j] == other[j]
                    if equal / num_perm >= threshold:
                        best = c
                        break
            if best < total:
                out[i - n_existing] = best
                continue
        for band in range(n_bands):
            g = bucket[i, band]
            if g >= 0:
                members[bucket_start[g] + fill[g]] = i
                fill[g] += 1


def near_duplicates(
    sigs: np.ndarray,
    threshold: float,
    bands: int,
    rows: int,
    existing: np.ndarray | None = None,
) -> np.ndarray:
    """Near-duplicate decision for each row of ``sigs``: -1 to keep it, else the index of a document it duplicates.

    Documents are indexed with ``existing`` first: index ``e < len(existing)`` is ``existing[e]`` and index
    ``len(existing) + i`` is ``sigs[i]``. Existing documents are all taken as kept. Batch documents are decided
    in order; each is compared with the existing documents and the batch documents already kept that share at
    least one band key with it (equal :func:`band_keys`), and is a duplicate if the :func:`estimated_jaccard` of
    such a pair is ``>= threshold``. The lowest such index is reported, so a match in ``existing`` wins, and the
    reported document is always a kept one (dropped documents are never compared against). Hence the first
    occurrence of a group of duplicates is kept. All empty texts have equal signatures and so duplicate the first.

    Work is a sort per band plus the comparisons within shared buckets, not a pass over all pairs.
    """
    sigs = _as_signatures(sigs, "sigs")
    num_perm = sigs.shape[1]
    if existing is None or np.shape(existing)[0] == 0:
        # An empty `existing` matches nothing, whatever its width.
        existing = np.empty((0, num_perm), dtype=np.uint32)
    existing = _as_signatures(existing, "existing")
    if existing.shape[1] != num_perm:
        raise ValueError(f"existing has {existing.shape[1]} positions per signature, sigs has {num_perm}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    _check_banding(num_perm, bands, rows)
    out = np.full(sigs.shape[0], -1, dtype=np.int64)
    if sigs.shape[0] == 0:
        return out

    keys = np.concatenate([band_keys(existing, bands, rows), band_keys(sigs, bands, rows)])
    # Number the buckets shared by two or more documents densely across all bands; -1 marks a key no other
    # document has, which cannot produce a candidate and needs no storage.
    bucket = np.empty(keys.shape, dtype=np.int64)
    capacities = []
    n_buckets = 0
    for band in range(bands):
        _, inverse, counts = np.unique(keys[:, band], return_inverse=True, return_counts=True)
        shared = counts > 1
        ids = np.where(shared, np.cumsum(shared) - 1 + n_buckets, -1)
        bucket[:, band] = ids[inverse]
        capacities.append(counts[shared])
        n_buckets += int(shared.sum())
    bucket_start = np.zeros(n_buckets + 1, dtype=np.int64)
    np.cumsum(np.concatenate(capacities), out=bucket_start[1:])
    _dedup_kernel(existing, sigs, bucket, bucket_start, float(threshold), out)
    return out
