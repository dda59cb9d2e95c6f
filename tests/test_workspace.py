"""Workspace resolution, the write lock, atomic writes, and the library's independence from orchestration."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmpipe.workspace import ENV_VAR, Workspace, WorkspaceBusy, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert Workspace.resolve().root == (tmp_path / "data" / "workspace").resolve()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from-env"))
    assert Workspace.resolve().root == (tmp_path / "from-env").resolve()
    assert Workspace.resolve(tmp_path / "explicit").root == (tmp_path / "explicit").resolve()


def test_workspace_cannot_be_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        Workspace.resolve(f)


def test_two_workspaces_do_not_share_state(tmp_path):
    a, b = Workspace.resolve(tmp_path / "a"), Workspace.resolve(tmp_path / "b")
    assert a.warehouse != b.warehouse and a.mlflow_uri != b.mlflow_uri and a.prefect_home != b.prefect_home


HOLD = """
import sys, time
from lmpipe.workspace import Workspace
with Workspace.resolve(sys.argv[1]).lock(0, purpose="holder"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_lock_refuses_then_waits_for_another_process(workspace):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workspace.root), "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkspaceBusy, match=rf"pid {holder.pid} .*\(holder\).*--wait"), workspace.lock(0):
            pass
        t0 = time.monotonic()
        with workspace.lock(wait=30):  # queues behind the holder instead of failing
            waited = time.monotonic() - t0
        assert waited > 0.5
    finally:
        holder.kill()
        holder.wait()


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_text(target, json.dumps({"a": 1}))
    atomic_write_text(target, json.dumps({"a": 2}))
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_library_imports_neither_prefect_nor_mlflow():
    """lmpipe/ is pure: importing every module pulls in no orchestration or tracking package."""
    modules = sorted(p.stem for p in (ROOT / "lmpipe").glob("*.py") if p.stem not in {"__init__", "__main__"})
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n    importlib.import_module('lmpipe.' + m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'prefect', 'mlflow'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
