"""The one module that talks to MLflow.

Uses an explicit :class:`mlflow.MlflowClient` with run ids (not the fluent API, whose global per-thread
state does not mix with orchestrated tasks). MLflow is imported lazily so that importing lmpipe stays
cheap and works where MLflow is absent.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmpipe import __version__
from lmpipe.workspace import Workspace

MAX_PARAM_CHARS = 6000


def resolve_tracking_uri(ws: Workspace, configured: str | None = None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else a SQLite store inside the workspace."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or ws.mlflow_uri


def git_info(path: Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the checkout that holds lmpipe's code, when it is a git checkout."""
    where = str(path or Path(__file__).resolve().parent.parent)
    try:
        commit = subprocess.run(
            ["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


def system_info() -> dict[str, str]:
    info = {
        "host.platform": platform.platform(),
        "host.python": platform.python_version(),
        "host.cpu_count": str(os.cpu_count()),
        "lmpipe.version": __version__,
    }
    try:
        import torch

        info["host.torch"] = torch.__version__
        if torch.cuda.is_available():
            info["host.gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


class RunLogger:
    """Logs to one MLflow run; implements :class:`lmpipe.stage.Logger`."""

    def __init__(self, client: Any, run_id: str):
        self.client = client
        self.run_id = run_id

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step or 0) for k, v in values.items() if v is not None and math.isfinite(float(v))
        ]
        # MLflow stores no infinities; record them as a tag so "perplexity is infinite" is not lost.
        for k, v in values.items():
            if v is not None and not math.isfinite(float(v)):
                self.client.set_tag(self.run_id, f"metric.{k}", str(v))
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def params(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, _param_value(v)) for k, v in values.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def tags(self, values: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        if values:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), subdir)
        else:
            self.client.log_artifact(self.run_id, str(path), subdir)

    def text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= MAX_PARAM_CHARS else s[: MAX_PARAM_CHARS - 3] + "..."


class Tracker:
    """Creates the experiment and the runs of one workspace."""

    def __init__(self, ws: Workspace, experiment: str = "lmpipe", tracking_uri: str | None = None):
        from mlflow import MlflowClient

        self.ws = ws
        self.uri = resolve_tracking_uri(ws, tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if not self.uri.startswith(("http://", "https://", "databricks")):
            # a local store keeps artifacts in the workspace, not in ./mlartifacts of whatever the current dir is
            self.ws.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
            location = self.ws.mlflow_artifacts.as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def start_run(self, name: str, parent: RunLogger | None = None, tags: Mapping[str, str] | None = None) -> RunLogger:
        all_tags = dict(tags or {})
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return RunLogger(self.client, run.info.run_id)

    def run_url(self, run_id: str) -> str:
        return f"{self.uri} experiment {self.experiment_id} run {run_id}"

    def get_run(self, run_id: str) -> Any:
        return self.client.get_run(run_id)

    def search_runs(self, filter_string: str = "", max_results: int = 100) -> list[Any]:
        return self.client.search_runs([self.experiment_id], filter_string, max_results=max_results)
