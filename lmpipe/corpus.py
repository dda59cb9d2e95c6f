"""Corpus ingestion: sources → cleaning → filters → exact and near dedup → splits → warehouse.

Each source is ingested in one DuckDB transaction: it is read and validated completely before the
first row is written, so a bad file leaves the warehouse exactly as it was. A source whose content
sha256 is already in ``sources`` is skipped, which makes ingestion idempotent.

Splits come from the content hash (first 32 bits of the md5 of the normalised text, modulo 10,000), so
a document keeps its split however many documents arrive later, and anything derived from a
document can recompute its split from the document's text alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import queue
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from tqdm._monitor import TMonitor
from tqdm.auto import tqdm

from lmpipe import minhash, plots, warehouse
from lmpipe.clean import clean_block, clean_chunk, clean_texts, normalize_many, text_hash
from lmpipe.config import IngestConfig, PipelineConfig
from lmpipe.sources import (
    IngestError,
    LineBlock,
    Source,
    line_blocks,
    read_batches,
    reads_line_blocks,
    resolve_sources,
    source_digest,
)
from lmpipe.stage import Logger, NullLogger, StageContext, StageOutput, StageResult
from lmpipe.stdlib_docs import DocObject, harvest, python_fingerprint
from lmpipe.workspace import Workspace

BUILTIN_PREFIX = "builtin:python-stdlib-docstrings"
SPLIT_BUCKETS = 10_000


@dataclass
class SourceReport:
    """What happened to one source."""

    uri: str
    status: str  # "ingested" or "skipped" (already in the warehouse)
    bytes: int = 0
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class IngestReport:
    sources: list[SourceReport]
    splits: dict[str, int]
    fingerprint: str
    seconds: float

    @property
    def added(self) -> int:
        return sum(s.kept for s in self.sources)

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes for s in self.sources if s.status == "ingested")

    def totals(self) -> dict[str, float]:
        dropped = Counter()
        for s in self.sources:
            dropped.update(s.dropped)
        out = {
            "documents_added": self.added,
            "documents_read": sum(s.read for s in self.sources),
            "sources_ingested": sum(s.status == "ingested" for s in self.sources),
            "sources_skipped": sum(s.status == "skipped" for s in self.sources),
            "mb_read": self.bytes_read / 1e6,
            "mb_per_s": self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else 0.0,
            "seconds": self.seconds,
        }
        out.update({f"dropped_{r}": n for r, n in dropped.items()})
        out.update({f"documents_{s}": n for s, n in self.splits.items()})
        return out

    def to_json(self) -> dict:
        return {"sources": [asdict(s) for s in self.sources], "splits": self.splits,
                "fingerprint": self.fingerprint, "seconds": self.seconds, "totals": self.totals()}

    def to_markdown(self) -> str:
        reasons = sorted({r for s in self.sources for r in s.dropped})
        head = ["source", "status", "MB", "read", "kept", *reasons]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in self.sources:
            row = [s.uri, s.status, f"{s.bytes / 1e6:.2f}", str(s.read), str(s.kept)]
            lines.append("| " + " | ".join(row + [str(s.dropped.get(r, 0)) for r in reasons]) + " |")
        splits = ", ".join(f"{k}: {v}" for k, v in sorted(self.splits.items()))
        return "\n".join(["# Ingestion report", "", *lines, "", f"Warehouse documents by split: {splits}", ""])


# ----------------------------------------------------------------------------------------------
# reading and preparing (before any write)

CHUNK_DOCS = 20_000  # documents per cleaning job
PARALLEL_MIN_DOCS = 50_000  # below this, a worker pool costs more than it saves
INSERT_ROWS = 200_000  # streamed sources are written in inserts of about this many documents


COLUMNS = {"line": pa.int32(), "text": pa.string(), "hash": pa.string(), "object": pa.string()}


@dataclass
class Prepared:
    """A source's documents after cleaning, length filters and in-source exact dedup (nothing written yet).

    ``table`` has the columns of :data:`COLUMNS`: the source line, the normalised text, its md5 and, for the
    built-in corpus, the stdlib object it documents.
    """

    uri: str
    sha256: str
    bytes: int
    format: str
    read: int = 0
    table: pa.Table = field(default_factory=lambda: pa.schema(COLUMNS).empty_table())
    dropped: Counter = field(default_factory=Counter)
    stdlib: list[DocObject] | None = None


def builtin_uri(modules: Sequence[str] = ()) -> str:
    scope = ",".join(sorted(modules)) if modules else "all"
    return f"{BUILTIN_PREFIX}/{python_fingerprint()}/{scope}"


_KEY_SQL = "('0x' || substr(hash, 1, 16))::UBIGINT"  # clean.dedup_keys of a stored hash


def _dedup(prep: Prepared, n_read: int, result: tuple[pa.Table, np.ndarray, Counter], seen: set[int]) -> pa.Table:
    """Account one cleaned chunk in ``prep`` and drop exact duplicates of anything in ``seen`` (first one wins).

    Documents are compared by the first 64 bits of the md5 of their normalised text (``clean.dedup_keys``):
    among a billion distinct documents, two share a key with a probability of about 3%.
    """
    table, keys, dropped = result
    prep.read += n_read
    prep.dropped.update(dropped)
    mask = [k not in seen and not seen.add(k) for k in keys.tolist()]  # set.add returns None
    n_dup = len(mask) - sum(mask)
    if n_dup:
        prep.dropped["exact_duplicate"] += n_dup
        table = table.filter(pa.array(mask))
    return table


def _workers(workers: int | None, expected: int | None) -> int:
    """How many cleaning processes: all cores, unless the source is too small to repay starting them.

    `expected` is a rough document count, None when unknown (a remote source of unknown size).
    """
    workers = workers if workers is not None else (os.cpu_count() or 1)
    return 1 if expected is not None and expected < PARALLEL_MIN_DOCS else workers


def _main_reloadable() -> bool:
    """Whether worker processes can re-import ``__main__``, as fork-server children do.

    A script read from standard input cannot be: its workers would die at start-up, over and over, so
    such callers clean serially.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return getattr(main, "__spec__", None) is not None or path is None or os.path.isfile(path)


