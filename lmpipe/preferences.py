"""Preference data in the warehouse: the ``preferences`` table, file ingestion and the built-in pairs.

Table ``preferences``: one comparison per row, a ``prompt`` (the last user turn; earlier turns in
``history`` as JSON, an optional ``system`` message) and two answers to it, ``chosen`` preferred over
``rejected``. ``pair_type`` says where the pair came from and ``group_id`` ties together the pairs
that compare answers to one prompt, so training batches keep them together (InstructGPT, Ouyang et al.
2022, arXiv:2203.02155, sec. 3.5: all K-choose-2 comparisons of a prompt form one batch element).

User files (JSONL, optionally .gz/.zst, or Parquet) hold records in either of the common shapes:

- ``prompt``, ``chosen``, ``rejected`` strings;
- ``chosen`` and ``rejected`` as whole dialogues sharing a prompt prefix: lists of ``{role, content}``
  messages, or strings in the ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` form. The shared prefix becomes
  the prompt and the differing final assistant turns the two answers. An optional ``prompt`` (a string or
  messages) is prepended to both, so answer-only message lists after a separate prompt work too.

An optional ``split`` field pins a record's split; otherwise the md5 of the prompt decides it by the corpus
rule (:func:`lmpipe.corpus.split_of`). Ties (chosen equal to rejected), empty fields, unknown roles and
dialogues whose prefixes differ are errors naming the file and line, and nothing from that file is
written: each file is read and checked completely, then written in one transaction.

The built-in pairs need no file and no network:

(a) corrupted negatives, for every documented stdlib object (``stdlib_objects``): the question is one of
    :mod:`lmpipe.instructions`' phrasings, the chosen answer the object's true summary, the rejected one
    either the summary of a different object from the same module or with the same short name (a hard
    negative), or the true summary truncated, or its words shuffled;
(b) ranked model samples: the SFT model answers a prompt K times and an automatic labeler ranks the answers
    by grounded overlap (token F1, :mod:`lmpipe.grounded`) with the true summary. The labeler stands in
    for the human rankers of InstructGPT: it rewards answers that reproduce the reference's content, which
    is what the human labels would reward on this data, but it cannot judge fluency or helpfulness beyond
    word overlap. Every pair of differently scored answers becomes a pair (K-choose-2 at most), all in one
    group.

Every built-in pair inherits the split of the object's document, as the instruction set does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from lmpipe import grounded, sources
from lmpipe.chat import Message, check_turns
from lmpipe.config import IngestConfig
from lmpipe.corpus import split_of, text_hash
from lmpipe.instructions import phrasings, summary
from lmpipe.records import FileReport, RecordTable, context_columns, history_messages, parse_messages, text_field
from lmpipe.sources import Source
from lmpipe.workspace import Workspace

SPLITS = ("train", "val", "test")
CORRUPTED_SOURCE = "builtin:python-stdlib-corrupted"
RANKED_SOURCE = "builtin:python-stdlib-ranked"
BUILTIN_SOURCES = (CORRUPTED_SOURCE, RANKED_SOURCE)
CORRUPTIONS = ("hard_negative", "truncated", "shuffled")
PAIR_TYPES = (*CORRUPTIONS, "ranked", "file")
FAMILIES = {"hard_negative": "corrupted", "truncated": "corrupted", "shuffled": "corrupted", "ranked": "ranked",
            "file": "file"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS preferences (
    source    VARCHAR NOT NULL,       -- file URI, or the built-in set's name
    line      INTEGER NOT NULL,       -- line (JSONL) or row (Parquet) of the record; object index (built-in)
    system    VARCHAR,                -- system message, if any
    history   VARCHAR,                -- JSON list of earlier {role, content} turns, NULL for one turn
    prompt    VARCHAR NOT NULL,       -- the (last) user turn
    chosen    VARCHAR NOT NULL,       -- the preferred answer
    rejected  VARCHAR NOT NULL,       -- the other answer
    split     VARCHAR NOT NULL,       -- train | val | test
    pair_type VARCHAR NOT NULL,       -- hard_negative | truncated | shuffled | ranked | file
    group_id  VARCHAR NOT NULL,       -- pairs answering the same prompt share it
    hash      VARCHAR NOT NULL,       -- md5 of (conversation, chosen, rejected): exact-dedup key
    object    VARCHAR                 -- stdlib object asked about (built-in pairs only)
);
"""


