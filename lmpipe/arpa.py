"""ARPA files, the back-off language-model format that KenLM, SRILM and most toolkits read and write.

Layout: a ``\\data\\`` header with ``ngram k=count`` lines, then one ``\\k-grams:`` section per order whose
lines are ``log10 p<TAB>w1 ... wk[<TAB>log10 bow]`` (no back-off weight at the highest order), then
``\\end\\``. Probability 0 is written as -99, the convention for log10(0); reading maps -99 back to 0.

Values are float32, as in KenLM, each written with the fewest significant digits (6 to 9) that read back
to the same float32. The body is formatted by a compiled kernel from batches of packed n-grams (word
ids, see :func:`lmpipe.ngram.pack`) and values, so a model with tens of millions of n-grams streams from
DuckDB to disk in bounded memory: an I/O thread writes one batch's text while the next batch is formatted
into a second buffer. The file appears complete or not at all (temporary file, then rename).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from numba import njit, prange

from lmpipe.ngram_count import key_bits
from lmpipe.wordtok import SPECIALS, Vocabulary

if TYPE_CHECKING:
    from lmpipe.ngram import BackoffModel

LOG_ZERO = -99.0
_SEGMENTS = 16  # row segments per batch, formatted in parallel
_F10 = np.array([10.0 ** i for i in range(23)])  # exact powers of ten in float64
_I10 = np.array([10 ** i for i in range(19)], np.int64)
_MAX_NUMBER = 40  # longer than any number the kernel writes (sign, 9 digits, point, up to 18 zeros)


@njit(inline="always")
def _put_uint(out: np.ndarray, pos: int, value: int, width: int) -> int:
    """Write ``value`` in decimal, left-padded with zeros to ``width`` digits; returns the new position."""
    n = 1
    v = value // 10
    while v > 0:
        n += 1
        v //= 10
    n = max(n, width)
    for j in range(n - 1, -1, -1):
        out[pos + j] = 48 + value % 10
        value //= 10
    return pos + n


@njit(inline="always")
def _put_number(out: np.ndarray, pos: int, v: float) -> int:
    """Write float32 ``v`` with the fewest significant digits (6..9) that read back to it; -99 for log10(0)."""
    if not v > LOG_ZERO:  # -inf, NaN, and anything at or below the log-zero convention
        out[pos], out[pos + 1], out[pos + 2] = 45, 57, 57
        return pos + 3
    target = np.float32(v)
    a = abs(float(v))
    if a < 1e-14:
        out[pos] = 48
        return pos + 1
    if a >= 1.0:  # the decimal exponent by comparisons (cheaper than a logarithm)
        e10 = 0
        while e10 < 22 and a >= _F10[e10 + 1]:
            e10 += 1
    else:
        e10 = -1
        while e10 > -14 and a * _F10[-e10] < 1.0:
            e10 -= 1
    m, s = 0, 0
    for p in range(6, 10):
        s = min(p - 1 - e10, 18)
        m = int(np.rint(a * _F10[s])) if s >= 0 else int(np.rint(a / _F10[-s]))
        back = m / _F10[s] if s >= 0 else m * _F10[-s]
        if np.float32(back if v > 0 else -back) == target:
            break
    if v < 0:
        out[pos] = 45
        pos += 1
    if s <= 0:  # an integer (|v| >= 1e5)
        return _put_uint(out, pos, m * _I10[-s], 1)
    # m / 10^s with s > 0: the digits of m written from the last, a point s digits from the end
    n = 1
    while n < 18 and m >= _I10[n]:
        n += 1
    if n > s:
        point = pos + n - s
        end = pos + n + 1
    else:  # 0.000ddd
        out[pos] = 48
        point = pos + 1
        for j in range(pos + 2, pos + 2 + s - n):
            out[j] = 48
        end = pos + 2 + s
    out[point] = 46
    j = end - 1
    while j > point:
        out[j] = 48 + m % 10
        m //= 10
        j -= 1
    j = point - 1
    while j >= pos and (m > 0 or j == point - 1):
        out[j] = 48 + m % 10
        m //= 10
        j -= 1
    while out[end - 1] == 48:  # drop the fraction's trailing zeros, and the point if nothing is left
        end -= 1
    if end - 1 == point:
        end -= 1
    return end


@njit(inline="always")
def _word_id(hi: np.ndarray, lo: np.ndarray, i: int, j: int, k: int, bits: int) -> int:
    """Word j (0-based) of the packed k-gram in row i (ids stored as id + 1, first word highest)."""
    shift = bits * (k - 1 - j)
    if shift >= 64:
        digit = hi[i] >> np.uint64(shift - 64)
    elif shift > 0 and shift + bits > 64:
        digit = (lo[i] >> np.uint64(shift)) | (hi[i] << np.uint64(64 - shift))
    else:
        digit = lo[i] >> np.uint64(shift)
    return np.int64(digit & np.uint64((1 << bits) - 1)) - 1


@njit(cache=True, parallel=True, nogil=True)
def _segment_bounds(hi: np.ndarray, lo: np.ndarray, k: int, bits: int, offsets: np.ndarray,
                    rows: np.ndarray) -> np.ndarray:
    """Byte offsets where each row segment ``rows[s]..rows[s+1]`` may start writing (an upper bound of its lines)."""
    need = np.zeros(len(rows), np.int64)
    for s in prange(len(rows) - 1):
        n = (2 * _MAX_NUMBER + k + 2) * (rows[s + 1] - rows[s])
        for i in range(rows[s], rows[s + 1]):
            for j in range(k):
                w = _word_id(hi, lo, i, j, k, bits)
                n += offsets[w + 1] - offsets[w]
        need[s + 1] = n
    return np.cumsum(need)


@njit(cache=True, parallel=True, nogil=True)
def _format_segments(hi: np.ndarray, lo: np.ndarray, k: int, bits: int, logp: np.ndarray, bow: np.ndarray,
                     has_bow: bool, text: np.ndarray, offsets: np.ndarray, rows: np.ndarray,
                     starts: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Format each row segment as ARPA lines from its byte start on, in parallel; returns the bytes per segment."""
    used = np.zeros(len(rows) - 1, np.int64)
    for s in prange(len(rows) - 1):
        pos = starts[s]
        for i in range(rows[s], rows[s + 1]):
            pos = _put_number(out, pos, logp[i])
            out[pos] = 9
            pos += 1
            for j in range(k):
                if j:
                    out[pos] = 32
                    pos += 1
                w = _word_id(hi, lo, i, j, k, bits)
                start, stop = offsets[w], offsets[w + 1]
                for b in range(start, stop):
                    out[pos + b - start] = text[b]
                pos += stop - start
            if has_bow:
                out[pos] = 9
                pos = _put_number(out, pos + 1, bow[i])
            out[pos] = 10
            pos += 1
        used[s] = pos - starts[s]
    return used


