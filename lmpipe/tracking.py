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
from dataclasses import asdict, dataclass
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


def _cpu_model() -> str:
    """The CPU's marketing name where the OS tells it, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    """Physical memory in GiB, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):
        return None


def system_info() -> dict[str, str]:
    """Host, CPU (model, cores), memory, GPUs (name, count) and library versions, as run tags."""
    info = {
        "host.platform": platform.platform(),
        "host.python": platform.python_version(),
        "host.cpu_model": _cpu_model(),
        "host.cpu_count": str(os.cpu_count()),
        "lmpipe.version": __version__,
    }
    memory = _memory_gib()
    if memory is not None:
        info["host.memory_gib"] = f"{memory:.1f}"
    try:
        import torch

        info["host.torch"] = torch.__version__
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        info["host.gpu_count"] = str(count)
        if count:
            info["host.gpu"] = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(count)}))
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
        self.registry = Registry(self.client)

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


# ----------------------------------------------------------------------------------------------
# the model registry

MODEL_ARTIFACT = "model"  # where a stage run keeps its model folder among its artifacts


class UnknownModelVersion(LookupError):
    """A registered model, or a version of it, that the registry does not hold."""


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered version: where it came from (run, source, lineage tags) and the aliases on it."""

    name: str
    version: str
    run_id: str
    source: str
    aliases: tuple[str, ...]
    tags: dict[str, str]
    created_at: float  # seconds since the epoch

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Registry:
    """Registers stage models in the MLflow model registry, lists their versions and moves aliases."""

    def __init__(self, client: Any):
        self.client = client

    @classmethod
    def connect(cls, uri: str) -> Registry:
        from mlflow import MlflowClient

        return cls(MlflowClient(tracking_uri=uri, registry_uri=uri))

    def register(self, name: str, run_id: str, model_dir: Path, alias: str = "",
                 tags: Mapping[str, str] | None = None) -> tuple[ModelVersionInfo, bool]:
        """Register the model folder of stage run ``run_id`` as a new version of ``name``; point ``alias`` at it.

        A run already registered under ``name`` (a reused stage) gets no second version: its version is
        returned and the alias moves back to it. The folder is uploaded as the run's ``model`` artifact
        unless the run logged it already. ``tags`` (lineage) are stored on the version, with the pipeline
        run and git commit of the run that trained the model where it has them. Returns (version, whether
        it was created now).
        """
        existing = [v for v in self.client.search_model_versions(f"run_id = '{run_id}'") if v.name == name]
        if existing:
            version, created = min(existing, key=lambda v: int(v.version)), False
        else:
            run = self.client.get_run(run_id)
            self._ensure_artifact(run_id, Path(model_dir))
            self._ensure_model(name)
            own = {"lmpipe.pipeline_run_id": run.data.tags.get("mlflow.parentRunId"),
                   "git.commit": run.data.tags.get("git.commit"), "git.dirty": run.data.tags.get("git.dirty")}
            lineage = {**(tags or {}), **{k: v for k, v in own.items() if v}}
            source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
            version = self.client.create_model_version(name, source, run_id, tags=lineage)
            created = True
        if alias:
            self.client.set_registered_model_alias(name, alias, version.version)
        return self.version(name, version.version), created

    def _ensure_artifact(self, run_id: str, model_dir: Path) -> None:
        if self.client.list_artifacts(run_id, MODEL_ARTIFACT):
            return
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model folder {model_dir} of MLflow run {run_id} is missing: nothing to register")
        self.client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)

    def _ensure_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="Trained by the lmpipe pipeline.")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _aliases(self, name: str) -> dict[str, tuple[str, ...]]:
        """version -> its aliases' names; raises UnknownModelVersion for an unknown model."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise UnknownModelVersion(f"no registered model {name!r} in the model registry") from exc
            raise
        out: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            out.setdefault(str(version), []).append(alias)
        return {v: tuple(sorted(a)) for v, a in out.items()}

    def versions(self, name: str) -> list[ModelVersionInfo]:
        """Every version of ``name``, oldest first, with its aliases and tags."""
        aliases = self._aliases(name)
        found = self.client.search_model_versions(f"name = '{name}'")
        infos = [_version_info(v, aliases.get(str(v.version), ())) for v in found]
        return sorted(infos, key=lambda v: int(v.version))

    def version(self, name: str, version: str | int) -> ModelVersionInfo:
        """One version of ``name``; an unknown one raises UnknownModelVersion listing the versions there are."""
        from mlflow.exceptions import MlflowException

        aliases = self._aliases(name)
        try:
            found = self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            have = ", ".join(v.version for v in self.versions(name)) or "none"
            raise UnknownModelVersion(f"registered model {name!r} has no version {version} (versions: {have})"
                                      ) from exc
        return _version_info(found, aliases.get(str(found.version), ()))

    def promote(self, name: str, version: str | int, alias: str = "production") -> ModelVersionInfo:
        """Move ``alias`` of ``name`` to ``version`` (which must exist)."""
        from mlflow.exceptions import MlflowException

        self.version(name, version)
        try:
            self.client.set_registered_model_alias(name, alias, str(version))
        except MlflowException as exc:
            if exc.error_code != "INVALID_PARAMETER_VALUE":
                raise
            raise ValueError(f"cannot set alias {alias!r} of {name!r}: {exc.message}") from exc
        return self.version(name, version)


def _version_info(v: Any, aliases: tuple[str, ...]) -> ModelVersionInfo:
    return ModelVersionInfo(v.name, str(v.version), v.run_id or "", v.source or "", aliases, dict(v.tags or {}),
                            (v.creation_timestamp or 0) / 1000)


def download_run_file(uri: str, run_id: str, paths: tuple[str, ...], dst: Path) -> Path:
    """The first of ``paths`` that run ``run_id`` holds as an artifact, downloaded into ``dst``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise LookupError(f"no MLflow run {run_id!r} in {uri}") from exc
    for path in paths:
        folder, _, name = path.rpartition("/")
        if name in {Path(a.path).name for a in client.list_artifacts(run_id, folder or None)}:
            return Path(client.download_artifacts(run_id, path, str(dst)))
    raise LookupError(f"MLflow run {run_id} has no {' or '.join(paths)} artifact")