@dataclass(frozen=True)
class Pair:
    """One comparison: ``chosen`` is preferred to ``rejected`` as the answer to the conversation so far."""

    prompt: str
    chosen: str
    rejected: str
    pair_type: str = "file"
    group_id: str = ""
    split: str | None = None
    system: str | None = None
    history: tuple[Message, ...] = ()
    line: int = 0
    object: str | None = None

    def prompt_messages(self) -> list[Message]:
        """The conversation up to and including the prompt (what both answers respond to)."""
        return [*([Message("system", self.system)] if self.system else []), *self.history, Message("user", self.prompt)]

    def context_digest(self) -> str:
        turns = [[m.role, m.content] for m in self.prompt_messages()]
        return hashlib.md5(json.dumps(turns, ensure_ascii=False).encode("utf-8")).hexdigest()

    def digest(self) -> str:
        key = json.dumps([self.context_digest(), self.chosen, self.rejected], ensure_ascii=False)
        return hashlib.md5(key.encode("utf-8")).hexdigest()


_COLUMNS = "source, line, system, history, prompt, chosen, rejected, split, pair_type, group_id, hash, object"
TABLE = RecordTable("preferences", "preference_sources", _COLUMNS, SCHEMA, BUILTIN_SOURCES)
connect = TABLE.connect


# ----------------------------------------------------------------------------------------------
# parsing records


_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant|System):[ \t]?")
_SPEAKERS = {"Human": "user", "Assistant": "assistant", "System": "system"}


def _is_dialogue(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, str) and bool(_TURN.match(value.strip())))


def dialogue_messages(value: Any, key: str, plain_role: str = "assistant") -> list[Message]:
    """Messages from a ``{role, content}`` list, a ``"Human: ... Assistant: ..."`` string, or a plain string
    (one message of ``plain_role``); roles and contents are checked, the order of turns is not."""
    if isinstance(value, str) and not _is_dialogue(value):
        return [Message(plain_role, text_field({key: value}, key))]
    if isinstance(value, str):
        parts = _TURN.split(value.strip())
        if parts[0].strip() or len(parts) < 3:
            raise ValueError(f"field {key!r}: a dialogue string must consist of 'Human:' / 'Assistant:' turns")
        items = [{"role": _SPEAKERS[s], "content": c} for s, c in zip(parts[1::2], parts[2::2], strict=True)]
    elif isinstance(value, (list, tuple)) and value:
        items = list(value)
    else:
        raise ValueError(f"field {key!r} must be a string or a non-empty list of {{role, content}} messages")
    return parse_messages(items, f"field {key!r}: ")


def _dialogues(record: dict) -> tuple[list[Message], list[Message]]:
    """Both whole dialogues of a record: ``chosen`` and ``rejected`` after the ``prompt`` turns, if any.

    Covers full dialogues without a prompt, and a prompt (string or messages) followed by answer-only turns.
    """
    prompt = record.get("prompt")
    context = [] if prompt is None else dialogue_messages(prompt, "prompt", plain_role="user")
    out = []
    for key in ("chosen", "rejected"):
        messages = [*context, *dialogue_messages(record[key], key)]
        try:
            check_turns(messages)
        except ValueError as exc:
            raise ValueError(f"field {key!r}: {exc}") from None
        out.append(messages)
    return out[0], out[1]


def split_dialogues(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], str, str]:
    """The shared prompt prefix of two dialogues and their differing final assistant turns."""
    if chosen[:-1] != rejected[:-1]:
        turn = next(i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False), start=1) if a != b)
        raise ValueError(f"chosen and rejected dialogues must share every turn but the last; they differ at turn {turn}"
                         if turn < min(len(chosen), len(rejected)) else
                         "chosen and rejected dialogues must have the same number of turns")
    return chosen[:-1], chosen[-1].content, rejected[-1].content


