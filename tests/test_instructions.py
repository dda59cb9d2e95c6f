"""The instructions table: file ingestion in every shape, errors that name file and line, the built-in set."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_jsonl

from lmpipe import instructions as ins
from lmpipe import warehouse
from lmpipe.chat import Message
from lmpipe.config import IngestConfig
from lmpipe.corpus import split_of, text_hash
from lmpipe.sources import IngestError

CFG = IngestConfig(val_fraction=0.3, test_fraction=0.3)


def table_rows(ws) -> list[tuple]:
    with warehouse.connect(ws, read_only=True) as con:
        return con.sql("SELECT source, line, system, history, prompt, response, split FROM instructions "
                       "ORDER BY source, line").fetchall()


def test_every_record_shape_is_ingested(workspace, tmp_path):
    f = write_jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        "",  # blank lines are skipped but still counted
        {"prompt": "Capital of France?", "response": "Paris."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Sum 1+1?"},
                      {"role": "assistant", "content": "2"}]},
        {"prompt": "Pinned", "response": "to test", "split": "test"},
    ])
    reports = ins.ingest_files(workspace, [str(f)], CFG)
    assert [(r.status, r.records, r.kept) for r in reports] == [("ingested", 5, 5)]
    rows = table_rows(workspace)
    uri = str(f.resolve())
    assert [r[:2] for r in rows] == [(uri, 1), (uri, 2), (uri, 4), (uri, 5), (uri, 6)]
    assert rows[0][4:6] == ("Add the numbers.\n\n2 and 3", "5")  # Alpaca input follows a blank line
    assert rows[1][4:6] == ("Say hi.", "Hi!")  # an empty Alpaca input is allowed
    system, history, prompt, response = rows[3][2:6]
    assert (system, prompt, response) == ("Be brief.", "Sum 1+1?", "2")
    assert json.loads(history) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert rows[4][6] == "test"
    for row in rows[:4]:  # the split is the corpus rule applied to the prompt's md5
        assert row[6] == split_of(text_hash(row[4]), CFG)

    again = ins.ingest_files(workspace, [str(f)], CFG)
    assert again[0].status == "skipped" and len(table_rows(workspace)) == 5


def test_parquet_and_duplicates(workspace, tmp_path):
    path = tmp_path / "chat.parquet"
    messages = pa.array([[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
                         [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
                         [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]])
    pq.write_table(pa.table({"messages": messages}), path)
    (report,) = ins.ingest_files(workspace, [str(path)], CFG)
    assert (report.records, report.kept) == (3, 2)  # the repeated conversation is stored once
    assert [(r[1], r[4], r[5]) for r in table_rows(workspace)] == [(1, "Q1", "A1"), (3, "Q2", "A2")]


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "Q"}, "missing field 'response'"),
    ({"prompt": "Q", "response": "  "}, "field 'response' is empty"),
    ({"instruction": "", "output": "x"}, "field 'instruction' is empty"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]},
     "message 2 has unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant"}]}, "message 2: missing field 'content'"),
    ({"messages": [{"role": "user", "content": "Q"}]}, "ends with an assistant turn"),
    ({"text": "plain"}, "expected instruction/input/output, prompt/response or messages fields, got: text"),
    ({"prompt": "Q", "response": "A", "split": "dev"}, "field 'split' must be one of train, val, test"),
    ("{not json", "malformed JSON"),
])
def test_a_bad_record_names_file_and_line_and_writes_nothing(workspace, tmp_path, record, message):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "Fine", "response": "Yes"}])
    ins.ingest_files(workspace, [str(good)], CFG)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "P1", "response": "R1"}, {"prompt": "P2", "response": "R2"},
                                               record])
    with pytest.raises(IngestError, match=message) as info:
        ins.ingest_files(workspace, [str(bad)], CFG)
    assert info.value.path == str(bad.resolve()) and info.value.line == 3
    assert str(info.value).startswith(f"{bad.resolve()}:3: ")
    assert [r[4] for r in table_rows(workspace)] == ["Fine"]  # the two good records of bad.jsonl are not written


def test_bad_parquet_row_is_named(workspace, tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["x", ""]}), path)
    with pytest.raises(IngestError, match=r"bad\.parquet: row 2: field 'response' is empty"):
        ins.ingest_files(workspace, [str(path)], CFG)
    with warehouse.connect(workspace, read_only=True) as con:
        assert con.sql("SELECT count(*) FROM instructions").fetchall()[0][0] == 0


def test_summary_and_phrasings():
    doc = "Return the sum\nof the values.\n\nMore detail that is not used."
    assert ins.summary(doc, 100) == "Return the sum of the values."
    long = "Return the sum. " + "Then do many other things " * 10
    assert ins.summary(long, 60) == "Return the sum."  # a long paragraph falls back to its first sentence
    assert ins.summary("Too short.", 100) is None and ins.summary("word " * 40, 50) is None
    asked = ins.phrasings("function", "json.dumps", 0)
    assert sorted(asked) == sorted(p.format(name="json.dumps") for p in ins.PHRASINGS["function"])
    assert ins.phrasings("function", "json.dumps", 2) == asked[:2]
    assert "Describe the class `collections.Counter`." in ins.phrasings("class", "collections.Counter", 0)


def add_objects(ws, objects: list[tuple[str, str, str, str | None]]) -> None:
    """(qualname, kind, docstring, split of its document or None for no document) into the corpus tables."""
    with warehouse.connect(ws) as con:
        for i, (qualname, kind, doc, split) in enumerate(objects, start=1):
            h = text_hash(doc)
            con.execute("INSERT INTO stdlib_objects VALUES (?, ?, ?, ?, ?, 1)", [qualname, kind, "m", doc, h])
            if split is not None:
                con.execute("INSERT INTO documents VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)",
                            [i, i, doc, len(doc), len(doc.encode()), h, split, qualname])


def test_builtin_set_inherits_the_split_of_the_document(workspace):
    add_objects(workspace, [
        ("json.dumps", "function", "Serialize obj to a JSON formatted str.\n\nLong details.", "val"),
        ("collections.Counter", "class", "Dict subclass for counting hashable items.", "train"),
        ("os.sep", "property", "Tiny.", "train"),  # under three words: no answer, no question
        ("os.path.join", "function", "Join two or more pathname components.", None),  # dropped from the corpus
    ])
    report = ins.derive_builtin(workspace, CFG, per_object=2, max_chars=200)
    assert report.status == "derived" and report.kept == 6
    rows = {(r.object, r.prompt): r for s in ins.SPLITS for r in ins.load_instructions(workspace, s)}
    by_object = {}
    for (obj, _), r in rows.items():
        by_object.setdefault(obj, set()).add((r.split, r.response))
    assert by_object["json.dumps"] == {("val", "Serialize obj to a JSON formatted str.")}
    assert by_object["collections.Counter"] == {("train", "Dict subclass for counting hashable items.")}
    expected = split_of(text_hash("Join two or more pathname components."), CFG)
    assert by_object["os.path.join"] == {(expected, "Join two or more pathname components.")}
    assert "os.sep" not in by_object
    assert {p for o, p in rows if o == "json.dumps"} == set(ins.phrasings("function", "json.dumps", 2))

    again = ins.derive_builtin(workspace, CFG, per_object=2, max_chars=200)  # replaced, not appended
    assert again.kept == 6 and sum(ins.counts(workspace).values()) == 6


def test_loading_without_the_builtin_set(workspace, tmp_path):
    add_objects(workspace, [("json.dumps", "function", "Serialize obj to a JSON formatted str.", "train")])
    ins.derive_builtin(workspace, CFG, per_object=1)
    f = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "P", "response": "R", "split": "train"}])
    ins.ingest_files(workspace, [str(f)], CFG)
    assert len(ins.load_instructions(workspace, "train")) == 2
    (only,) = ins.load_instructions(workspace, "train", builtin=False)
    assert (only.prompt, only.response, only.source) == ("P", "R", str(f.resolve()))
    assert only.messages() == [Message("user", "P"), Message("assistant", "R")]
    before = ins.TABLE.fingerprint(workspace, builtin=False)
    assert ins.TABLE.fingerprint(workspace, builtin=False, exclude=[str(f.resolve())]) == "0-"
    assert before.startswith("1-") and ins.counts(workspace, builtin=False) == {"train": 1}


def test_cli_ingests_instruction_files(workspace, tmp_path):
    from click.testing import CliRunner

    from lmpipe.cli import main

    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "P", "response": "R", "split": "val"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "P2", "response": "R2"}, {"messages": [
        {"role": "user", "content": "Q"}, {"role": "robot", "content": "A"}]}])
    run = CliRunner().invoke(main, ["ingest", "--kind", "instructions", str(good), "--workspace", str(workspace.root)])
    assert run.exit_code == 0, run.output
    assert f"{good.resolve()}: 1 read, 1 kept" in run.output and "instructions: val 1" in run.output
    run = CliRunner().invoke(main, ["ingest", "--kind", "instructions", str(bad), "--workspace", str(workspace.root)])
    assert run.exit_code == 1 and f"{bad.resolve()}:2: message 2 has unknown role 'robot'" in run.output
    assert ins.counts(workspace) == {"val": 1}
