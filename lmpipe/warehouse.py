"""The DuckDB warehouse: connection handling and the corpus tables.

Tables created here (later stages add their own):

- ``sources``: one row per ingested source (uri, content sha256, bytes, documents kept, ingested_at).
- ``documents``: the cleaned documents with their split; ``object`` names the stdlib object a
  built-in document came from.
- ``drops``: per source and reason, how many documents cleaning and dedup removed.
- ``stdlib_objects``: the built-in corpus's (qualname, kind, module, docstring) rows.
- ``minhash_signatures`` / ``minhash_bands``: MinHash signatures and LSH band keys of kept documents,
  per signature scheme, for near-duplicate checks against documents ingested earlier.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import duckdb

from lmpipe.workspace import Workspace

SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS source_id_seq START 1;
CREATE TABLE IF NOT EXISTS sources (
    source_id   INTEGER PRIMARY KEY,
    uri         VARCHAR NOT NULL,
    sha256      VARCHAR NOT NULL UNIQUE,
    bytes       BIGINT NOT NULL,
    format      VARCHAR NOT NULL,
    read        BIGINT NOT NULL,      -- documents read before cleaning and dedup
    documents   BIGINT NOT NULL,      -- documents kept
    ingested_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    doc_id    BIGINT NOT NULL,
    source_id INTEGER NOT NULL,
    line      INTEGER NOT NULL,       -- line (or record) of the source where the document starts
    text      VARCHAR NOT NULL,
    n_chars   INTEGER NOT NULL,
    n_bytes   INTEGER NOT NULL,
    hash      VARCHAR NOT NULL,       -- md5 of the normalised text: exact-dedup key and split seed
    split     VARCHAR NOT NULL,       -- train | val | test
    object    VARCHAR                 -- qualified name of the stdlib object (built-in corpus only)
);
CREATE TABLE IF NOT EXISTS drops (
    source_id INTEGER NOT NULL,
    reason    VARCHAR NOT NULL,
    count     BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS stdlib_objects (
    qualname  VARCHAR NOT NULL,
    kind      VARCHAR NOT NULL,
    module    VARCHAR NOT NULL,
    docstring VARCHAR NOT NULL,
    doc_hash  VARCHAR NOT NULL,       -- hash of the normalised docstring: joins to documents.hash
    source_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS minhash_signatures (
    scheme VARCHAR NOT NULL,
    doc_id BIGINT NOT NULL,
    sig    UINTEGER[] NOT NULL
);
CREATE TABLE IF NOT EXISTS minhash_bands (
    scheme VARCHAR NOT NULL,
    band   SMALLINT NOT NULL,
    key    UBIGINT NOT NULL,
    doc_id BIGINT NOT NULL
);
"""


@contextlib.contextmanager
def connect(ws: Workspace, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the workspace's warehouse with the corpus schema in place; closed on exit."""
    if read_only and not ws.warehouse.exists():
        raise FileNotFoundError(f"no warehouse at {ws.warehouse}: run `lmpipe ingest` or `lmpipe run` first")
    con = duckdb.connect(str(ws.warehouse), read_only=read_only)
    try:
        if not read_only:
            con.execute(SCHEMA)
        yield con
    finally:
        con.close()


def corpus_fingerprint(con: duckdb.DuckDBPyConnection) -> str:
    """The document count and an XOR of 64-bit md5 prefixes of every (hash, split): changes when the corpus does.

    Order-independent, so it needs no sort (document hashes are unique, so no two terms cancel).
    """
    row = con.sql(
        "SELECT count(*), coalesce(bit_xor(('0x' || substr(md5(hash || split), 1, 16))::UBIGINT), 0) FROM documents"
    ).fetchall()[0]
    return f"{row[0]}-{row[1]:016x}"


def split_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    rows = con.sql("SELECT split, count(*) FROM documents GROUP BY split").fetchall()
    return {s: int(n) for s, n in rows}