def _no_other_threads() -> bool:
    """Whether this thread is the only Python thread, not counting tqdm's monitor.

    tqdm starts its monitor with the first bar, even a disabled one; it only ever holds tqdm's own lock,
    which the cleaning workers never take, so a fork beside it is safe.
    """
    me = threading.current_thread()
    return all(t is me or isinstance(t, TMonitor) for t in threading.enumerate())


@contextlib.contextmanager
def _cleaning_pool(workers: int) -> Iterator[Any]:
    """Worker processes for cleaning (None for one).

    Forked directly when this process runs no other Python thread (``lmpipe ingest``, scripts; see
    :func:`_no_other_threads`): the fastest start. Otherwise (a Prefect task, with its API, logging and
    event threads) they come from a fork server: a child forked from a threaded process can inherit a lock
    some thread held at that moment and wait on it forever. The fork server is a fresh single-threaded
    interpreter that has imported the cleaning code once. Either way the pool starts before DuckDB opens,
    so no worker inherits a live database.
    """
    if workers < 2:
        yield None
        return
    if _no_other_threads():
        ctx = multiprocessing.get_context("fork")
    elif _main_reloadable():
        ctx = multiprocessing.get_context("forkserver")
        # imported once in the server, so children skip re-running __main__ and re-importing the readers
        ctx.set_forkserver_preload(["__main__", "lmpipe.clean", "lmpipe.sources"])
    else:
        yield None
        return
    pool = ctx.Pool(workers)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _cleaned(chunks: Iterable[tuple[list[int], list[str]] | LineBlock], cfg: IngestConfig, pool: Any, workers: int,
             objects: list[str | None] | None = None) -> Iterator[tuple[int, tuple[pa.Table, np.ndarray, Counter]]]:
    """(documents read, cleaned chunk) in source order; reading overlaps cleaning, 2 jobs per worker in flight.

    A chunk is (line numbers, texts), or a :class:`LineBlock` of raw lines that the worker decodes and splits.
    """
    if pool is None:
        done = 0
        for chunk in chunks:
            lines, texts = chunk.lines() if isinstance(chunk, LineBlock) else chunk
            part = None if objects is None else objects[done:done + len(texts)]
            yield len(texts), clean_chunk(lines, texts, part, cfg.min_chars, cfg.max_chars)
            done += len(texts)
        return
    pending: deque = deque()
    for chunk in chunks:
        if isinstance(chunk, LineBlock):
            pending.append(pool.apply_async(clean_block, (chunk, cfg.min_chars, cfg.max_chars)))
        else:
            pending.append(pool.apply_async(clean_texts, (*chunk, cfg.min_chars, cfg.max_chars)))
        while len(pending) > 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def prepare(chunks: Iterable[tuple[list[int], list[str]]], prep: Prepared, cfg: IngestConfig,
            workers: int | None = None, objects: list[str | None] | None = None,
            expected: int | None = None) -> Prepared:
    """Clean batches of (line numbers, texts) into ``prep``, in worker processes when there are many."""
    workers = 1 if objects is not None else _workers(workers, expected)
    seen: set[int] = set()
    parts = [prep.table]
    with _cleaning_pool(workers) as pool:
        for n, result in _cleaned(chunks, cfg, pool, workers, objects):
            parts.append(_dedup(prep, n, result, seen))
    prep.table = pa.concat_tables(parts).combine_chunks()
    return prep


