"""Multi-field record files (instructions, preference pairs) and their warehouse tables.

Both kinds follow one protocol, described once by a :class:`RecordTable`: a file already recorded (same
sha256) in the kind's sources table is skipped; otherwise it is read and checked whole
(``sources.read_records``), then its rows whose ``hash`` is new to the table are inserted, first
occurrence only and in file order, together with the file's row in the sources table, in one
transaction. A built-in set (derived by the pipeline, not read from a file) replaces its earlier rows in
one transaction too.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from lmpipe import warehouse
from lmpipe.chat import ROLES, Message
from lmpipe.sources import Source, resolve_sources, source_digest
from lmpipe.workspace import Workspace


@dataclass(frozen=True)
class FileReport:
    """What happened to one instruction or preference source."""

    uri: str
    status: str  # "ingested", "skipped" (already ingested) or "derived" (a built-in set)
    records: int = 0
    kept: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class RecordTable:
    """One kind of record: its rows table, the table of ingested files, their schema, its built-in sources."""

    name: str  # the rows, e.g. "instructions"
    sources: str  # one row per ingested file: uri, sha256, records, kept, ingested_at
    columns: str  # the rows' columns in insertion order
    schema: str  # CREATE TABLE IF NOT EXISTS statement of the rows table
    builtin: tuple[str, ...]  # the ``source`` values of the sets the pipeline derives itself

    @contextlib.contextmanager
    def connect(self, ws: Workspace, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A warehouse connection (:func:`lmpipe.warehouse.connect`) with both tables in place."""
        with warehouse.connect(ws, read_only=read_only) as con:
            if not read_only:
                con.execute(self.schema)
                con.execute(f"""CREATE TABLE IF NOT EXISTS {self.sources} (
                                    uri         VARCHAR NOT NULL,
                                    sha256      VARCHAR NOT NULL UNIQUE,
                                    records     BIGINT NOT NULL,  -- records read
                                    kept        BIGINT NOT NULL,  -- rows written (exact duplicates dropped)
                                    ingested_at TIMESTAMPTZ NOT NULL
                                )""")
            yield con

    def require_train(self, counts: Mapping[str, int], stage: str, what: str, builtin: bool, formats: str,
                      before: str) -> None:
        """Raise a ValueError that says how to give ``stage`` its data when ``counts`` (rows per split) has no
        train rows; ``what`` names the rows, ``formats`` the files it reads, ``before`` the stage to stop at."""
        if counts.get("train"):
            return
        why = (f"the built-in {what} come from the built-in corpus's documented stdlib objects, and this "
               "workspace's corpus has none" if builtin else f"the built-in {what} are off ({stage}.builtin: false)")
        raise ValueError(f"{stage}: no train {what}: {why}. Give files in {stage}.sources ({formats}) or ingest them "
                         f"with `lmpipe ingest --kind {self.name} FILE`, or stop before this stage with "
                         f"`lmpipe run --to {before}`")

    def exists(self, con: duckdb.DuckDBPyConnection) -> bool:
        """Whether the rows table has been created (a read-only connection cannot create it)."""
        return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?",
                                [self.name]).fetchall()[0][0])

    def where(self, builtin: bool = True, exclude: Sequence[str] = ()) -> tuple[str, list[str]]:
        """A SQL condition and its parameters: rows not from ``exclude``, nor from the built-in sets unless asked."""
        excluded = [*exclude, *([] if builtin else self.builtin)]
        return (f"source NOT IN ({', '.join('?' * len(excluded))})", excluded) if excluded else ("true", [])

    def fetch(self, ws: Workspace, sql: str, params: Sequence[Any] = (), builtin: bool = True,
              exclude: Sequence[str] = ()) -> list[tuple]:
        """The rows of the read-only query ``sql``, whose ``{where}`` (after its own ``?`` parameters) is filled in
        by :meth:`where`; none before the table exists."""
        if not ws.warehouse.exists():
            return []
        where, excluded = self.where(builtin, exclude)
        with self.connect(ws, read_only=True) as con:
            if not self.exists(con):
                return []
            return con.execute(sql.format(where=where), [*params, *excluded]).fetchall()

    def insert_new(self, con: duckdb.DuckDBPyConnection, rows: pa.Table) -> int:
        """Insert the ``rows`` whose ``hash`` is new to the table (first of repeats, in order); return how many."""
        con.register("_incoming", rows)
        before = con.sql(f"SELECT count(*) FROM {self.name}").fetchall()[0][0]
        con.execute(
            f"""INSERT INTO {self.name}
                SELECT {self.columns}
                FROM (SELECT *, row_number() OVER () AS ord FROM _incoming)
                WHERE hash NOT IN (SELECT hash FROM {self.name})
                QUALIFY row_number() OVER (PARTITION BY hash ORDER BY ord) = 1
                ORDER BY ord"""
        )
        con.unregister("_incoming")
        return con.sql(f"SELECT count(*) FROM {self.name}").fetchall()[0][0] - before

    def ingest_file(self, con: duckdb.DuckDBPyConnection, source: Source, read: Callable[[Source], Sequence[Any]],
                    to_rows: Callable[[str, Sequence[Any]], pa.Table]) -> FileReport:
        """Ingest one record file (see the module docstring); raises IngestError on bad input."""
        t0 = time.perf_counter()
        sha, _ = source_digest(source)
        if con.execute(f"SELECT count(*) FROM {self.sources} WHERE sha256 = ?", [sha]).fetchall()[0][0]:
            return FileReport(source.uri, "skipped")
        records = read(source)  # everything is read and checked before anything is written
        con.begin()
        try:
            kept = self.insert_new(con, to_rows(source.uri, records))
            con.execute(f"INSERT INTO {self.sources} VALUES (?, ?, ?, ?, now())", [source.uri, sha, len(records), kept])
            con.commit()
        except BaseException:
            con.rollback()
            raise
        return FileReport(source.uri, "ingested", len(records), kept, time.perf_counter() - t0)

    def ingest_files(self, ws: Workspace, specs: Sequence[str], schemes: Sequence[str],
                     read: Callable[[Source], Sequence[Any]], to_rows: Callable[[str, Sequence[Any]], pa.Table]
                     ) -> list[FileReport]:
        """Ingest record files (paths, directories or globs), one transaction each; raises IngestError."""
        planned = resolve_sources(specs, schemes)  # every path is checked before anything is read
        with self.connect(ws) as con:
            return [self.ingest_file(con, src, read, to_rows) for src in planned]

    def replace_builtin(self, con: duckdb.DuckDBPyConnection, source: str, records: int, rows: pa.Table | None,
                        started: float) -> FileReport:
        """Replace the rows of the built-in set ``source`` by ``rows`` (None: no records) in one transaction."""
        con.begin()
        try:
            con.execute(f"DELETE FROM {self.name} WHERE source = ?", [source])
            kept = self.insert_new(con, rows) if rows is not None else 0
            con.commit()
        except BaseException:
            con.rollback()
            raise
        return FileReport(source, "derived", records, kept, time.perf_counter() - started)

    def fingerprint(self, ws: Workspace, builtin: bool = True, exclude: Sequence[str] = ()) -> str:
        """md5 over the sorted (hash, split) pairs of the rows (minus sources in ``exclude``): changes iff they do."""
        digest = "coalesce(md5(string_agg(hash || split, ',' ORDER BY hash, split)), '')"
        rows = self.fetch(ws, f"SELECT count(*), {digest} FROM {self.name} WHERE {{where}}", (), builtin, exclude)
        row = rows[0] if rows else (0, "")
        return f"{row[0]}-{row[1][:16]}"

    def external_inputs(self, ws: Workspace, paths: Sequence[str]) -> dict[str, Any]:
        """A stage's cache inputs from outside the pipeline: its configured files (size, mtime), so an edited file
        changes the key, and the fingerprint of the rows ingested from elsewhere (``lmpipe ingest``)."""
        files = file_stats(paths)
        return {"files": files, "other_rows": self.fingerprint(ws, builtin=False, exclude=[f[0] for f in files])}


