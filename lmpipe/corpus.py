"""Corpus ingestion: sources → cleaning → filters → exact and near dedup → splits → warehouse.

Each source is ingested in one DuckDB transaction: it is read and validated completely before the
first row is written, so a bad file leaves the warehouse exactly as it was. A source whose content
sha256 is already in ``sources`` is skipped, which makes ingestion idempotent.

Splits come from the content hash (first 32 bits of the md5 of the normalised text, modulo 10,000), so
a document keeps its split however many documents arrive later, and anything derived from a
document can recompute its split from the document's text alone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from lmpipe import minhash, plots, warehouse
from lmpipe.clean import LengthFilter, apply_filters, normalize_many
from lmpipe.config import IngestConfig, PipelineConfig
from lmpipe.sources import IngestError, Source, read_documents, resolve_sources, source_digest
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
# reading


@dataclass(frozen=True)
class RawSource:
    """A source's identity and its documents, fully read and validated (nothing written yet)."""

    uri: str
    sha256: str
    bytes: int
    format: str
    lines: list[int]
    texts: list[str]
    objects: list[DocObject] | None = None


def builtin_uri(modules: Sequence[str] = ()) -> str:
    scope = ",".join(sorted(modules)) if modules else "all"
    return f"{BUILTIN_PREFIX}/{python_fingerprint()}/{scope}"


def read_builtin(modules: Sequence[str] = ()) -> RawSource:
    """The built-in corpus: one document per docstring of the running Python's standard library."""
    objects = harvest(list(modules) or None)
    payload = json.dumps([asdict(o) for o in objects], ensure_ascii=False).encode()
    return RawSource(
        uri=builtin_uri(modules), sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload), format="builtin",
        lines=list(range(1, len(objects) + 1)), texts=[o.docstring for o in objects], objects=objects,
    )


def read_source(src: Source, cfg: IngestConfig, digest: tuple[str, int] | None = None) -> RawSource:
    sha, size = digest or source_digest(src)
    lines, texts = [], []
    for line, text in read_documents(src, unit=cfg.unit, text_field=cfg.text_field):
        lines.append(line)
        texts.append(text)
    return RawSource(src.uri, sha, size, src.format, lines, texts)


# ----------------------------------------------------------------------------------------------
# writing


def _split_sql(cfg: IngestConfig) -> str:
    test = round(cfg.test_fraction * SPLIT_BUCKETS)
    val = test + round(cfg.val_fraction * SPLIT_BUCKETS)
    bucket = f"(('0x' || substr(hash, 1, 8))::UBIGINT % {SPLIT_BUCKETS})"
    return f"CASE WHEN {bucket} < {test} THEN 'test' WHEN {bucket} < {val} THEN 'val' ELSE 'train' END"


def split_of(text_hash: str, cfg: IngestConfig) -> str:
    """The split a document with md5 ``text_hash`` (of its normalised text) belongs to; same rule as SQL."""
    bucket = int(text_hash[:8], 16) % SPLIT_BUCKETS
    test = round(cfg.test_fraction * SPLIT_BUCKETS)
    if bucket < test:
        return "test"
    return "val" if bucket < test + round(cfg.val_fraction * SPLIT_BUCKETS) else "train"


def text_hash(normalized: str) -> str:
    return hashlib.md5(normalized.encode("utf-8")).hexdigest()


def _scheme(cfg: IngestConfig) -> str:
    return f"p{cfg.minhash_perm}-s{cfg.minhash_shingle}"