class ArpaWriter:
    """Writes an ARPA file section by section from packed n-grams; use as a context manager.

    ``counts[k-1]`` is the number of k-grams that :meth:`write` will be given for order k (the header
    comes first). On an exception the partial file is removed and ``path`` is left as it was.
    """

    def __init__(self, path: Path, words: Sequence[str], counts: Sequence[int]) -> None:
        self.path = Path(path)
        self.counts = list(counts)
        encoded = [w.encode("utf-8") for w in words]
        self.text = np.frombuffer(b"".join(encoded), np.uint8) if encoded else np.zeros(0, np.uint8)
        self.offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.bits = key_bits(len(words))
        # two text buffers: one is formatted while the other is being written out by the I/O thread
        self._buffers = [np.empty(0, np.uint8), np.empty(0, np.uint8)]
        self._in_flight: list[Future | None] = [None, None]
        self._turn = 0
        self._writes: deque[Future] = deque()
        self._io: ThreadPoolExecutor | None = None
        self.order = 0
        self.written = 0
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._fh: BinaryIO | None = None

    def __enter__(self) -> ArpaWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self._tmp, "wb")
        self._io = ThreadPoolExecutor(1, thread_name_prefix="arpa-write")
        header = "\\data\\\n" + "".join(f"ngram {k}={n}\n" for k, n in enumerate(self.counts, 1))
        try:
            self._emit(header.encode())
        except BaseException as exc:  # __exit__ is not called when __enter__ fails: clean up here
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _emit(self, *chunks: bytes | memoryview) -> Future:
        """Queue ``chunks`` for the I/O thread (writes keep their order); re-raise a write that failed."""
        future = self._io.submit(_write_all, self._fh, chunks)
        self._writes.append(future)
        while self._writes and self._writes[0].done():
            self._writes.popleft().result()
        return future

    def section(self, k: int) -> None:
        """Start the section of order ``k`` (orders in sequence, each after the previous is complete)."""
        self._check_complete()
        if k != self.order + 1:
            raise ValueError(f"ARPA sections go in order: expected {self.order + 1}, got {k}")
        self.order, self.written = k, 0
        self._emit(f"\n\\{k}-grams:\n".encode())

    def write(self, hi: np.ndarray, lo: np.ndarray, logp: np.ndarray, bow: np.ndarray | None = None) -> None:
        """Append n-grams of the current order: packed halves, log10 p and (below the top order) log10 bow."""
        # writable C arrays of fixed dtypes: one compiled signature whatever the source (Arrow buffers are read-only)
        hi, lo = np.require(hi, np.uint64, "CW"), np.require(lo, np.uint64, "CW")
        logp = np.require(logp, np.float32, "CW")
        has_bow = self.order < len(self.counts)
        bow = np.require(bow if bow is not None and has_bow else np.zeros(len(lo)), np.float32, "CW")
        rows = np.linspace(0, len(lo), _SEGMENTS + 1).astype(np.int64)
        starts = _segment_bounds(hi, lo, self.order, self.bits, self.offsets, rows)
        turn, self._turn = self._turn, 1 - self._turn
        if self._in_flight[turn] is not None:  # the buffer is free once its previous text is written
            self._in_flight[turn].result()
        if len(self._buffers[turn]) < starts[-1]:  # grown with headroom, then reused by the following batches
            self._buffers[turn] = np.empty(int(starts[-1] * 1.25), np.uint8)
        buffer = self._buffers[turn]
        used = _format_segments(hi, lo, self.order, self.bits, logp, bow, has_bow, self.text, self.offsets,
                                rows, starts, buffer)
        view = memoryview(buffer)
        self._in_flight[turn] = self._emit(*(view[start:start + n] for start, n in zip(starts[:-1], used,
                                                                                        strict=True)))
        self.written += len(lo)

    def write_batches(self, k: int, batches: Iterable) -> None:
        """A whole section from Arrow record batches with columns hi, lo, logp and (below the top order) bow.

        The next batch is fetched on another thread while this one is formatted.
        """
        self.section(k)
        batches = iter(batches)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(next, batches, None)
            while (batch := pending.result()) is not None:
                pending = pool.submit(next, batches, None)
                names = batch.schema.names
                cols = [batch.column(name).to_numpy(zero_copy_only=False) for name in ("hi", "lo", "logp")]
                bow = batch.column("bow").to_numpy(zero_copy_only=False) if "bow" in names else None
                self.write(*cols, bow)

    def write_arrays(self, k: int, hi: np.ndarray, lo: np.ndarray, logp: np.ndarray, bow: np.ndarray | None,
                     batch: int = 1 << 18) -> None:
        """A whole section from in-memory arrays, formatted ``batch`` rows at a time (bounded text buffers)."""
        self.section(k)
        for s in range(0, len(lo), batch):
            self.write(hi[s:s + batch], lo[s:s + batch], logp[s:s + batch], None if bow is None else bow[s:s + batch])

    def _check_complete(self) -> None:
        if self.order and self.written != self.counts[self.order - 1]:
            raise ValueError(f"ARPA section {self.order}: the header says {self.counts[self.order - 1]} "
                             f"n-grams, {self.written} were written")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._check_complete()
                if self.order != len(self.counts):
                    raise ValueError(f"ARPA file has {self.order} of {len(self.counts)} sections")
                self._emit(b"\n\\end\\\n")
                self._drain()
                self._fh.close()
                os.replace(self._tmp, self.path)
        finally:
            self._drain(raise_errors=False)
            self._fh.close()  # a no-op once closed
            self._tmp.unlink(missing_ok=True)  # left only after a failure

    def _drain(self, raise_errors: bool = True) -> None:
        """Wait for every queued write; re-raise the first that failed unless ``raise_errors`` is off."""
        self._io.shutdown(wait=True)
        while self._writes:
            error = self._writes.popleft().exception()
            if error is not None and raise_errors:
                self._writes.clear()
                raise error