def read_builtin(cfg: IngestConfig) -> Prepared:
    """The built-in corpus: one document per docstring of the running Python's standard library."""
    objects = harvest(list(cfg.builtin_modules) or None)
    payload = json.dumps([asdict(o) for o in objects], ensure_ascii=False).encode()
    prep = Prepared(builtin_uri(cfg.builtin_modules), hashlib.sha256(payload).hexdigest(), len(payload), "builtin",
                    stdlib=objects)
    chunks = [(list(range(1, len(objects) + 1)), [o.docstring for o in objects])]
    return prepare(chunks, prep, cfg, workers=1, objects=[o.qualname for o in objects])


def read_source(src: Source, cfg: IngestConfig, digest: tuple[str, int] | None = None,
                workers: int | None = None) -> Prepared:
    """Read, validate and clean one source completely (raises IngestError before anything is written)."""
    sha, size = digest or source_digest(src)
    prep = Prepared(src.uri, sha, size, src.format)
    chunks = read_batches(src, unit=cfg.unit, text_field=cfg.text_field, batch_size=CHUNK_DOCS)
    expected = size // 100 if not src.remote else None  # a rough document count, to choose serial or parallel
    return prepare(chunks, prep, cfg, workers=workers, expected=expected)


# ----------------------------------------------------------------------------------------------
# writing


def _split_sql(cfg: IngestConfig) -> str:
    """SQL for :func:`split_of` over a ``hash`` column."""
    test = round(cfg.test_fraction * SPLIT_BUCKETS)
    val = test + round(cfg.val_fraction * SPLIT_BUCKETS)
    bucket = f"(('0x' || substr(hash, 1, 8))::UBIGINT % {SPLIT_BUCKETS})"
    return f"CASE WHEN {bucket} < {test} THEN 'test' WHEN {bucket} < {val} THEN 'val' ELSE 'train' END"


def split_of(text_hash: str, cfg: IngestConfig) -> str:
    """The split of a document whose normalised text has md5 ``text_hash``: first 32 bits mod 10,000."""
    bucket = int(text_hash[:8], 16) % SPLIT_BUCKETS
    test = round(cfg.test_fraction * SPLIT_BUCKETS)
    if bucket < test:
        return "test"
    return "val" if bucket < test + round(cfg.val_fraction * SPLIT_BUCKETS) else "train"


def _scheme(cfg: IngestConfig) -> str:
    return f"p{cfg.minhash_perm}-s{cfg.minhash_shingle}"


def _drop_rows(prep: Prepared, drop: np.ndarray, reason: str) -> None:
    if drop.any():
        prep.dropped[reason] += int(drop.sum())
        prep.table = prep.table.filter(pa.array(~drop))


