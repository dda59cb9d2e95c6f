"""Stage cache keys: the modules a stage imports (found, not listed), why a key changed, and the run plan."""

from __future__ import annotations

import importlib
import sys

import pytest

from lmpipe import pipeline
from lmpipe.config import load_config
from lmpipe.pipeline import Step, plan
from lmpipe.stage import NOT_RESULTS, code_modules, code_version, key_changes


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A throwaway package: ``a`` imports ``b`` at the top and ``c`` inside a function; ``d`` stands alone."""
    root = tmp_path / "pkgx"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from pkgx import b\n\n\ndef later():\n    from .c import thing\n    return thing\n")
    (root / "b.py").write_text("from pkgx.plot import draw\nVALUE = 1\n")
    (root / "c.py").write_text("thing = 2\n")
    (root / "d.py").write_text("import pkgx.a\n")
    (root / "plot.py").write_text("def draw():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield root
    for name in [m for m in sys.modules if m == "pkgx" or m.startswith("pkgx.")]:
        del sys.modules[name]


def test_imports_are_followed_through_modules_and_functions(package):
    assert code_modules(["pkgx.a"], frozenset()) == ["pkgx.a", "pkgx.b", "pkgx.c", "pkgx.plot"]
    assert code_modules(["pkgx.a"], frozenset({"pkgx.plot"})) == ["pkgx.a", "pkgx.b", "pkgx.c"]
    assert code_modules(["pkgx.d"], frozenset()) == ["pkgx.a", "pkgx.b", "pkgx.c", "pkgx.d", "pkgx.plot"]


def test_editing_an_imported_module_changes_the_version_and_others_do_not(package):
    leave_out = frozenset({"pkgx.plot"})
    before = code_version(["pkgx.a"], leave_out)
    (package / "d.py").write_text("import pkgx.a  # not imported by a\n")
    (package / "plot.py").write_text("def draw():\n    return 1\n")
    assert code_version(["pkgx.a"], leave_out) == before
    (package / "c.py").write_text("thing = 3\n")  # imported only inside a function
    assert code_version(["pkgx.a"], leave_out) != before


def test_every_stage_is_keyed_on_the_modules_it_runs():
    modules = {stage.name: set(code_modules([stage.run.__module__, *stage.code])) for stage in pipeline.STAGES}
    assert {"lmpipe.ngram_sorted", "lmpipe.ngram_count", "lmpipe.arpa"} <= modules["ngram"]
    assert {"lmpipe.word2vec", "lmpipe.nnlm", "lmpipe.rnnlm"} <= modules["embeddings"]
    assert {"lmpipe.bpe", "lmpipe.shards"} <= modules["tokenizer"]
    assert {"lmpipe.gpt", "lmpipe.trainer", "lmpipe.checkpoint"} <= modules["pretrain"]
    for name in ("sft", "reward", "ppo"):  # the intervals and the record tables they report and read
        assert {"lmpipe.bootstrap", "lmpipe.records", "lmpipe.gpt"} <= modules[name], name
    assert {"lmpipe.rl", "lmpipe.reward", "lmpipe.preferences"} <= modules["ppo"]
    assert "lmpipe.gpt" not in modules["ngram"] and "lmpipe.ppo" not in modules["sft"]
    assert all(not (m & NOT_RESULTS) for m in modules.values())


def test_key_changes_name_the_config_values_inputs_and_modules():
    before = {"config": {"lr": 0.002, "max_steps": 300, "seed": 1}, "inputs": {"ngram": "a", "ingest": "x"},
              "code": {"lmpipe.gpt": "1", "lmpipe.trainer": "2"}, "external": "e"}
    assert key_changes(before, before) == []
    now = {"config": {"lr": 0.001, "max_steps": 300, "seed": 1}, "inputs": {"ngram": "b", "ingest": "x"},
           "code": {"lmpipe.gpt": "1", "lmpipe.trainer": "3", "lmpipe.rl": "4"}, "external": "f"}
    assert key_changes(before, now) == [
        "config: lr 0.002 -> 0.001",
        "input: ngram produced a different result",
        "code: lmpipe.rl, lmpipe.trainer changed",
        "external inputs changed (files, or rows ingested outside the pipeline)",
    ]
    many = {**before, "config": {"lr": 1, "max_steps": 2, "seed": 3, "new": 4}}
    assert key_changes(before, many)[0] == 'config: lr 0.002 -> 1, max_steps 300 -> 2, new null -> 4 and 1 more'


def test_the_plan_says_what_a_run_would_do_and_why(micro_run):
    ws, _, overrides = micro_run
    cfg = load_config("tiny", (), overrides)
    actions = {s.stage: (s.action, s.reasons) for s in plan(ws, cfg)}
    assert {a for a, _ in actions.values()} == {"reuse"}  # just ran: everything is cached

    changed_cfg = load_config("tiny", (), [*overrides, "ngram.add_k=0.5"])
    changed = {s.stage: (s.action, s.reasons) for s in plan(ws, changed_cfg)}
    assert changed["ingest"] == ("reuse", ()) and changed["tokenizer"] == ("reuse", ())
    assert changed["ngram"] == ("run", ("config: add_k 1.0 -> 0.5",))
    assert changed["embeddings"] == ("maybe", ("runs unless ngram reproduces its last result",))
    assert changed["pretrain"] == ("reuse", ())  # does not read the n-gram models
    assert changed["report"][0] == "maybe" and "ngram" in changed["report"][1][0]

    forced = {s.stage: s.action for s in plan(ws, cfg, force=("sft",))}
    assert forced["sft"] == "run" and forced["pretrain"] == "reuse"
    assert forced["reward"] == forced["ppo"] == forced["report"] == "run"
    only = {s.stage: s for s in plan(ws, cfg, only=("reward",))}
    assert only["reward"].action == "reuse" and only["sft"] == Step("sft", "skip", ("its last result is used",))
