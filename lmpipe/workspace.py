"""The workspace: one folder that holds all state of a project.

Layout::

    <root>/warehouse.duckdb     the DuckDB warehouse (documents, n-gram counts, instructions, ...)
    <root>/artifacts/<stage>/   stage outputs (checkpoints, exports), one folder per cache key
    <root>/mlflow.db            default MLflow tracking store (artifacts in <root>/mlartifacts)
    <root>/prefect/             PREFECT_HOME of the local Prefect server, and cached task results
    <root>/state/               the last result of every stage and the run history (JSON)
    <root>/.lock                held by the process that writes to the workspace
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "LMPIPE_WORKSPACE"


class WorkspaceBusy(RuntimeError):
    """Another process holds the workspace lock."""


def default_root() -> Path:
    return Path.cwd() / "data" / "workspace"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, path: str | Path | None = None) -> Workspace:
        """``path``, else ``$LMPIPE_WORKSPACE``, else ``./data/workspace``; created if missing."""
        chosen = Path(path or os.environ.get(ENV_VAR) or default_root()).expanduser().resolve()
        if chosen.exists() and not chosen.is_dir():
            raise NotADirectoryError(f"workspace {chosen} exists and is not a directory")
        chosen.mkdir(parents=True, exist_ok=True)
        return cls(chosen)

    @property
    def warehouse(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def results_dir(self) -> Path:
        return self.prefect_home / "results"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    def stage_dir(self, stage: str, key: str) -> Path:
        """Output folder of one execution of ``stage`` with cache key ``key``."""
        return self.artifacts / stage / key[:16]

    def rel(self, path: Path) -> str:
        """A path inside the workspace as a relative string (results stay valid if the folder moves)."""
        return str(Path(path).resolve().relative_to(self.root))

    def abs(self, rel: str) -> Path:
        return self.root / rel

    @contextlib.contextmanager
    def lock(self, wait: float = 0.0, purpose: str = "lmpipe") -> Iterator[None]:
        """Hold the workspace's write lock; wait up to ``wait`` seconds for it, then raise WorkspaceBusy."""
        path = self.root / ".lock"
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the duration of the context
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise WorkspaceBusy(self._busy_message(path, wait)) from None
                    time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))
            fh.seek(0)
            fh.truncate()
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose, "since": time.time()}
            fh.write(json.dumps(holder))
            fh.flush()
            yield
        finally:
            fh.close()  # closing the descriptor releases the flock

    def _busy_message(self, path: Path, wait: float) -> str:
        try:
            holder = json.loads(path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            holder = {}
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('purpose', '?')})"
        since = holder.get("since")
        when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
        waited = f" after waiting {wait:g} s" if wait else ""
        return (
            f"workspace {self.root} is in use by another lmpipe process: {who}{when}{waited}. "
            "Wait for it to finish, or pass --wait SECONDS to queue behind it."
        )


def runtime_environment(ws: Workspace) -> dict[str, str]:
    """Environment defaults for Prefect and MLflow so that a run is local, quiet and offline.

    Values already set by the user win (``os.environ.setdefault`` semantics are applied by the caller).
    With no ``PREFECT_API_URL`` the local ephemeral Prefect server keeps its database in the workspace.
    """
    env = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    if not os.environ.get("PREFECT_API_URL"):
        env["PREFECT_HOME"] = str(ws.prefect_home)
    return env


def apply_runtime_environment(ws: Workspace) -> None:
    """Set :func:`runtime_environment` defaults in ``os.environ``; call before importing Prefect."""
    for k, v in runtime_environment(ws).items():
        os.environ.setdefault(k, v)
