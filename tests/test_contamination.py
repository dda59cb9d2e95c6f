"""The test-set contamination check: shingle matching by hand, and leaks planted in a small corpus being caught."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import write_jsonl

from lmpipe import contamination, warehouse
from lmpipe import instructions as ins
from lmpipe import preferences as prefs
from lmpipe.config import IngestConfig, PipelineConfig
from lmpipe.contamination import check_contamination, passage, runs, shingles
from lmpipe.corpus import ingest
from lmpipe.stage import StageResult

TEST_ONLY = IngestConfig(val_fraction=0.0, test_fraction=0.99)  # what these fixtures ingest lands in test ...
TRAIN_ONLY = IngestConfig(val_fraction=0.0, test_fraction=0.0)  # ... or in train

KETTLE = ("Alpha: the silver kettle on the stove began to whistle loudly just as the morning train left the station "
          "yard.")
UMBRELLAS = ("Bravo: seven purple umbrellas stood drying in the hallway after the long storm had finally passed over "
             "our quiet village.")
COMPASS = ("Charlie said the brass compass pointed north, toward the frozen lake where eleven geese rested beside a "
           "broken canoe.")
SHORT = "Delta: a tiny note, twelve words long, that cannot ever be checked."
LIGHTHOUSE = ("Echo: an old lighthouse keeper painted every window blue during the first week of the long and dusty "
              "summer holidays. Much later, the children of the harbour town sang songs about green ships sailing "
              "home across the cold grey sea.")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def ingest_documents(ws, path: Path, cfg: IngestConfig, split: str) -> dict[str, int]:
    """Ingest the lines of ``path`` and check they all landed in ``split``; their doc_id by text."""
    ingest(ws, dataclasses.replace(cfg, sources=(str(path),)), progress=False)
    with warehouse.connect(ws, read_only=True) as con:
        rows = con.execute("SELECT text, doc_id, split FROM documents WHERE source_id = "
                           "(SELECT max(source_id) FROM sources)").fetchall()
    assert {s for _, _, s in rows} == {split}
    return {text: doc_id for text, doc_id, _ in rows}


def example_passages(stage: dict) -> dict[int, str]:
    return {ex["document_id"]: ex["passage"] for ex in stage["examples"]}


# ----------------------------------------------------------------------------------------------
# shingles and runs, by hand


def test_shingles_stay_inside_each_text():
    words = np.array([1, 2, 3, 4, 5, 1, 2, 3, 9, 1, 2], np.uint64)
    hashes, text, position = shingles(words, np.array([5, 4, 2]), 3)
    # text 0 holds 3 windows, text 1 two, text 2 (2 words) none; no window crosses a boundary
    assert text.tolist() == [0, 0, 0, 1, 1] and position.tolist() == [0, 1, 2, 0, 1]
    assert hashes[0] == hashes[3]  # (1, 2, 3) hashes alike wherever it occurs
    assert len(set(hashes.tolist())) == 4  # and differs from every other triple
    reordered, _, _ = shingles(np.array([2, 1, 3], np.uint64), np.array([3]), 3)
    assert reordered[0] != hashes[0]  # word order matters


def test_runs_merge_overlapping_shingles_only():
    doc = np.array([0, 0, 0, 0, 0, 1])
    # 0, 1, 2 overlap: words [0, 5); 5 only touches that run (no matched shingle spans the join), 9 is apart
    position = np.array([0, 1, 2, 5, 9, 0])
    first_doc, first, end = runs(doc, position, 3)
    assert list(zip(first_doc.tolist(), first.tolist(), end.tolist(), strict=True)) == [
        (0, 0, 5), (0, 5, 8), (0, 9, 12), (1, 0, 3)]


def test_passage_is_the_original_text_of_the_words():
    text = "Hello, World!  It's   a (fine) day; isn’t it?"
    assert passage(text, 1, 5) == "World! It's a (fine"  # words 1..4: world, it's, a, fine
    assert passage(text, 0, 8, limit=10) == "Hello, Wor…"


# ----------------------------------------------------------------------------------------------
# the check on a small corpus


@pytest.fixture
def small_corpus(workspace, tmp_path):
    """Five test documents and instruction rows that overlap them in the ways the check must tell apart."""
    ids = ingest_documents(workspace, write_lines(tmp_path / "test.txt", [KETTLE, UMBRELLAS, COMPASS, SHORT,
                                                                          LIGHTHOUSE]), TEST_ONLY, "test")
    rows = [
        # 13 words of KETTLE ("the silver" / "morning train" differ at both ends), one with a soft hyphen inside
        # (which ingestion removes from documents, so the check removes it here too)
        {"prompt": "Tell me a story.", "response": "I recall a sil\u00adver kettle on the stove began to whistle "
                                                   "loudly just as the morning news ended."},
        # 12 words of UMBRELLAS: not enough
        {"prompt": "What did you see?", "response": "We saw seven purple umbrellas stood drying in the hallway "
                                                    "after the long storm, then left."},
        # 13 words of COMPASS, in another case, other punctuation and spacing, in a prompt
        {"prompt": "THE BRASS COMPASS -- POINTED NORTH; toward   the Frozen Lake (where) eleven GEESE rested!",
         "response": "Noted."},
        # all of SHORT: too short to be checked
        {"prompt": "Repeat the note.", "response": SHORT},
        # two separate runs of LIGHTHOUSE, 19 words and 13 words
        {"prompt": "Describe the keeper.", "response": "An old lighthouse keeper painted every window blue during "
                                                       "the first week of the long and dusty summer holidays."},
        {"prompt": "And the children?", "response": "The children of the harbour town sang songs about green ships "
                                                    "sailing home, they say."},
    ]
    ins.ingest_files(workspace, [str(write_jsonl(tmp_path / "ins.jsonl", [r | {"split": "train"} for r in rows]))],
                     TEST_ONLY)
    return workspace, ids


def test_overlaps_of_thirteen_words_are_caught_and_twelve_are_not(small_corpus):
    ws, ids = small_corpus
    result = check_contamination(ws, PipelineConfig(), max_examples=10)
    assert (result["n"], result["test_documents"], result["checked"], result["too_short"]) == (13, 5, 4, 1)
    sft = result["stages"]["sft"]
    assert sft["trained_on"] == "system, history, prompt and response of 6 train rows of instructions"
    assert (sft["contaminated"], sft["share"]) == (3, 0.75)  # of the 4 checkable documents
    assert example_passages(sft) == {
        ids[LIGHTHOUSE]: "an old lighthouse keeper painted every window blue during the first week of the long and "
                         "dusty summer holidays",  # the longer of its two runs, 7 shingles merged into one
        ids[KETTLE]: "silver kettle on the stove began to whistle loudly just as the morning",
        ids[COMPASS]: "the brass compass pointed north, toward the frozen lake where eleven geese rested",
    }
    # longest first, then by document
    assert [ex["document_id"] for ex in sft["examples"]] == [ids[LIGHTHOUSE], ids[KETTLE], ids[COMPASS]]
    ppo = result["stages"]["ppo"]  # PPO reads the prompts only
    assert (ppo["contaminated"], list(example_passages(ppo))) == (1, [ids[COMPASS]])
    for stage in ("ngram", "embeddings", "pretrain"):  # there are no train documents
        assert result["stages"][stage] == {"trained_on": "0 train-split documents", "contaminated": 0, "share": 0.0,
                                           "examples": []}
    assert result["stages"]["reward"]["trained_on"] == "no preferences table: nothing to check"
    json.dumps(result)  # ready for JSON as it is


def test_shorter_shingles_and_fewer_examples(small_corpus):
    ws, ids = small_corpus
    result = check_contamination(ws, PipelineConfig(), n=12, max_examples=1)
    assert result["too_short"] == 0  # SHORT has exactly 12 words
    sft = result["stages"]["sft"]
    assert sft["contaminated"] == 5  # UMBRELLAS' 12 words and all of SHORT count now
    assert list(example_passages(sft)) == [ids[LIGHTHOUSE]]
    with pytest.raises(ValueError, match="n must be >= 1"):
        check_contamination(ws, PipelineConfig(), n=0)


# ----------------------------------------------------------------------------------------------
# a deliberately contaminated corpus


@pytest.fixture
def leaky_corpus(workspace, tmp_path):
    """Test documents; train documents, instructions and preferences, of which one of each leaks."""
    ids = ingest_documents(workspace, write_lines(tmp_path / "test.txt", [KETTLE, UMBRELLAS, COMPASS]), TEST_ONLY,
                           "test")
    train = ["A clean train document about gardens, bees and the slow work of growing tomatoes in a cold spring.",
             "Another clean one: the committee met twice, agreed on nothing and adjourned before lunch was served.",
             # the leak: UMBRELLAS' middle, re-cased and re-punctuated, inside a longer document
             "Weather notes. SEVEN PURPLE UMBRELLAS stood drying in the hallway, after the long storm had finally "
             "passed; then the sun came out.",
             "A last clean document on the history of postage stamps and the people who collected them."]
    ingest_documents(workspace, write_lines(tmp_path / "train.txt", train), TRAIN_ONLY, "train")
    ins.ingest_files(workspace, [str(write_jsonl(tmp_path / "ins.jsonl", [
        {"prompt": "Name a fruit.", "response": "An apple, picked from the old tree behind the barn last autumn."},
        # the leak: KETTLE's passage in an earlier turn of a conversation (SFT reads it, PPO takes no such prompt)
        {"messages": [{"role": "user", "content": "Earlier you said the silver kettle on the stove began to whistle "
                                                  "loudly just as the morning train left."},
                      {"role": "assistant", "content": "I did."},
                      {"role": "user", "content": "Describe a kettle."},
                      {"role": "assistant", "content": "A kettle boils water for tea."}]},
    ]))], TRAIN_ONLY)
    prefs.ingest_files(workspace, [str(write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Where did the compass point?", "chosen": "North.",
         # the leak: COMPASS's passage as a rejected answer (still text the reward model reads)
         "rejected": "Charlie said the brass compass pointed north, toward the frozen lake where eleven geese rested."},
        {"prompt": "Is it raining?", "chosen": "No, the sky is clear.", "rejected": "Maybe."},
    ]))], TRAIN_ONLY)
    return workspace, ids


def test_each_planted_leak_is_caught_in_its_own_stage_only(leaky_corpus, monkeypatch):
    ws, ids = leaky_corpus
    monkeypatch.setattr(contamination, "BATCH_ROWS", 1)  # every text its own batch: the streaming path
    result = check_contamination(ws, PipelineConfig())
    assert (result["test_documents"], result["checked"], result["too_short"]) == (3, 3, 0)
    stages = result["stages"]
    assert list(stages) == ["ngram", "embeddings", "pretrain", "sft", "reward", "ppo"]
    for stage in ("ngram", "embeddings", "pretrain"):
        assert stages[stage]["trained_on"] == "4 train-split documents"
        assert (stages[stage]["contaminated"], stages[stage]["share"]) == (1, 1 / 3)
        assert example_passages(stages[stage]) == {
            ids[UMBRELLAS]: "seven purple umbrellas stood drying in the hallway after the long storm had finally "
                            "passed"}
    assert (stages["reward"]["contaminated"], example_passages(stages["reward"])) == (1, {
        ids[COMPASS]: "Charlie said the brass compass pointed north, toward the frozen lake where eleven geese rested"})
    assert stages["reward"]["trained_on"] == ("system, history, prompt, chosen and rejected of 2 train rows of "
                                              "preferences")
    assert (stages["sft"]["contaminated"], example_passages(stages["sft"])) == (1, {
        ids[KETTLE]: "the silver kettle on the stove began to whistle loudly just as the morning train left"})
    assert stages["ppo"] == {"trained_on": "system and prompt (no responses) of 1 train row of instructions",
                             "contaminated": 0, "share": 0.0, "examples": []}


def test_only_the_stages_that_ran_are_reported(leaky_corpus):
    ws, _ = leaky_corpus
    ran = {s: StageResult(s, "key", "fp", {}, {}) for s in ("ingest", "ngram", "embeddings", "tokenizer")}
    result = check_contamination(ws, PipelineConfig(), results=ran)
    assert list(result["stages"]) == ["ngram", "embeddings"]
    assert result["stages"]["ngram"]["contaminated"] == 1


def test_without_a_warehouse_the_check_says_so(workspace):
    with pytest.raises(FileNotFoundError, match="no warehouse"):
        check_contamination(workspace, PipelineConfig())