def context_columns(source: str, rows: Sequence[Any]) -> dict[str, pa.Array]:
    """The columns every kind of record has: its ``source``, ``line``, ``system`` message and earlier turns
    (``history``, JSON), from rows with ``line``, ``system`` and ``history`` (a tuple of chat messages)."""
    history = [json.dumps([{"role": m.role, "content": m.content} for m in r.history], ensure_ascii=False)
               if r.history else None for r in rows]
    return {
        "source": pa.array([source] * len(rows), pa.string()),
        "line": pa.array([r.line for r in rows], pa.int32()),
        "system": pa.array([r.system for r in rows], pa.string()),
        "history": pa.array(history, pa.string()),
    }


def text_field(record: dict, key: str, where: str = "") -> str:
    """``record[key]`` stripped; a ValueError, prefixed by ``where``, if it is missing, not a string or empty."""
    value = record.get(key)
    if value is None:
        raise ValueError(f"{where}missing field {key!r} (fields: {', '.join(map(str, record)) or 'none'})")
    if not isinstance(value, str):
        raise ValueError(f"{where}field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}field {key!r} is empty")
    return value.strip()


def parse_messages(items: Sequence[Any], where: str = "") -> list[Message]:
    """Chat messages from a list of ``{role, content}`` objects; a ValueError, prefixed by ``where``, names the
    first message that is not one or whose role is unknown."""
    messages = []
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise ValueError(f"{where}message {i} must be an object with role and content, got {type(item).__name__}")
        role = text_field(item, "role", f"{where}message {i}: ")
        if role not in ROLES:
            raise ValueError(f"{where}message {i} has unknown role {role!r}; roles: {', '.join(ROLES)}")
        messages.append(Message(role, text_field(item, "content", f"{where}message {i}: ")))
    return messages


def history_messages(history: str | None) -> tuple[Message, ...]:
    """The earlier turns of a row, from its ``history`` column (see :func:`context_columns`)."""
    return tuple(Message(t["role"], t["content"]) for t in json.loads(history)) if history else ()


def file_stats(paths: Sequence[str]) -> list[list[Any]]:
    """(uri, size, mtime) of every file that ``paths`` (paths, directories or globs) name."""
    out = []
    for src in resolve_sources(paths) if paths else []:
        st = Path(src.uri).stat()
        out.append([src.uri, st.st_size, st.st_mtime_ns])
    return out
