"""Scheduled retraining against a real ``prefect server``: served on an interval, and run by a process worker.

The served schedule uses the server that `lmpipe schedule` starts itself; the work pool lives on a
server started here, as a team's would. Both tests start from a copy of the session's micro workspace
(every stage already ran), so the scheduled run must reuse every stage; the MLflow runs tagged with
the Prefect flow run's id say so. Every process started here gets its own Prefect home and is stopped
with its process group; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WAIT = 120  # seconds: the longest wait for a flow run (starting Python with torch on a loaded 2-core machine)


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    from flows.schedule import local_prefect_server

    with local_prefect_server(tmp_path_factory.mktemp("prefect-server"), timeout=90, ui=False) as url:
        yield url


def _api(url: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _flow_runs(url: str, deployment: str) -> list[dict]:
    body = {"deployments": {"name": {"any_": [deployment]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 50}
    return _api(url, "/flow_runs/filter", body)


def _env(url: str | None, home: Path | None) -> dict[str, str]:
    """A child's environment: this server (or none), its own Prefect home (or the workspace's), quick polling."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env |= {"PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_LOGGING_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    return env | ({"PREFECT_API_URL": url} if url else {}) | ({"PREFECT_HOME": str(home)} if home else {})


def _workspace_copy(micro_run, tmp_path):
    from lmpipe.workspace import Workspace

    ws, _, overrides = micro_run
    shutil.copytree(ws.root, tmp_path / "ws")
    return Workspace.resolve(tmp_path / "ws"), overrides


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): a worker starts its flow runs in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _stop(proc: subprocess.Popen) -> None:
    from flows.schedule import stop_process_group

    below = _descendants(proc.pid)
    stop_process_group(proc)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _assert_every_stage_reused(ws, overrides: list[str], flow_run_id: str) -> None:
    """The pipeline run of this flow run recorded a child run per stage, each a reuse of the cached result."""
    from lmpipe import pipeline
    from lmpipe.config import load_config
    from lmpipe.tracking import Tracker

    tracker = Tracker(ws, load_config("tiny", overrides=overrides).tracking.experiment)
    tagged = tracker.search_runs(f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    parents = [r for r in tagged if r.data.tags.get("lmpipe.kind") == "pipeline"]
    assert len(parents) == 1, [(r.info.run_name, r.info.status, r.data.tags.get("lmpipe.kind")) for r in tagged]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = tracker.search_runs(f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    reused = {c.info.run_name: c.data.tags.get("lmpipe.reused") for c in children}
    assert reused == {stage.name: "true" for stage in pipeline.STAGES}, {
        c.info.run_name: c.data.tags.get("lmpipe.cache_key") for c in children}


def _server_url(log: Path, proc: subprocess.Popen, deadline: float) -> str:
    """The API address of the server that ``lmpipe schedule`` started, from the line where it prints it."""
    while True:
        found = re.search(r"Prefect UI: (http://127\.0\.0\.1:\d+)", _tail(log, 100_000))
        if found:
            return found.group(1) + "/api"
        assert proc.poll() is None, f"lmpipe schedule exited with code {proc.returncode}:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"lmpipe schedule started no Prefect server:\n{_tail(log)}"
        time.sleep(0.5)


def test_served_interval_schedule_runs_and_reuses_every_stage(micro_run, tmp_path):
    """As a user starts it: no PREFECT_API_URL, so `lmpipe schedule` starts a server for the workspace."""
    ws, overrides = _workspace_copy(micro_run, tmp_path)
    log = tmp_path / "serve.log"
    env = _env(None, None)  # Prefect's home is the workspace's, as for `lmpipe run`
    cmd = [sys.executable, "-m", "lmpipe.cli", "schedule", "--interval", "5", "--workspace", str(ws.root),
           *_sets(overrides)]
    proc = _start(cmd, env, log)
    try:
        deadline = time.monotonic() + WAIT
        url = _server_url(log, proc, deadline)
        while True:
            assert proc.poll() is None, f"lmpipe schedule exited with code {proc.returncode}:\n{_tail(log)}"
            runs = _flow_runs(url, "retrain-ws")
            bad = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
            assert not bad, f"{bad[0]['state_name']}: {bad[0]['state']['message']}\n{_tail(log)}"
            done = [r for r in runs if r["state_type"] == "COMPLETED"]
            if done:
                break
            assert time.monotonic() < deadline, f"no scheduled run completed in {WAIT} s: {runs}\n{_tail(log)}"
            time.sleep(1)
    finally:
        _stop(proc)  # the server it started goes with it
    run = done[0]
    assert run["auto_scheduled"]  # created by the schedule, not by hand
    assert run["parameters"]["workspace"] == str(ws.root)
    _assert_every_stage_reused(ws, overrides, run["id"])
    assert (ws.prefect_home / "prefect.db").exists()  # the server's database lives in the workspace


def test_work_pool_deployment_runs_on_a_process_worker(api_url, micro_run, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.schedule import deploy
    from lmpipe.config import load_config

    ws, overrides = _workspace_copy(micro_run, tmp_path)
    env = _env(api_url, tmp_path / "client-home")
    pool = "lmpipe-test"

    # a pool that does not exist is named, with the command that creates it
    with temporary_settings({PREFECT_API_URL: api_url}), pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_API_URL", api_url)
        with pytest.raises(RuntimeError, match=f"prefect work-pool create {pool} --type process"):
            deploy(ws, load_config("tiny"), pool, cron="0 3 * * 0")

    create = [sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type", "process"]
    subprocess.run(create, env=env, check=True, capture_output=True, timeout=60)
    cmd = [sys.executable, "-m", "lmpipe.cli", "schedule", "--pool", pool, "--cron", "0 3 * * 0",
           "--workspace", str(ws.root), "--name", "retrain-pooled", *_sets(overrides)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"prefect worker start --pool {pool}" in done.stdout

    deployment = _api(api_url, "/deployments/name/lmpipe-pipeline/retrain-pooled")
    assert deployment["work_pool_name"] == pool
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 0"]
    flow_run = _api(api_url, f"/deployments/{deployment['id']}/create_flow_run", {})

    log = tmp_path / "worker.log"
    worker = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--run-once", "--limit", "1"]
    proc = _start(worker, env, log)
    try:
        proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not finish its run in {WAIT} s:\n{_tail(log)}")
    finally:
        _stop(proc)
    state = _api(api_url, f"/flow_runs/{flow_run['id']}")
    assert state["state_type"] == "COMPLETED", f"{state['state_name']}: {state['state']['message']}\n{_tail(log)}"
    _assert_every_stage_reused(ws, overrides, flow_run["id"])
