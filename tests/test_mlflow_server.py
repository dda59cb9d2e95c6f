"""The micro pipeline against a real MLflow tracking server (``mlflow server`` in a subprocess).

Everything goes over HTTP as it does for a team's server: runs, metrics with steps, artifacts (through
the server's artifact proxy), the model registry and `lmpipe promote`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from micro import MICRO

from flows.schedule import free_port, stop_process_group, wait_until_healthy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

TRAINING_STAGES = ("ingest", "ngram", "embeddings", "tokenizer", "pretrain", "sft", "reward", "ppo")


@contextlib.contextmanager
def mlflow_server(root: Path, startup_timeout: float = 60.0) -> Iterator[str]:
    """An ``mlflow server`` on a free local port with its store and artifacts under ``root``; killed on exit."""
    root.mkdir(parents=True)
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts")]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_healthy(proc, f"{url}/health", startup_timeout, f"mlflow server (log: {root / 'server.log'})")
            yield url
        finally:
            stop_process_group(proc, timeout=10)


@pytest.mark.timeout(300)
def test_micro_pipeline_against_a_tracking_server(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from flows.pipeline import run_pipeline
    from lmpipe.cli import main
    from lmpipe.tracking import git_info
    from lmpipe.workspace import Workspace

    with mlflow_server(tmp_path / "server") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        ws = Workspace.resolve(tmp_path / "ws")
        overrides = [*MICRO, "tracking.experiment=served", "tracking.register_reward_model=true"]
        out = run_pipeline(str(ws.root), preset="tiny", overrides=overrides)
        client = MlflowClient(url)

        # 1. one parent run, a finished child run per stage, with run metadata
        runs = client.search_runs([client.get_experiment_by_name("served").experiment_id], max_results=100)
        parent = next(r for r in runs if r.data.tags.get("lmpipe.kind") == "pipeline")
        assert parent.info.run_id == out["_run_id"] and parent.info.status == "FINISHED"
        children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert set(TRAINING_STAGES) <= set(children) and len(children) >= 8
        assert all(r.info.status == "FINISHED" for r in children.values())
        tags = parent.data.tags
        assert {"host.cpu_model", "host.cpu_count", "host.memory_gib", "host.gpu_count"} <= set(tags)
        if git_info():
            assert tags["git.commit"] == git_info()["git.commit"] and tags["git.dirty"] in ("true", "false")
        assert parent.data.metrics["wall_seconds"] > 0
        assert {f"stage_seconds.{s}" for s in TRAINING_STAGES} <= set(parent.data.metrics)
        for name in TRAINING_STAGES:
            metrics = children[name].data.metrics
            assert metrics["wall_seconds"] > 0 and metrics["tokens_processed"] > 0, name
            assert out[name]["metrics"]["tokens_processed"] == metrics["tokens_processed"]

        # 2. metrics with steps: the pretraining loss of every step
        pretrain_id = children["pretrain"].info.run_id
        history = client.get_metric_history(pretrain_id, "train_loss")
        assert [m.step for m in history] == list(range(6))  # pretrain.max_steps=6 in MICRO

        # 3. artifacts went through the server's artifact proxy, and come back
        assert children["pretrain"].info.artifact_uri.startswith("mlflow-artifacts:")
        local = client.download_artifacts(pretrain_id, "metrics.json", str(tmp_path))
        assert json.loads(Path(local).read_text())["metrics"]["tokens_trained"] == out["pretrain"]["metrics"][
            "tokens_trained"]
        assert list((tmp_path / "server" / "artifacts").rglob("metrics.json"))

        # 4. the PPO policy is registered, with the alias and its lineage
        version = client.get_model_version_by_alias("lmpipe-policy", "candidate")
        assert version.run_id == out["ppo"]["run_id"] == children["ppo"].info.run_id
        assert version.tags["lmpipe.pipeline_run_id"] == parent.info.run_id
        fingerprint = out["ingest"]["fingerprint"]
        assert version.tags["lmpipe.data_fingerprint"] == fingerprint == tags["lmpipe.data_fingerprint"]
        assert version.tags["lmpipe.cache_key"] == out["ppo"]["cache_key"]
        if git_info():
            assert version.tags["git.commit"] == git_info()["git.commit"]
        files = {Path(a.path).name for a in client.list_artifacts(version.run_id, "model")}
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
        assert tags["lmpipe.registered.ppo"] == f"lmpipe-policy/{version.version}"
        reward = client.get_model_version_by_alias("lmpipe-reward", "candidate")
        assert reward.run_id == out["reward"]["run_id"] and reward.tags["lmpipe.stage"] == "reward"
        assert "model.safetensors" in {Path(a.path).name for a in client.list_artifacts(reward.run_id, "model")}

        # 5. a rerun reuses the ppo stage and its version: no second version
        again = run_pipeline(str(ws.root), preset="tiny", overrides=overrides, only=("ppo",))
        assert again["_statuses"] == {"ppo": "reused"}
        assert [v.version for v in client.search_model_versions("name = 'lmpipe-policy'")] == [version.version]

        # 6. promote moves the production alias; an unknown version is refused, naming the versions
        promoted = CliRunner().invoke(main, ["promote", version.version, "--workspace", str(ws.root)])
        assert promoted.exit_code == 0, promoted.output
        assert client.get_model_version_by_alias("lmpipe-policy", "production").version == version.version
        missing = CliRunner().invoke(main, ["promote", "5", "--workspace", str(ws.root)])
        assert missing.exit_code == 1 and f"(versions: {version.version})" in missing.output
