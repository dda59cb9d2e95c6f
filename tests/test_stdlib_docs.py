"""Tests for lmpipe.stdlib_docs, the harvester of the standard library's docstrings."""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmpipe import stdlib_docs
from lmpipe.stdlib_docs import KINDS, DocObject, HarvestError, harvest, python_fingerprint

REPO = Path(__file__).resolve().parents[1]
# posixpath and genericpath are listed on purpose: their objects must still come out once, named os.path.*.
SMALL = ["json", "collections", "functools", "os", "os.path", "posixpath", "genericpath"]


@pytest.fixture(scope="module")
def small() -> list[DocObject]:
    return harvest(SMALL)


@pytest.fixture(scope="module")
def full() -> list[DocObject]:
    return harvest()


def by_name(rows: list[DocObject]) -> dict[str, DocObject]:
    return {row.qualname: row for row in rows}


def check_well_formed(rows: list[DocObject]) -> None:
    names = [row.qualname for row in rows]
    assert names == sorted(names)
    assert len(set(names)) == len(names), "duplicate qualnames"
    for row in rows:
        assert row.kind in KINDS
        assert row.docstring and row.docstring == row.docstring.strip()
        assert row.qualname == row.module or row.qualname.startswith(row.module + ".")
        if row.kind == "module":
            assert row.qualname == row.module
        local = row.qualname[len(row.module) + 1 :].split(".") if row.kind != "module" else []
        assert not any(part.startswith("_") for part in local), row.qualname  # no dunder or private members
        assert not any(part.startswith("__") for part in row.qualname.split(".")), row.qualname


def test_small_harvest_known_objects(small: list[DocObject]) -> None:
    rows = by_name(small)
    assert rows["json.dumps"].kind == "function"
    assert rows["json.dumps"].module == "json"
    assert rows["json.dumps"].docstring.startswith("Serialize")
    assert rows["json"].kind == "module"
    assert rows["collections.Counter"].kind == "class"
    assert rows["collections.Counter.most_common"].kind == "method"
    assert rows["collections.Counter.most_common"].module == "collections"


def test_small_harvest_is_well_formed(small: list[DocObject]) -> None:
    check_well_formed(small)
    assert {row.kind for row in small} == set(KINDS)


def test_os_path_is_named_as_users_import_it_and_emitted_once(small: list[DocObject]) -> None:
    names = [row.qualname for row in small]
    assert names.count("os.path.join") == 1
    assert by_name(small)["os.path.join"].kind == "function"
    assert "os.path" in names  # the module row, under the alias rather than posixpath
    assert "os.path.exists" in names  # defined in genericpath, credited to os.path
    assert "posixpath" not in names  # the same module object as os.path
    # genericpath was asked for and keeps its module docstring, but its functions are os.path's.
    assert not [name for name in names if name.split(".")[0] in ("posixpath", "genericpath") and name != "genericpath"]
    assert "posix" not in {row.module for row in small}


def test_c_implemented_objects_are_credited_to_their_public_module(small: list[DocObject]) -> None:
    rows = by_name(small)
    assert rows["functools.reduce"].kind == "function"  # __module__ is _functools
    assert rows["os.open"].kind == "function"  # __module__ is posix
    assert rows["collections.deque"].kind == "class"
    assert rows["collections.deque.append"].kind == "method"
    assert rows["collections.deque.maxlen"].kind == "property"  # a C getset descriptor
    assert rows["collections.ChainMap.parents"].kind == "property"
    assert rows["collections.OrderedDict.fromkeys"].kind == "method"  # a classmethod


def test_members_are_own_documented_and_not_inherited(small: list[DocObject]) -> None:
    names = {row.qualname for row in small}
    assert "collections.Counter.keys" not in names  # inherited from dict
    assert "collections.OrderedDict.setdefault" not in names  # same docstring as dict.setdefault
    assert not [name for name in names if "__" in name]
    assert not [row for row in small if row.docstring in ("Return repr(self).", "Return str(self).")]


def test_harvest_is_deterministic(small: list[DocObject]) -> None:
    assert harvest(SMALL) == small


def test_module_list_is_exact() -> None:
    rows = by_name(harvest(["json"]))
    assert "json.dumps" in rows
    # JSONEncoder belongs to json.encoder: a partial harvest must not rename what a full one names differently.
    assert not [name for name in rows if name.startswith("json.encoder") or name == "json.JSONEncoder"]
    assert "json.encoder.JSONEncoder" in by_name(harvest(["json", "json.encoder"]))


def test_unimportable_and_side_effect_modules_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lmpipe.stdlib_docs"):
        rows = harvest(["this", "antigravity", "no_such_module_for_lmpipe", "json"])
    assert {row.module for row in rows} == {"json"}
    warned = caplog.text
    assert "no_such_module_for_lmpipe" in warned and "this" in warned and "antigravity" in warned


