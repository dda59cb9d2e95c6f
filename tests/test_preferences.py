"""The preferences table: file ingestion in both shapes, errors that name file and line, the built-in pairs."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_jsonl

from lmpipe import preferences as prefs
from lmpipe import warehouse
from lmpipe.chat import Message
from lmpipe.config import IngestConfig
from lmpipe.corpus import split_of, text_hash
from lmpipe.sources import IngestError

CFG = IngestConfig(val_fraction=0.3, test_fraction=0.3)


def table_rows(ws) -> list[tuple]:
    with warehouse.connect(ws, read_only=True) as con:
        return con.sql("SELECT source, line, system, history, prompt, chosen, rejected, split, pair_type, group_id "
                       "FROM preferences ORDER BY source, line").fetchall()


def msgs(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


def test_both_record_shapes_are_ingested(workspace, tmp_path):
    records = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "split": "val"},
        # whole dialogues sharing a prompt prefix: the prefix is the prompt, the last turns the answers
        {"chosen": msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Name a fruit"),
                        ("assistant", "Apple")),
         "rejected": msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Name a fruit"),
                          ("assistant", "Carrot"))},
        {"chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris.",
         "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Lyon, I think."},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    (report,) = prefs.ingest_files(workspace, [str(path)], CFG)
    assert (report.status, report.records, report.kept) == ("ingested", 3, 3)
    # a separate prompt (string or messages) before answer-only message lists, as many datasets store them
    separate = {"prompt": "Capital of France?", "chosen": msgs(("assistant", "Paris.")),
                "rejected": msgs(("assistant", "Lyon, I think."))}
    assert prefs.parse_record(separate, 1) == prefs.parse_record(records[2], 1)
    as_messages = {**separate, "prompt": msgs(("user", "Capital of France?"))}
    assert prefs.parse_record(as_messages, 1) == prefs.parse_record(records[2], 1)
    rows = table_rows(workspace)
    uri = str(path.resolve())
    assert rows[0][:9] == (uri, 1, None, None, "What is 2+2?", "4", "5", "val", "file")
    history = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert rows[1][:7] == (uri, 2, "Be brief.", history, "Name a fruit", "Apple", "Carrot")
    assert rows[2][4:8] == ("Capital of France?", "Paris.", "Lyon, I think.",
                            split_of(text_hash("Capital of France?"), CFG))
    assert len({r[9] for r in rows}) == 3  # one group per prompt
    assert prefs.ingest_files(workspace, [str(path)], CFG)[0].status == "skipped"
    (pair,) = [p for s in prefs.SPLITS for p in prefs.load_pairs(workspace, s) if p.line == 2]
    assert pair.prompt_messages() == [Message("system", "Be brief."), Message("user", "Hi"),
                                      Message("assistant", "Hello"), Message("user", "Name a fruit")]


def test_parquet_and_duplicates(workspace, tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["a", "a", "b"], "chosen": ["x", "x", "y"], "rejected": ["z", "z", "w"]}), path)
    (report,) = prefs.ingest_files(workspace, [str(path)], CFG)
    assert (report.records, report.kept) == (3, 2)  # the exact duplicate is dropped
    assert prefs.counts(workspace)[split_of(text_hash("a"), CFG)] >= 1


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "tie: chosen and rejected are the same answer"),
    ({"prompt": "Q", "chosen": " ", "rejected": "B"}, "field 'chosen' is empty"),
    ({"prompt": "", "chosen": "A", "rejected": "B"}, "field 'prompt' is empty"),
    ({"chosen": "A", "rejected": "B"}, "missing field 'prompt'"),
    ({"prompt": "Q", "chosen": "A"}, "expected prompt/chosen/rejected fields, got: prompt, chosen"),
    ({"chosen": msgs(("user", "Q1"), ("assistant", "A")), "rejected": msgs(("user", "Q2"), ("assistant", "B"))},
     "must share every turn but the last; they differ at turn 1"),
    ({"chosen": msgs(("user", "Q"), ("assistant", "A")), "rejected": msgs(("user", "Q"), ("assistant", "A"))},
     "tie"),
    ({"chosen": msgs(("user", "Q"), ("bot", "A")), "rejected": msgs(("user", "Q"), ("assistant", "B"))},
     "field 'chosen': message 2 has unknown role 'bot'"),
    ({"chosen": "Human: Q\n\nAssistant: A", "rejected": "Human: Q\n\nAssistant: "}, "field 'rejected': message 2"),
    ({"prompt": "Q", "chosen": "A", "rejected": "B", "split": "dev"}, "field 'split' must be one of train, val, test"),
    ("{not json", "malformed JSON"),
])
def test_a_bad_record_names_file_and_line_and_writes_nothing(workspace, tmp_path, record, message):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "Fine", "chosen": "Yes", "rejected": "No"}])
    prefs.ingest_files(workspace, [str(good)], CFG)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "P1", "chosen": "C1", "rejected": "R1"},
                                               {"prompt": "P2", "chosen": "C2", "rejected": "R2"}, record])
    with pytest.raises(IngestError, match=message) as info:
        prefs.ingest_files(workspace, [str(bad)], CFG)
    assert info.value.path == str(bad.resolve()) and info.value.line == 3
    assert str(info.value).startswith(f"{bad.resolve()}:3: ")
    assert [r[4] for r in table_rows(workspace)] == ["Fine"]  # the good records of bad.jsonl are not written


def test_bad_parquet_row_is_named(workspace, tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", "y"]}), path)
    with pytest.raises(IngestError, match=r"bad\.parquet: row 2: tie"):
        prefs.ingest_files(workspace, [str(path)], CFG)
    assert table_rows(workspace) == []


# ----------------------------------------------------------------------------------------------
# built-in pairs


def obj(qualname: str, summary: str, split: str = "train", module: str | None = None) -> prefs.StdlibObject:
    return prefs.StdlibObject(0, qualname, "function", module or qualname.rsplit(".", 1)[0], summary, split)


def test_truncate_and_shuffle():
    rng = random.Random(0)
    text = "Return a new list containing all items from the iterable"
    cut = prefs.truncate(text, rng)
    assert text.startswith(cut) and 3 <= len(cut.split()) <= 7  # 30-70% of the 10 words
    shuffled = prefs.shuffle_words(text, rng)
    assert shuffled != text and sorted(shuffled.split()) == sorted(text.split())
    assert prefs.truncate("Too few words", rng) is None and prefs.shuffle_words("a a a", rng) is None


def test_corrupted_pairs_rotate_kinds_and_draw_hard_negatives_from_the_same_split():
    objects = [
        obj("json.dumps", "Serialize an object to a JSON formatted string."),
        obj("pickle.dumps", "Return the pickled representation of the object as bytes."),
        obj("json.loads", "Deserialize a string holding a JSON document to an object."),
        obj("json.load", "Deserialize a file holding a JSON document.", split="test"),
    ]
    pairs = prefs.corrupted_pairs(objects, ("hard_negative", "truncated", "shuffled"), seed=1)
    by_object = {p.object: p for p in pairs}
    assert [by_object[o.qualname].pair_type for o in objects[:3]] == ["hard_negative", "truncated", "shuffled"]
    # same short name first ("dumps" in pickle), then the same module; never across splits
    assert by_object["json.dumps"].rejected == "Return the pickled representation of the object as bytes."
    assert objects[1].summary.startswith(by_object["pickle.dumps"].rejected)
    assert sorted(by_object["json.loads"].rejected.split()) == sorted(objects[2].summary.split())
    # json.load is alone in the test split: no hard negative, so it falls back to the next kind (truncated)
    assert by_object["json.load"].pair_type == "truncated" and by_object["json.load"].split == "test"
    for p, o in zip(pairs, objects, strict=True):
        assert (p.chosen, p.prompt, p.group_id) == (o.summary, o.question(), f"corrupted:{o.qualname}")
    assert prefs.corrupted_pairs(objects, ("hard_negative", "truncated", "shuffled"), seed=1) == pairs


def test_rank_answers_by_hand():
    reference = "join path components"
    answers = ["join path components", "join two paths", "something else", "something else"]
    # token F1 with the reference: 1; "join two paths" shares "join": P = R = 1/3, F1 = 1/3; then 0 and 0
    pairs = prefs.rank_answers(answers, reference)
    assert pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]  # answers 2 and 3 tie (and are equal): no pair


def test_ranked_pairs_group_all_comparisons_of_a_prompt():
    objects = [obj("os.path.join", "Join two or more pathname components.", split="val"),
               obj("os.getcwd", "Return the current working directory.")]

    def sampler(prompts, k):
        assert prompts == [o.question() for o in objects] and k == 3
        return [["Join pathname components.", "Join two paths.", "Print a file."],
                ["Return the directory.", "Return the directory.", ""]]

    pairs = prefs.ranked_pairs(objects, sampler, 3)
    first = [p for p in pairs if p.object == "os.path.join"]
    assert [(p.chosen, p.rejected) for p in first] == [
        ("Join pathname components.", "Join two paths."), ("Join pathname components.", "Print a file."),
        ("Join two paths.", "Print a file.")]
    assert {(p.group_id, p.split, p.pair_type) for p in first} == {("ranked:os.path.join", "val", "ranked")}
    # the second prompt's answers tie or are empty: no pairs
    assert not [p for p in pairs if p.object == "os.getcwd"]


def add_objects(ws, objects: list[tuple[str, str, str, str | None]]) -> None:
    """(qualname, module, docstring, split of its document or None for no document) into the corpus tables."""
    with warehouse.connect(ws) as con:
        for i, (qualname, module, doc, split) in enumerate(objects, start=1):
            h = text_hash(doc)
            con.execute("INSERT INTO stdlib_objects VALUES (?, 'function', ?, ?, ?, 1)", [qualname, module, doc, h])
            if split is not None:
                con.execute("INSERT INTO documents VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)",
                            [i, i, doc, len(doc), len(doc.encode()), h, split, qualname])


def test_builtin_pairs_inherit_the_split_of_the_document_and_replace_older_ones(workspace):
    add_objects(workspace, [
        ("json.dumps", "json", "Serialize obj to a JSON formatted str.\n\nLong details.", "val"),
        ("json.loads", "json", "Deserialize a str instance containing a JSON document.", "train"),
        ("os.sep", "os", "Tiny.", "train"),  # under three words: no summary, no pair
        ("os.path.join", "os.path", "Join two or more pathname components.", None),  # dropped from the corpus
    ])
    objects = prefs.stdlib_objects(workspace, CFG)
    assert [(o.qualname, o.split) for o in objects] == [
        ("json.dumps", "val"), ("json.loads", "train"),
        ("os.path.join", split_of(text_hash("Join two or more pathname components."), CFG))]
    pairs = prefs.corrupted_pairs(objects, ("truncated",))
    report = prefs.replace_source(workspace, prefs.CORRUPTED_SOURCE, pairs, CFG)
    assert (report.status, report.kept) == ("derived", 3)
    again = prefs.replace_source(workspace, prefs.CORRUPTED_SOURCE, pairs, CFG)  # replaced, not appended
    assert again.kept == 3 and sum(v for k, v in prefs.counts(workspace).items() if k in prefs.SPLITS) == 3
    (val,) = prefs.load_pairs(workspace, "val")
    assert (val.object, val.chosen, val.pair_type) == ("json.dumps", "Serialize obj to a JSON formatted str.",
                                                      "truncated")
    assert prefs.load_pairs(workspace, "val", builtin=False) == []


def test_ingest_command_reads_preference_files_and_names_bad_lines(workspace, tmp_path):
    from click.testing import CliRunner

    from lmpipe import cli

    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B", "split": "test"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "A"}])
    args = ["ingest", "--kind", "preferences", "--workspace", str(workspace.root)]
    run = CliRunner().invoke(cli.main, [*args, str(good)])
    assert run.exit_code == 0, run.output
    assert "1 read, 1 kept" in run.output and "preferences: test 1" in run.output
    run = CliRunner().invoke(cli.main, [*args, str(bad)])
    assert run.exit_code != 0 and f"{bad.resolve()}:1: tie" in run.output


def test_ranked_prompts_oversample_the_heldout_splits():
    objects = [obj(f"m.f{i}", "Return the value of it.", split="train" if i < 90 else ("val" if i < 95 else "test"))
               for i in range(100)]
    chosen = prefs.choose_ranked_objects(objects, 20, seed=0)
    splits = [o.split for o in chosen]
    assert (splits.count("val"), splits.count("test"), splits.count("train")) == (4, 4, 12)
    assert prefs.choose_ranked_objects(objects, 20, seed=0) == chosen and len({o.qualname for o in chosen}) == 20
    assert len(prefs.choose_ranked_objects(objects[88:], 20)) == 10  # 4 val, 4 test and the only 2 train
