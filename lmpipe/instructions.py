"""Instruction data in the warehouse: the ``instructions`` table, file ingestion and the built-in set.

Table ``instructions``: one (prompt, response) demonstration per row, with its ``source`` and ``split``.
Multi-turn records keep their earlier turns in ``history`` (JSON) and an optional ``system`` message;
``prompt`` is then the last user turn and ``response`` the assistant's answer to it.

User files (JSONL, optionally .gz/.zst, or Parquet) hold records in any of the common shapes:

- Alpaca: ``instruction``, optional ``input`` (appended to the instruction after a blank line), ``output``;
- ``prompt`` and ``response``;
- ``messages``: a list of ``{role, content}`` with roles system (first, optional), user and assistant
  alternating, ending with the assistant.

An optional ``split`` field (train, val or test) pins a record's split; otherwise the split comes from
the md5 of the prompt by the corpus rule (:func:`lmpipe.corpus.split_of`), so every answer to one prompt
lands in the same split. A record with a missing or empty field or an unknown role is an error naming
the file and line (row, for Parquet), and nothing from that file is written: each file is read and
checked completely, then written in one transaction. A file whose content was ingested before is
skipped; exact duplicate conversations are dropped.

The built-in set needs no file: for every documented object of the built-in corpus (``stdlib_objects``)
it asks about the object in a few phrasings and answers with the docstring's first paragraph (its first
sentence when the paragraph is long). Each pair inherits the split of the object's document
(``documents.split`` joined on ``stdlib_objects.doc_hash = documents.hash``), so objects in val and test
are never trained on.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from lmpipe import sources
from lmpipe.chat import Message, check_turns, conversation
from lmpipe.config import IngestConfig
from lmpipe.corpus import split_of, text_hash
from lmpipe.records import FileReport, RecordTable, context_columns, history_messages, parse_messages, text_field
from lmpipe.sources import Source
from lmpipe.workspace import Workspace

BUILTIN_SOURCE = "builtin:python-stdlib-instructions"
SPLITS = ("train", "val", "test")

SCHEMA = """
CREATE TABLE IF NOT EXISTS instructions (
    source   VARCHAR NOT NULL,        -- file URI, or the built-in set's name
    line     INTEGER NOT NULL,        -- line (JSONL) or row (Parquet) of the record; object index (built-in)
    system   VARCHAR,                 -- system message, if any
    history  VARCHAR,                 -- JSON list of earlier {role, content} turns, NULL for one turn
    prompt   VARCHAR NOT NULL,        -- the (last) user turn
    response VARCHAR NOT NULL,        -- the assistant's answer to it
    split    VARCHAR NOT NULL,        -- train | val | test
    hash     VARCHAR NOT NULL,        -- md5 of the whole conversation: exact-dedup key
    object   VARCHAR                  -- stdlib object asked about (built-in set only)
);
"""

# Question phrasings per kind of object; "{name}" is the qualified name.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "function": ("What does `{name}` do?", "Explain `{name}`.", "Describe the function `{name}`.",
                 "What is `{name}` for?"),
    "method": ("What does `{name}` do?", "Explain `{name}`.", "Describe the method `{name}`.",
               "What is `{name}` for?"),
    "class": ("Describe the class `{name}`.", "What is `{name}`?", "Explain `{name}`.",
              "What is the class `{name}` for?"),
    "module": ("What is the `{name}` module for?", "Describe the module `{name}`.", "Explain `{name}`.",
               "What does the module `{name}` provide?"),
    "property": ("What does the property `{name}` hold?", "Explain `{name}`.", "Describe `{name}`.",
                 "What is `{name}`?"),
}


@dataclass(frozen=True)
class Record:
    """One demonstration, validated."""

    line: int
    prompt: str
    response: str
    system: str | None = None
    history: tuple[Message, ...] = ()
    split: str | None = None

    def messages(self) -> list[Message]:
        return conversation(self.prompt, self.response, self.system, self.history)

    def digest(self) -> str:
        turns = [[m.role, m.content] for m in self.messages()]
        return hashlib.md5(json.dumps(turns, ensure_ascii=False).encode("utf-8")).hexdigest()


_COLUMNS = "source, line, system, history, prompt, response, split, hash, object"
TABLE = RecordTable("instructions", "instruction_sources", _COLUMNS, SCHEMA, (BUILTIN_SOURCE,))
connect = TABLE.connect


# ----------------------------------------------------------------------------------------------
# parsing records


def _messages_record(items: Any, line: int, split: str | None) -> Record:
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError("field 'messages' must be a non-empty list of {role, content} objects")
    messages = parse_messages(items)
    check_turns(messages)
    system = messages[0].content if messages[0].role == "system" else None
    turns = messages[1:] if system is not None else messages
    return Record(line, turns[-2].content, turns[-1].content, system, tuple(turns[:-2]), split)


def parse_record(record: Any, line: int) -> Record:
    """A :class:`Record` from one Alpaca, prompt/response or messages record; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    split = record.get("split")
    if split is not None and split not in SPLITS:
        raise ValueError(f"field 'split' must be one of {', '.join(SPLITS)}, got {split!r}")
    if "messages" in record:
        return _messages_record(record["messages"], line, split)
    if "instruction" in record or "output" in record:
        prompt = text_field(record, "instruction")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise ValueError(f"field 'input' must be a string, got {type(extra).__name__}")
        if extra and extra.strip():  # Alpaca leaves "input" empty for self-contained instructions
            prompt = f"{prompt}\n\n{extra.strip()}"
        return Record(line, prompt, text_field(record, "output"), split=split)
    if "prompt" in record or "response" in record:
        return Record(line, text_field(record, "prompt"), text_field(record, "response"), split=split)
    keys = ", ".join(map(str, record)) or "none"
    raise ValueError(f"expected instruction/input/output, prompt/response or messages fields, got: {keys}")