def _drop_existing(con: duckdb.DuckDBPyConnection, prep: Prepared) -> None:
    """Exact dedup against documents already in the warehouse."""
    if not prep.table.num_rows or not con.sql("SELECT count(*) FROM documents").fetchall()[0][0]:
        return
    con.register("_prepared", prep.table)
    known = con.sql("SELECT hash IN (SELECT hash FROM documents) FROM _prepared").fetchnumpy()
    con.unregister("_prepared")
    _drop_rows(prep, np.asarray(next(iter(known.values())), dtype=bool), "exact_duplicate")


def _existing_signatures(
    con: duckdb.DuckDBPyConnection, scheme: str, keys: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Signatures of warehouse documents sharing at least one band key with ``keys`` (n, bands)."""
    n, bands = keys.shape
    probe = pa.table({"band": np.tile(np.arange(bands, dtype=np.int16), n), "key": keys.ravel()})
    con.register("_probe", probe)
    rows = con.execute(
        """SELECT s.doc_id, s.sig FROM minhash_signatures s WHERE s.scheme = ? AND s.doc_id IN (
             SELECT b.doc_id FROM minhash_bands b JOIN _probe p ON b.band = p.band AND b.key = p.key
             WHERE b.scheme = ?) ORDER BY s.doc_id""",
        [scheme, scheme],
    ).fetchall()
    con.unregister("_probe")
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.uint32)
    return np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.uint32)


def _insert_signatures(con: duckdb.DuckDBPyConnection, ids: np.ndarray, sigs: np.ndarray, cfg: IngestConfig) -> None:
    bands, rows = minhash.lsh_params(cfg.minhash_perm, cfg.near_dedup_threshold)
    keys = minhash.band_keys(sigs, bands, rows)
    sig_table = pa.table({"doc_id": ids, "sig": pa.array(list(sigs), pa.list_(pa.uint32()))})
    band_table = pa.table({
        "band": np.tile(np.arange(bands, dtype=np.int16), len(ids)),
        "key": keys.ravel(),
        "doc_id": np.repeat(ids, bands),
    })
    con.register("_sigs", sig_table)
    con.register("_bands", band_table)
    con.execute("INSERT INTO minhash_signatures SELECT ?, doc_id, sig FROM _sigs", [_scheme(cfg)])
    con.execute("INSERT INTO minhash_bands SELECT ?, band, key, doc_id FROM _bands", [_scheme(cfg)])
    con.unregister("_sigs")
    con.unregister("_bands")


def _backfill_signatures(con: duckdb.DuckDBPyConnection, cfg: IngestConfig) -> None:
    """Give warehouse documents without a signature of this scheme one (near dedup turned on later)."""
    rows = con.execute(
        """SELECT doc_id, text FROM documents WHERE doc_id NOT IN
           (SELECT doc_id FROM minhash_signatures WHERE scheme = ?) ORDER BY doc_id""",
        [_scheme(cfg)],
    ).fetchall()
    if rows:
        ids = np.array([r[0] for r in rows], np.int64)
        _insert_signatures(con, ids, minhash.signatures([r[1] for r in rows], cfg.minhash_perm, cfg.minhash_shingle),
                           cfg)


def _drop_near_duplicates(con: duckdb.DuckDBPyConnection, prep: Prepared, cfg: IngestConfig) -> np.ndarray:
    """MinHash LSH against the source itself and the warehouse; returns the kept documents' signatures."""
    sigs = minhash.signatures(prep.table.column("text").to_pylist(), cfg.minhash_perm, cfg.minhash_shingle)
    if not len(sigs):
        return sigs
    bands, rows = minhash.lsh_params(cfg.minhash_perm, cfg.near_dedup_threshold)
    _, existing = _existing_signatures(con, _scheme(cfg), minhash.band_keys(sigs, bands, rows))
    drop = minhash.near_duplicates(sigs, cfg.near_dedup_threshold, bands, rows, existing=existing) >= 0
    _drop_rows(prep, drop, "near_duplicate")
    return sigs[~drop]


def _insert_documents(con: duckdb.DuckDBPyConnection, table: pa.Table, first_id: int, source_id: int,
                      cfg: IngestConfig) -> np.ndarray:
    """Insert cleaned rows as documents ``first_id``, ``first_id + 1``, ...; returns their ids."""
    ids = np.arange(first_id, first_id + table.num_rows, dtype=np.int64)
    con.register("_final", table.append_column("doc_id", pa.array(ids)))
    con.execute(f"""INSERT INTO documents SELECT doc_id, {int(source_id)}, line, text, length(text), strlen(text),
                    hash, {_split_sql(cfg)}, object FROM _final""")
    con.unregister("_final")
    return ids


def _new_source(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    """A new source id and the first free document id."""
    source_id = con.sql("SELECT nextval('source_id_seq')").fetchall()[0][0]
    return source_id, con.sql("SELECT coalesce(max(doc_id), 0) FROM documents").fetchall()[0][0] + 1


def _finish_source(con: duckdb.DuckDBPyConnection, source_id: int, prep: Prepared, kept: int) -> dict[str, int]:
    """The source's row and its drop counts."""
    con.execute(
        "INSERT INTO sources VALUES (?, ?, ?, ?, ?, ?, ?, now())",
        [source_id, prep.uri, prep.sha256, prep.bytes, prep.format, prep.read, kept],
    )
    dropped = {r: n for r, n in prep.dropped.items() if n}
    if dropped:
        con.executemany("INSERT INTO drops VALUES (?, ?, ?)", [[source_id, r, n] for r, n in dropped.items()])
    return dropped


def _write_source(con: duckdb.DuckDBPyConnection, prep: Prepared, cfg: IngestConfig) -> SourceReport:
    """A fully prepared source (near dedup needs all of it at once) inside one transaction."""
    t0 = time.perf_counter()
    con.begin()
    try:
        _drop_existing(con, prep)
        sigs = None
        if cfg.near_dedup:
            _backfill_signatures(con, cfg)
            sigs = _drop_near_duplicates(con, prep, cfg)
        source_id, first_id = _new_source(con)
        ids = _insert_documents(con, prep.table, first_id, source_id, cfg)
        if sigs is not None and len(sigs):
            _insert_signatures(con, ids, sigs, cfg)
        dropped = _finish_source(con, source_id, prep, len(ids))
        if prep.stdlib:
            _write_objects(con, prep.stdlib, source_id)
        con.commit()
    except BaseException:
        con.rollback()
        raise
    return SourceReport(prep.uri, "ingested", prep.bytes, prep.read, len(ids), dropped, time.perf_counter() - t0)


class _Inserter:
    """Runs the INSERTs of a streamed source on a thread of their own.

    DuckDB releases the GIL while it executes, so the batch being written overlaps reading and deduplicating
    the next ones. The connection is used only by this thread between ``__enter__`` and ``__exit__``; an
    INSERT that fails is re-raised in the caller at the next ``put`` or at exit.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, source_id: int, cfg: IngestConfig) -> None:
        self.con, self.source_id, self.cfg = con, source_id, cfg
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="lmpipe-insert", daemon=True)

    def __enter__(self) -> _Inserter:
        self.thread.start()
        return self

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:  # after a failure, drain without writing
                try:
                    _insert_documents(self.con, *job, self.source_id, self.cfg)
                except BaseException as exc:  # handed to the caller
                    self.error = exc

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, table: pa.Table, first_id: int) -> int:
        """Queue ``table`` as documents ``first_id``...; returns its row count."""
        self._raise()
        self.jobs.put((table, first_id))
        return table.num_rows

    def __exit__(self, *exc: object) -> None:
        self.jobs.put(None)
        self.thread.join()
        if exc[0] is None:
            self._raise()


def _stream_source(ws: Workspace, src: Source, cfg: IngestConfig, digest: tuple[str, int],
                   workers: int | None = None) -> SourceReport:
    """Exact-dedup ingestion of one source, writing each cleaned chunk as it arrives, in one transaction.

    Writing overlaps cleaning; a bad record anywhere in the source rolls the whole source back.
    """
    t0 = time.perf_counter()
    prep = Prepared(src.uri, digest[0], digest[1], src.format)
    blocks = reads_line_blocks(src, cfg.unit)  # workers decode and split lines; this process finds line ends
    chunks = line_blocks(src) if blocks else read_batches(src, cfg.unit, cfg.text_field, batch_size=CHUNK_DOCS)
    n_workers = _workers(workers, digest[1] // 100 if not src.remote else None)
    with _cleaning_pool(n_workers) as pool, warehouse.connect(ws) as con:
        con.begin()
        try:
            seen = {k for (k,) in con.sql(f"SELECT {_KEY_SQL} FROM documents").fetchall()}
            source_id, first_id = _new_source(con)
            next_id, buffered = first_id, []
            with _Inserter(con, source_id, cfg) as inserter:
                for n, result in _cleaned(chunks, cfg, pool, n_workers):
                    buffered.append(_dedup(prep, n, result, seen))
                    if sum(t.num_rows for t in buffered) >= INSERT_ROWS:  # each INSERT has a fixed cost
                        next_id += inserter.put(pa.concat_tables(buffered), next_id)
                        buffered = []
                if buffered:
                    next_id += inserter.put(pa.concat_tables(buffered), next_id)
            if blocks and prep.read == 0:
                raise IngestError(src.uri, None, "empty file: no documents")
            kept = next_id - first_id
            dropped = _finish_source(con, source_id, prep, kept)
            con.commit()
        except BaseException:
            con.rollback()
            raise
    return SourceReport(prep.uri, "ingested", prep.bytes, prep.read, kept, dropped, time.perf_counter() - t0)


def _write_objects(con: duckdb.DuckDBPyConnection, objects: list[DocObject], source_id: int) -> None:
    normalized = normalize_many([o.docstring for o in objects])
    table = pa.table({
        "qualname": [o.qualname for o in objects], "kind": [o.kind for o in objects],
        "module": [o.module for o in objects], "docstring": [o.docstring for o in objects],
        "doc_hash": [text_hash(t) for t in normalized],
    })
    con.register("_objects", table)
    con.execute("INSERT INTO stdlib_objects SELECT qualname, kind, module, docstring, doc_hash, ? FROM _objects",
                [source_id])
    con.unregister("_objects")


# ----------------------------------------------------------------------------------------------
# entry point


def _already_ingested(con: duckdb.DuckDBPyConnection, sha256: str | None = None, uri: str | None = None) -> bool:
    if sha256 is not None:
        return bool(con.execute("SELECT count(*) FROM sources WHERE sha256 = ?", [sha256]).fetchall()[0][0])
    return bool(con.execute("SELECT count(*) FROM sources WHERE uri = ?", [uri]).fetchall()[0][0])


def plan_sources(cfg: IngestConfig) -> list[Source] | None:
    """The configured sources resolved to files (None means the built-in corpus); raises IngestError."""
    return resolve_sources(cfg.sources, cfg.fsspec_schemes) if cfg.sources else None


def ingest(
    ws: Workspace, cfg: IngestConfig, log: Logger | None = None, progress: bool = True
) -> IngestReport:
    """Ingest the configured sources (or the built-in corpus) into the workspace's warehouse."""
    log = log or NullLogger()
    t0 = time.perf_counter()
    planned = plan_sources(cfg)  # every path is checked before anything is read or written
    reports: list[SourceReport] = []
    items: Iterable = planned if planned is not None else [None]
    bar = tqdm(items, desc="ingest", unit="source", disable=not progress or planned is None or len(planned) < 2)
    for step, src in enumerate(bar):
        report = _ingest_one(ws, src, cfg)
        reports.append(report)
        log.metrics({"source_documents_kept": report.kept, "source_documents_read": report.read}, step=step)
        bar.set_postfix_str(Path(report.uri).name[-40:])
    with warehouse.connect(ws) as con:
        splits = warehouse.split_counts(con)
        fingerprint = warehouse.corpus_fingerprint(con)
    return IngestReport(reports, splits, fingerprint, time.perf_counter() - t0)


def _ingest_one(ws: Workspace, src: Source | None, cfg: IngestConfig) -> SourceReport:
    # Cleaning forks worker processes, which must not inherit a live DuckDB instance and its threads:
    # the pool starts before the warehouse is opened (and the connection used to check is closed).
    if src is None:
        uri = builtin_uri(cfg.builtin_modules)
        with warehouse.connect(ws) as con:
            if _already_ingested(con, uri=uri):
                return SourceReport(uri, "skipped")
        prep = read_builtin(cfg)
    else:
        sha, size = source_digest(src)
        with warehouse.connect(ws) as con:
            if _already_ingested(con, sha256=sha):
                return SourceReport(src.uri, "skipped", size)
        if not cfg.near_dedup:
            return _stream_source(ws, src, cfg, (sha, size))
        prep = read_source(src, cfg, (sha, size))
    with warehouse.connect(ws) as con:
        return _write_source(con, prep, cfg)


# ----------------------------------------------------------------------------------------------
# the pipeline stage


def document_lengths(ws: Workspace) -> dict[str, list[int]]:
    with warehouse.connect(ws, read_only=True) as con:
        rows = con.sql("SELECT split, list(n_chars) FROM documents GROUP BY split ORDER BY split").fetchall()
    return {split: lengths for split, lengths in rows}


def _last_doc_id(ws: Workspace) -> int:
    with warehouse.connect(ws) as con:
        return int(con.sql("SELECT coalesce(max(doc_id), 0) FROM documents").fetchall()[0][0])


def _words_after(ws: Workspace, doc_id: int) -> int:
    """Whitespace-separated words of the documents numbered above ``doc_id`` (the ones an ingestion added)."""
    with warehouse.connect(ws, read_only=True) as con:
        return int(con.execute(r"SELECT coalesce(sum(len(regexp_extract_all(text, '\S+'))), 0) FROM documents "
                               "WHERE doc_id > ?", [doc_id]).fetchall()[0][0])


def run_stage(ctx: StageContext) -> StageOutput:
    """The ``ingest`` stage: ingest, then write the per-source report and the length histogram."""
    cfg: IngestConfig = ctx.section("ingest")
    last_id = _last_doc_id(ctx.workspace)
    report = ingest(ctx.workspace, cfg, log=ctx.log, progress=ctx.progress)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    report_json = ctx.out_dir / "ingest_report.json"
    report_json.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")
    report_md = ctx.out_dir / "ingest_report.md"
    report_md.write_text(report.to_markdown(), encoding="utf-8")
    hist = plots.histogram(document_lengths(ctx.workspace), ctx.out_dir / "document_lengths.png",
                           "Document length by split", "characters")
    totals = report.totals() | {"tokens_processed": float(_words_after(ctx.workspace, last_id))}
    ctx.log.metrics(totals)
    for path in (report_json, report_md, hist):
        ctx.log.artifact(path)
    added = sum(s.kept for s in report.sources)
    skipped = sum(s.status == "skipped" for s in report.sources)
    summary = f"{added} documents added from {len(report.sources) - skipped} sources ({skipped} already ingested)"
    ws = ctx.workspace
    outputs = {"report": ws.rel(report_json), "report_md": ws.rel(report_md), "histogram": ws.rel(hist)}
    return StageOutput(report.fingerprint, outputs, totals, summary)


def external_inputs(ws: Workspace, cfg: PipelineConfig) -> list:
    """Size and modification time of every local source, so edited files invalidate the cache."""
    planned = plan_sources(cfg.ingest)
    if planned is None:
        return [builtin_uri(cfg.ingest.builtin_modules)]
    out = []
    for src in planned:
        if src.remote:
            out.append([src.uri, None, time.time()])  # remote sources cannot be checked cheaply: always re-read
        else:
            st = Path(src.uri).stat()
            out.append([src.uri, st.st_size, st.st_mtime_ns])
    return out


def still_valid(ws: Workspace, result: StageResult) -> bool:
    """A cached ingest result holds while the warehouse's documents are the ones it produced."""
    if not ws.warehouse.exists():
        return False
    with warehouse.connect(ws, read_only=True) as con:
        return warehouse.corpus_fingerprint(con) == result.fingerprint


__all__ = [
    "IngestError", "IngestReport", "SourceReport", "ingest", "read_builtin", "run_stage", "split_of", "text_hash",
]
