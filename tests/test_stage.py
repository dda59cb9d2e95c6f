"""The code part of a stage's cache key: the modules a stage imports, found rather than listed."""

from __future__ import annotations

import importlib
import sys

import pytest

from lmpipe import pipeline
from lmpipe.stage import NOT_RESULTS, code_modules, code_version


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