def parse_record(record: Any, line: int) -> Pair:
    """A :class:`Pair` from a prompt/chosen/rejected record or two dialogues; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    split = record.get("split")
    if split is not None and split not in SPLITS:
        raise ValueError(f"field 'split' must be one of {', '.join(SPLITS)}, got {split!r}")
    if "chosen" not in record or "rejected" not in record:
        raise ValueError(f"expected prompt/chosen/rejected fields, got: {', '.join(map(str, record)) or 'none'}")
    if not any(_is_dialogue(record[k]) for k in ("chosen", "rejected")):
        prompt, context = text_field(record, "prompt"), []
        chosen, rejected = text_field(record, "chosen"), text_field(record, "rejected")
    else:
        context, chosen, rejected = split_dialogues(*_dialogues(record))
        prompt, context = context[-1].content, context[:-1]
    if chosen == rejected:
        raise ValueError("tie: chosen and rejected are the same answer")
    system = context[0].content if context and context[0].role == "system" else None
    history = tuple(context[1:] if system is not None else context)
    pair = Pair(prompt, chosen, rejected, "file", split=split, system=system, history=history, line=line)
    return pair


# ----------------------------------------------------------------------------------------------
# reading files


def read_pairs(source: Source) -> list[Pair]:
    """Every pair of a JSONL or Parquet file, validated; raises IngestError at the first bad record."""
    return sources.read_records(source, parse_record, "preference")


# ----------------------------------------------------------------------------------------------
# writing


def _rows_table(source: str, pairs: Sequence[Pair], cfg: IngestConfig) -> pa.Table:
    return pa.table({
        **context_columns(source, pairs),
        "prompt": pa.array([p.prompt for p in pairs], pa.string()),
        "chosen": pa.array([p.chosen for p in pairs], pa.string()),
        "rejected": pa.array([p.rejected for p in pairs], pa.string()),
        "split": pa.array([p.split or split_of(text_hash(p.prompt), cfg) for p in pairs], pa.string()),
        "pair_type": pa.array([p.pair_type for p in pairs], pa.string()),
        "group_id": pa.array([p.group_id or p.context_digest() for p in pairs], pa.string()),
        "hash": pa.array([p.digest() for p in pairs], pa.string()),
        "object": pa.array([p.object for p in pairs], pa.string()),
    })


def ingest_files(ws: Workspace, specs: Sequence[str], cfg: IngestConfig) -> list[FileReport]:
    """Ingest preference files (paths, directories or globs), one transaction each; raises IngestError."""
    return TABLE.ingest_files(ws, specs, cfg.fsspec_schemes, read_pairs, lambda uri, rows: _rows_table(uri, rows, cfg))


def replace_source(ws: Workspace, source: str, pairs: Sequence[Pair], cfg: IngestConfig) -> FileReport:
    """Replace the rows of a built-in ``source`` by ``pairs`` in one transaction."""
    t0 = time.perf_counter()
    with connect(ws) as con:
        return TABLE.replace_builtin(con, source, len(pairs), _rows_table(source, pairs, cfg) if pairs else None, t0)


# ----------------------------------------------------------------------------------------------
# the built-in pairs


@dataclass(frozen=True)
class StdlibObject:
    """A documented stdlib object with a usable summary, and the split of its document."""

    index: int
    qualname: str
    kind: str
    module: str
    summary: str
    split: str

    @property
    def short_name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]

    def question(self) -> str:
        return phrasings(self.kind, self.qualname, 1)[0]


def stdlib_objects(ws: Workspace, cfg: IngestConfig, max_chars: int = 300) -> list[StdlibObject]:
    """Documented stdlib objects of the warehouse whose summary has at least three words, by qualified name."""
    with connect(ws, read_only=True) as con:
        rows = con.sql(
            """SELECT o.qualname, o.kind, o.module, o.docstring, o.doc_hash, any_value(d.split)
               FROM (SELECT DISTINCT qualname, kind, module, docstring, doc_hash FROM stdlib_objects) o
               LEFT JOIN documents d ON d.hash = o.doc_hash
               GROUP BY ALL ORDER BY o.qualname, o.kind"""
        ).fetchall()
    out = []
    for index, (qualname, kind, module, docstring, doc_hash, split) in enumerate(rows, start=1):
        text = summary(docstring, max_chars)
        if text is not None:  # an object dropped from the corpus gets its split by the same rule
            out.append(StdlibObject(index, qualname, kind, module, text, split or split_of(doc_hash, cfg)))
    return out


def truncate(text: str, rng: random.Random) -> str | None:
    """The first 30-70% of the words of ``text`` (None for fewer than four words)."""
    words = text.split()
    if len(words) < 4:
        return None
    keep = max(1, min(len(words) - 1, round(len(words) * rng.uniform(0.3, 0.7))))
    return " ".join(words[:keep])


def shuffle_words(text: str, rng: random.Random) -> str | None:
    """The words of ``text`` in a random different order (None when no other order exists)."""
    words = text.split()
    if len(set(words)) < 3:
        return None
    for _ in range(10):
        order = words[:]
        rng.shuffle(order)
        if order != words:
            return " ".join(order)
    return None


def hard_negative(obj: StdlibObject, same_name: Sequence[StdlibObject], same_module: Sequence[StdlibObject],
                  rng: random.Random) -> str | None:
    """The summary of another object with the same short name, else of another object of the same module."""
    for pool in (same_name, same_module):
        candidates = [o.summary for o in pool if o.qualname != obj.qualname and o.summary != obj.summary]
        if candidates:
            return rng.choice(candidates)
    return None


def corrupted_pairs(objects: Sequence[StdlibObject], kinds: Sequence[str] = CORRUPTIONS, seed: int = 0
                    ) -> list[Pair]:
    """One corrupted-negative pair per object; the corruption rotates over ``kinds`` by the object's position.

    Hard negatives are drawn from the object's own split, so no held-out summary is trained on. An object
    for which its corruption is impossible (too short to truncate, no sibling) tries the next kind.
    """
    if not kinds:
        return []
    by_module: dict[tuple[str, str], list[StdlibObject]] = defaultdict(list)
    by_name: dict[tuple[str, str], list[StdlibObject]] = defaultdict(list)
    for o in objects:
        by_module[(o.split, o.module)].append(o)
        by_name[(o.split, o.short_name)].append(o)
    pairs = []
    for i, obj in enumerate(objects):
        rng = random.Random(f"{seed}:{obj.qualname}")
        corrupt: dict[str, Callable[[], str | None]] = {
            "hard_negative": lambda o=obj, r=rng: hard_negative(o, by_name[(o.split, o.short_name)],
                                                               by_module[(o.split, o.module)], r),
            "truncated": lambda o=obj, r=rng: truncate(o.summary, r),
            "shuffled": lambda o=obj, r=rng: shuffle_words(o.summary, r),
        }
        for kind in [*kinds[i % len(kinds):], *kinds[: i % len(kinds)]]:
            rejected = corrupt[kind]()
            if rejected is not None and rejected != obj.summary:
                pairs.append(Pair(obj.question(), obj.summary, rejected, kind, f"corrupted:{obj.qualname}",
                                  obj.split, line=obj.index, object=obj.qualname))
                break
    return pairs


def rank_answers(answers: Sequence[str], reference: str) -> list[tuple[int, int]]:
    """(better, worse) index pairs of ``answers`` ranked by token F1 with ``reference`` (the automatic labeler).

    Answers with equal scores or equal text are not compared; the result holds at most K-choose-2 pairs.
    """
    scores = [grounded.token_f1(a, reference) for a in answers]
    pairs = []
    for i, j in itertools.combinations(range(len(answers)), 2):
        if scores[i] == scores[j] or answers[i].strip() == answers[j].strip():
            continue
        pairs.append((i, j) if scores[i] > scores[j] else (j, i))
    return pairs


Sampler = Callable[[Sequence[str], int], list[list[str]]]  # (prompts, k) -> k answers per prompt


def ranked_pairs(objects: Sequence[StdlibObject], sample: Sampler, k: int) -> list[Pair]:
    """K sampled answers per object's question, ranked by the labeler, as pairs grouped per prompt."""
    answers = sample([o.question() for o in objects], k)
    pairs = []
    for obj, texts in zip(objects, answers, strict=True):
        texts = [t.strip() for t in texts]
        for better, worse in rank_answers(texts, obj.summary):
            if texts[better] and texts[worse]:  # an empty answer cannot be a stored response
                pairs.append(Pair(obj.question(), texts[better], texts[worse], "ranked", f"ranked:{obj.qualname}",
                                  obj.split, line=obj.index, object=obj.qualname))
    return pairs