def _stage_candidates(con: duckdb.DuckDBPyConnection, raw: RawSource, cfg: IngestConfig) -> dict[str, int]:
    """Clean, filter and exact-dedup ``raw`` into the temp table ``_new``; return drop counts."""
    cleaned = normalize_many(raw.texts)
    keep, dropped = apply_filters(cleaned, [LengthFilter(min_chars=max(cfg.min_chars, 1), max_chars=cfg.max_chars)])
    objects = [raw.objects[i].qualname for i in keep] if raw.objects else [None] * len(keep)
    table = pa.table({
        "ord": pa.array(range(len(keep)), pa.int64()),
        "line": pa.array([raw.lines[i] for i in keep], pa.int32()),
        "text": pa.array([cleaned[i] for i in keep], pa.string()),
        "object": pa.array(objects, pa.string()),
    })
    con.register("_incoming", table)
    # exact dedup: first occurrence within the source, and nothing already in the warehouse
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _new AS
        SELECT ord, line, text, object, length(text) AS n_chars, strlen(text) AS n_bytes, hash,
               {_split_sql(cfg)} AS split
        FROM (SELECT *, md5(text) AS hash FROM _incoming)
        WHERE hash NOT IN (SELECT hash FROM documents)
        QUALIFY row_number() OVER (PARTITION BY hash ORDER BY ord) = 1"""
    )
    con.unregister("_incoming")
    n_new = con.sql("SELECT count(*) FROM _new").fetchall()[0][0]
    dropped = Counter(dropped)
    if len(keep) - n_new:
        dropped["exact_duplicate"] = len(keep) - n_new
    return dict(dropped)


def _existing_signatures(
    con: duckdb.DuckDBPyConnection, scheme: str, keys: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Signatures of warehouse documents sharing at least one band key with ``keys`` (n, bands)."""
    n, bands = keys.shape
    probe = pa.table({"band": np.repeat(np.arange(bands, dtype=np.int16)[None, :], n, 0).ravel(),
                      "key": keys.ravel()})
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


def _backfill_signatures(con: duckdb.DuckDBPyConnection, cfg: IngestConfig) -> None:
    """Give warehouse documents without a signature of this scheme one (near dedup turned on later)."""
    scheme = _scheme(cfg)
    rows = con.execute(
        """SELECT doc_id, text FROM documents WHERE doc_id NOT IN
           (SELECT doc_id FROM minhash_signatures WHERE scheme = ?) ORDER BY doc_id""",
        [scheme],
    ).fetchall()
    if rows:
        ids = np.array([r[0] for r in rows], np.int64)
        sigs = minhash.signatures([r[1] for r in rows], cfg.minhash_perm, cfg.minhash_shingle)
        _insert_signatures(con, scheme, ids, sigs, cfg)


def _insert_signatures(con: duckdb.DuckDBPyConnection, scheme: str, ids: np.ndarray, sigs: np.ndarray,
                       cfg: IngestConfig) -> None:
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
    con.execute("INSERT INTO minhash_signatures SELECT ?, doc_id, sig FROM _sigs", [scheme])
    con.execute("INSERT INTO minhash_bands SELECT ?, band, key, doc_id FROM _bands", [scheme])
    con.unregister("_sigs")
    con.unregister("_bands")


def _near_dedup(con: duckdb.DuckDBPyConnection, cfg: IngestConfig) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
    """Drop near-duplicates from ``_new``; return how many, and the kept rows' (ord, signature)."""
    rows = con.sql("SELECT ord, text FROM _new ORDER BY ord").fetchall()
    if not rows:
        return 0, (np.zeros(0, np.int64), np.zeros((0, cfg.minhash_perm), np.uint32))
    ords = np.array([r[0] for r in rows], np.int64)
    sigs = minhash.signatures([r[1] for r in rows], cfg.minhash_perm, cfg.minhash_shingle)
    bands, per_band = minhash.lsh_params(cfg.minhash_perm, cfg.near_dedup_threshold)
    _, existing = _existing_signatures(con, _scheme(cfg), minhash.band_keys(sigs, bands, per_band))
    dup_of = minhash.near_duplicates(sigs, cfg.near_dedup_threshold, bands, per_band, existing=existing)
    drop = dup_of >= 0
    if drop.any():
        con.register("_drop", pa.table({"ord": ords[drop]}))
        con.execute("DELETE FROM _new WHERE ord IN (SELECT ord FROM _drop)")
        con.unregister("_drop")
    return int(drop.sum()), (ords[~drop], sigs[~drop])