# ----------------------------------------------------------------------------------------------
# reading files


def read_records(source: Source) -> list[Record]:
    """Every record of a JSONL or Parquet file, validated; raises IngestError at the first bad one."""
    return sources.read_records(source, parse_record, "instruction")


# ----------------------------------------------------------------------------------------------
# writing


def _record_split(record: Record, cfg: IngestConfig) -> str:
    return record.split or split_of(text_hash(record.prompt), cfg)


def _rows_table(source: str, records: Sequence[Record], cfg: IngestConfig, objects: Sequence[str | None] = ()
                ) -> pa.Table:
    return pa.table({
        **context_columns(source, records),
        "prompt": pa.array([r.prompt for r in records], pa.string()),
        "response": pa.array([r.response for r in records], pa.string()),
        "split": pa.array([_record_split(r, cfg) for r in records], pa.string()),
        "hash": pa.array([r.digest() for r in records], pa.string()),
        "object": pa.array(list(objects) or [None] * len(records), pa.string()),
    })


def ingest_files(ws: Workspace, specs: Sequence[str], cfg: IngestConfig) -> list[FileReport]:
    """Ingest instruction files (paths, directories or globs), one transaction each; raises IngestError."""
    return TABLE.ingest_files(ws, specs, cfg.fsspec_schemes, read_records,
                              lambda uri, rows: _rows_table(uri, rows, cfg))


# ----------------------------------------------------------------------------------------------
# the built-in set


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`(\"'])")


def summary(docstring: str, max_chars: int) -> str | None:
    """The docstring's first paragraph with its lines joined, or its first sentence when the paragraph is
    longer than ``max_chars``; None when even that is too long, or shorter than three words."""
    paragraph = " ".join(docstring.strip().split("\n\n", 1)[0].split())
    if len(paragraph) > max_chars:
        paragraph = _SENTENCE_END.split(paragraph, 1)[0]
    if len(paragraph) > max_chars or len(paragraph.split()) < 3:
        return None
    return paragraph


def phrasings(kind: str, qualname: str, count: int) -> list[str]:
    """``count`` questions about an object (0: all), the phrasings rotated by a hash of its name."""
    options = PHRASINGS.get(kind, PHRASINGS["function"])
    start = int(hashlib.md5(qualname.encode()).hexdigest()[:8], 16) % len(options)
    rotated = options[start:] + options[:start]
    return [p.format(name=qualname) for p in rotated[: count or len(rotated)]]


def builtin_records(con: duckdb.DuckDBPyConnection, cfg: IngestConfig, per_object: int, max_chars: int
                    ) -> tuple[list[Record], list[str]]:
    """Question-answer records about the documented stdlib objects, and the object of each."""
    rows = con.sql(
        """SELECT o.qualname, o.kind, o.docstring, o.doc_hash, any_value(d.split)
           FROM (SELECT DISTINCT qualname, kind, docstring, doc_hash FROM stdlib_objects) o
           LEFT JOIN documents d ON d.hash = o.doc_hash
           GROUP BY ALL ORDER BY o.qualname, o.kind"""
    ).fetchall()
    records, objects = [], []
    for index, (qualname, kind, docstring, doc_hash, split) in enumerate(rows, start=1):
        answer = summary(docstring, max_chars)
        if answer is None:
            continue
        # a docstring dropped from the corpus (too short, a near-duplicate) has no document: same rule
        split = split or split_of(doc_hash, cfg)
        for question in phrasings(kind, qualname, per_object):
            records.append(Record(index, question, answer, split=split))
            objects.append(qualname)
    return records, objects


def derive_builtin(ws: Workspace, cfg: IngestConfig, per_object: int = 0, max_chars: int = 300
                   ) -> FileReport:
    """Replace the built-in instruction set with one derived from the warehouse's ``stdlib_objects``."""
    t0 = time.perf_counter()
    with connect(ws) as con:
        records, objects = builtin_records(con, cfg, per_object, max_chars)
        rows = _rows_table(BUILTIN_SOURCE, records, cfg, objects) if records else None
        return TABLE.replace_builtin(con, BUILTIN_SOURCE, len(records), rows, t0)


# ----------------------------------------------------------------------------------------------
# reading the table


@dataclass(frozen=True)
class Instruction:
    """A row of the ``instructions`` table."""

    prompt: str
    response: str
    source: str
    split: str
    system: str | None = None
    history: tuple[Message, ...] = ()
    object: str | None = None

    def messages(self, with_response: bool = True) -> list[Message]:
        return conversation(self.prompt, self.response if with_response else None, self.system, self.history)


def load_instructions(ws: Workspace, split: str, builtin: bool = True) -> list[Instruction]:
    """The rows of ``split`` in a stable order (by conversation hash); without the built-in set if asked."""
    rows = TABLE.fetch(ws, """SELECT prompt, response, source, split, system, history, object FROM instructions
                              WHERE split = ? AND {where} ORDER BY hash""", [split], builtin)
    return [Instruction(prompt, response, source, split_, system, history_messages(history), obj)
            for prompt, response, source, split_, system, history, obj in rows]


def counts(ws: Workspace, builtin: bool = True) -> dict[str, int]:
    """Rows per split."""
    rows = TABLE.fetch(ws, "SELECT split, count(*) FROM instructions WHERE {where} GROUP BY split", builtin=builtin)
    return {s: int(n) for s, n in rows}