HELDOUT_SHARE = 0.2  # of the ranked prompts, per held-out split


def choose_ranked_objects(objects: Sequence[StdlibObject], count: int, seed: int = 0) -> list[StdlibObject]:
    """``count`` objects for ranked sampling, at random within each split: a fifth from val, a fifth from test
    and the rest from train. The held-out splits are oversampled (they hold a tenth of the objects) so that the
    ranked pairs' held-out accuracy rests on more than a handful of prompts."""
    if count <= 0 or not objects:
        return []
    rng = random.Random(seed)
    chosen: list[StdlibObject] = []
    for split in ("val", "test", "train"):
        pool = [o for o in objects if o.split == split]
        want = count - len(chosen) if split == "train" else round(count * HELDOUT_SHARE)
        chosen += rng.sample(pool, min(want, len(pool)))
    return sorted(chosen, key=lambda o: o.qualname)


# ----------------------------------------------------------------------------------------------
# reading the table


def load_pairs(ws: Workspace, split: str, builtin: bool = True) -> list[Pair]:
    """The pairs of ``split`` in a stable order (by group, then pair hash); without the built-in pairs if asked."""
    rows = TABLE.fetch(ws, """SELECT prompt, chosen, rejected, pair_type, group_id, split, system, history, line, object
                              FROM preferences WHERE split = ? AND {where} ORDER BY group_id, hash""", [split], builtin)
    return [Pair(prompt, chosen, rejected, pair_type, group, split_, system, history_messages(history), line, obj)
            for prompt, chosen, rejected, pair_type, group, split_, system, history, line, obj in rows]


def counts(ws: Workspace, builtin: bool = True) -> dict[str, int]:
    """Rows per split and per (split, pair type), as ``{"train": n, "train_ranked": m, ...}``."""
    rows = TABLE.fetch(ws, "SELECT split, pair_type, count(*) FROM preferences WHERE {where} GROUP BY ALL",
                       builtin=builtin)
    out: dict[str, int] = defaultdict(int)
    for split, pair_type, n in rows:
        out[split] += int(n)
        out[f"{split}_{pair_type}"] += int(n)
    return dict(out)