def _write_source(con: duckdb.DuckDBPyConnection, raw: RawSource, cfg: IngestConfig) -> SourceReport:
    """Everything for one source inside one transaction; rolled back on any error."""
    t0 = time.perf_counter()
    con.begin()
    try:
        dropped = _stage_candidates(con, raw, cfg)
        kept_sigs = None
        if cfg.near_dedup:
            _backfill_signatures(con, cfg)
            n_near, kept_sigs = _near_dedup(con, cfg)
            if n_near:
                dropped["near_duplicate"] = n_near
        source_id = con.sql("SELECT nextval('source_id_seq')").fetchall()[0][0]
        base = con.sql("SELECT coalesce(max(doc_id), 0) FROM documents").fetchall()[0][0]
        con.execute(
            """INSERT INTO documents SELECT ? + row_number() OVER (ORDER BY ord), ?, line, text, n_chars, n_bytes,
               hash, split, object FROM _new ORDER BY ord""",
            [base, source_id],
        )
        kept = con.sql("SELECT count(*) FROM _new").fetchall()[0][0]
        if kept_sigs is not None and len(kept_sigs[0]):
            # the kept rows of _new are numbered base+1.. in ord order, the same order as kept_sigs
            ids = base + 1 + np.arange(len(kept_sigs[0]), dtype=np.int64)
            _insert_signatures(con, _scheme(cfg), ids, kept_sigs[1], cfg)
        con.execute(
            "INSERT INTO sources VALUES (?, ?, ?, ?, ?, ?, ?, now())",
            [source_id, raw.uri, raw.sha256, raw.bytes, raw.format, len(raw.texts), kept],
        )
        if dropped:
            con.executemany("INSERT INTO drops VALUES (?, ?, ?)", [[source_id, r, n] for r, n in dropped.items()])
        if raw.objects:
            _write_objects(con, raw.objects, source_id)
        con.commit()
    except BaseException:
        con.rollback()
        raise
    finally:
        con.execute("DROP TABLE IF EXISTS _new")
    return SourceReport(raw.uri, "ingested", raw.bytes, len(raw.texts), kept, dropped, time.perf_counter() - t0)


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
    return resolve_sources(cfg.sources) if cfg.sources else None


def ingest(
    ws: Workspace, cfg: IngestConfig, log: Logger | None = None, progress: bool = True
) -> IngestReport:
    """Ingest the configured sources (or the built-in corpus) into the workspace's warehouse."""
    log = log or NullLogger()
    t0 = time.perf_counter()
    planned = plan_sources(cfg)  # every path is checked before anything is read or written
    reports: list[SourceReport] = []
    with warehouse.connect(ws) as con:
        items: Iterable = planned if planned is not None else [None]
        bar = tqdm(items, desc="ingest", unit="source", disable=not progress or planned is None or len(planned) < 2)
        for step, src in enumerate(bar):
            report = _ingest_one(con, src, cfg)
            reports.append(report)
            log.metrics({"source_documents_kept": report.kept, "source_documents_read": report.read}, step=step)
            bar.set_postfix_str(Path(report.uri).name[-40:])
        splits = warehouse.split_counts(con)
        fingerprint = warehouse.corpus_fingerprint(con)
    return IngestReport(reports, splits, fingerprint, time.perf_counter() - t0)


def _ingest_one(con: duckdb.DuckDBPyConnection, src: Source | None, cfg: IngestConfig) -> SourceReport:
    if src is None:
        uri = builtin_uri(cfg.builtin_modules)
        if _already_ingested(con, uri=uri):
            return SourceReport(uri, "skipped")
        raw = read_builtin(cfg.builtin_modules)
    else:
        sha, size = source_digest(src)
        if _already_ingested(con, sha256=sha):
            return SourceReport(src.uri, "skipped", size)
        raw = read_source(src, cfg, (sha, size))
    return _write_source(con, raw, cfg)


# ----------------------------------------------------------------------------------------------
# the pipeline stage


def document_lengths(ws: Workspace) -> dict[str, list[int]]:
    with warehouse.connect(ws, read_only=True) as con:
        rows = con.sql("SELECT split, list(n_chars) FROM documents GROUP BY split ORDER BY split").fetchall()
    return {split: lengths for split, lengths in rows}


def run_stage(ctx: StageContext) -> StageOutput:
    """The ``ingest`` stage: ingest, then write the per-source report and the length histogram."""
    cfg: IngestConfig = ctx.section("ingest")
    report = ingest(ctx.workspace, cfg, log=ctx.log, progress=ctx.progress)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    report_json = ctx.out_dir / "ingest_report.json"
    report_json.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")
    report_md = ctx.out_dir / "ingest_report.md"
    report_md.write_text(report.to_markdown(), encoding="utf-8")
    hist = plots.histogram(document_lengths(ctx.workspace), ctx.out_dir / "document_lengths.png",
                           "Document length by split", "characters")
    totals = report.totals()
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