def test_child_stdout_cannot_be_polluted() -> None:
    # What the harvested modules print, from Python or C, must not reach the JSON lines.
    code = (
        "import os, lmpipe.stdlib_docs as m\n"
        "out = m._claim_stdout()\n"
        "print('noise'); os.write(1, b'more noise')\n"
        "out.write('clean\\n'); out.flush()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "clean\n"


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="the per-import guard needs SIGALRM")
def test_import_guard_survives_hanging_and_exiting_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lmpipe_hangs_on_import.py").write_text("import time\ntime.sleep(30)\n", encoding="utf-8")
    (tmp_path / "lmpipe_exits_on_import.py").write_text("raise SystemExit(3)\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    started = time.monotonic()
    module, why = stdlib_docs._import_guarded("lmpipe_hangs_on_import", 0.3)
    assert module is None and "timed out" in why
    assert time.monotonic() - started < 10
    module, why = stdlib_docs._import_guarded("lmpipe_exits_on_import", 5)
    assert module is None and why.startswith("SystemExit")
    assert "lmpipe_hangs_on_import" not in sys.modules and "lmpipe_exits_on_import" not in sys.modules


def test_invalid_arguments() -> None:
    with pytest.raises(TypeError):
        harvest("json")
    with pytest.raises(ValueError):
        harvest(["--facts"])
    assert harvest([]) == []


def test_missing_python_raises_clear_error() -> None:
    with pytest.raises(HarvestError, match="cannot start Python interpreter.*no-such-python"):
        harvest(["json"], python="/nonexistent/no-such-python")
    with pytest.raises(HarvestError, match="no-such-python"):
        python_fingerprint("/nonexistent/no-such-python")


@pytest.mark.skipif(shutil.which("false") is None, reason="needs a `false` command")
def test_failing_child_raises_clear_error() -> None:
    with pytest.raises(HarvestError, match="exited with status 1"):
        harvest(["json"], python=shutil.which("false"))


def test_timeout_raises_clear_error() -> None:
    with pytest.raises(HarvestError, match="timed out"):
        harvest(timeout=0.05)


def test_full_harvest(full: list[DocObject]) -> None:
    check_well_formed(full)
    assert len(full) > 3000
    rows = by_name(full)
    assert rows["json.dumps"].docstring.startswith("Serialize")
    assert rows["collections.Counter"].kind == "class"
    assert rows["collections.Counter.most_common"].kind == "method"
    assert rows["os.path.join"].kind == "function"
    assert rows["builtins.len"].kind == "function"
    assert rows["io.open"].kind == "function" and "builtins.open" not in rows  # one object, one name
    assert rows["collections.abc.Mapping"].kind == "class"  # defined in _collections_abc
    assert "posixpath.join" not in rows and "posix.open" not in rows
    tops = {row.module.split(".")[0] for row in full}
    assert not tops & {"test", "idlelib", "turtledemo", "this", "antigravity"}
    assert not [row.module for row in full if any(part.startswith("test") for part in row.module.split("."))]
    assert {"os", "json", "asyncio", "email", "xml", "sys", "builtins"} <= tops


def test_fingerprint() -> None:
    fingerprint = python_fingerprint()
    version = ".".join(map(str, sys.version_info[:3]))
    assert re.fullmatch(rf"{sys.implementation.name}-{re.escape(version)}[a-z0-9]*-[0-9a-f]{{12}}", fingerprint)
    assert python_fingerprint() == fingerprint
    assert python_fingerprint(sys.executable) == fingerprint  # same interpreter seen from a child


def other_interpreter() -> str | None:
    """Another usable CPython 3.8+ on PATH, to check the child runs on versions other than this one."""
    for minor in (8, 9, 10, 12, 13, 11):
        path = shutil.which(f"python3.{minor}")
        if not path:
            continue
        try:
            done = subprocess.run(
                [path, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip() not in ("", str(sys.version_info[:2])):
            return path
    return None


def test_other_interpreter() -> None:
    python = other_interpreter()
    if python is None:
        pytest.skip("no other CPython 3.8+ on PATH")
    rows = by_name(harvest(["json", "collections"], python=python))
    assert rows["json.dumps"].docstring.startswith("Serialize")
    assert rows["collections.Counter.most_common"].kind == "method"
    assert python_fingerprint(python) != python_fingerprint()


def test_module_imports_only_the_standard_library() -> None:
    # The module's source is the child's program, run where lmpipe and its dependencies are not importable.
    tree = ast.parse(Path(stdlib_docs.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported - {"__future__"} <= set(sys.stdlib_module_names)


def test_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lmpipe.stdlib_docs", "json"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert records[-1]["end"] is True and records[-1]["rows"] == len(records) - 1
    assert "json.dumps" in {record["qualname"] for record in records[:-1]}
