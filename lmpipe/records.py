"""Writing multi-field record files (instructions, preference pairs) into their warehouse tables.

Both kinds follow one protocol: a file already recorded (same sha256) in the kind's sources table is
skipped; otherwise it is read and checked whole (``sources.read_records``), then its rows whose
``hash`` is new to the table are inserted, first occurrence only and in file order, together with the
file's row in the sources table, in one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from lmpipe.sources import Source, source_digest


@dataclass(frozen=True)
class FileReport:
    """What happened to one instruction or preference source."""

    uri: str
    status: str  # "ingested", "skipped" (already ingested) or "derived" (a built-in set)
    records: int = 0
    kept: int = 0
    seconds: float = 0.0


def insert_new(con: duckdb.DuckDBPyConnection, table: str, columns: str, rows: pa.Table) -> int:
    """Insert the ``rows`` whose ``hash`` is not in ``table`` yet (the first of repeats, in order); return how many."""
    con.register("_incoming", rows)
    before = con.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0]
    con.execute(
        f"""INSERT INTO {table}
            SELECT {columns}
            FROM (SELECT *, row_number() OVER () AS ord FROM _incoming)
            WHERE hash NOT IN (SELECT hash FROM {table})
            QUALIFY row_number() OVER (PARTITION BY hash ORDER BY ord) = 1
            ORDER BY ord"""
    )
    con.unregister("_incoming")
    return con.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0] - before


def ingest_file(
    con: duckdb.DuckDBPyConnection, source: Source, table: str, columns: str, sources_table: str,
    read: Callable[[Source], Sequence[Any]], to_rows: Callable[[str, Sequence[Any]], pa.Table],
) -> FileReport:
    """Ingest one record file into ``table`` (see the module docstring); raises IngestError on bad input."""
    t0 = time.perf_counter()
    sha, _ = source_digest(source)
    if con.execute(f"SELECT count(*) FROM {sources_table} WHERE sha256 = ?", [sha]).fetchall()[0][0]:
        return FileReport(source.uri, "skipped")
    records = read(source)  # everything is read and checked before anything is written
    con.begin()
    try:
        kept = insert_new(con, table, columns, to_rows(source.uri, records))
        con.execute(f"INSERT INTO {sources_table} VALUES (?, ?, ?, ?, now())", [source.uri, sha, len(records), kept])
        con.commit()
    except BaseException:
        con.rollback()
        raise
    return FileReport(source.uri, "ingested", len(records), kept, time.perf_counter() - t0)