def _write_all(fh: BinaryIO, chunks: Sequence[bytes | memoryview]) -> None:
    for chunk in chunks:
        fh.write(chunk)


def write_arpa(model: BackoffModel, path: Path) -> Path:
    """Write ``model`` (whose tables keep their n-grams) as an ARPA file."""
    with ArpaWriter(path, model.vocab.words, [len(t) for t in model.tables]) as out:
        for k, table in enumerate(model.tables, 1):
            if table.packed is None:
                raise ValueError("this model was estimated without its n-grams (keep_ngrams=False)")
            out.section(k)
            out.write(*table.packed, table.values["logp"], table.values["bow"])
    return Path(path)
def _value(text: str) -> float:
    v = float(text)
    return -np.inf if v <= LOG_ZERO else v


def read_arpa(path: Path, method: str = "arpa") -> BackoffModel:
    """Load an ARPA file as a :class:`BackoffModel` (vocabulary from its unigrams, ``<unk>`` added if absent)."""
    from lmpipe.ngram import BackoffModel, NgramTable  # lmpipe.ngram imports this module

    sections: list[list[tuple[float, list[str], float]]] = []
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.rstrip("\n")
            if line.startswith("\\") and line.endswith("-grams:"):
                sections.append([])
            elif line == "\\end\\":
                break
            elif sections and line.strip():
                parts = line.split("\t") if "\t" in line else line.split()
                if "\t" in line:
                    words = parts[1].split()
                    bow = _value(parts[2]) if len(parts) > 2 else 0.0
                else:  # space-separated ARPA: the k words sit between the probability and the bow
                    k = len(sections)
                    words, bow = parts[1:1 + k], _value(parts[1 + k]) if len(parts) > 1 + k else 0.0
                sections[-1].append((_value(parts[0]), words, bow))
    unigram_words = [e[1][0] for e in sections[0]]
    vocab = Vocabulary([*SPECIALS, *(w for w in unigram_words if w not in SPECIALS)])
    tables = []
    for entries in sections:
        ids = np.array([[vocab.index[w] for w in e[1]] for e in entries], np.int64)
        logp = np.array([e[0] for e in entries], np.float32)
        bow = np.array([e[2] for e in entries], np.float32)
        if len(tables) == 0 and SPECIALS[0] not in unigram_words:  # no <unk> line: it gets probability 0
            ids, logp, bow = np.vstack([ids, [[0]]]), np.append(logp, -np.inf), np.append(bow, 0.0)
        tables.append(NgramTable.from_ids(ids, key_bits(len(vocab)), logp=logp, bow=bow))
    return BackoffModel(len(tables), vocab, tables, method)
