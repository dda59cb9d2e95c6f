"""Hermetic test setup: a temporary Prefect home, MLflow store and workspace for every session/test.

The environment is set before anything imports Prefect or MLflow, so the user's real servers, stores
and workspaces are never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="lmpipe-tests-"))
for var in ("PREFECT_API_URL", "LMPIPE_WORKSPACE", "PREFECT_PROFILES_PATH"):
    os.environ.pop(var, None)
os.environ.update({
    # One MLflow store for the session (creating a SQLite store costs seconds); tests that need the
    # workspace's own store unset it, and each test that tracks uses its own experiment.
    "MLFLOW_TRACKING_URI": f"sqlite:///{_SESSION_TMP / 'mlflow.db'}",
    "PREFECT_HOME": str(_SESSION_TMP / "prefect-home"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "GIT_PYTHON_REFRESH": "quiet",
    "TQDM_DISABLE": "1",
})


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's Prefect home and MLflow store (session fixtures are torn down by now)."""
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole session (starting one costs seconds)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def workspace(tmp_path):
    from lmpipe.workspace import Workspace

    return Workspace.resolve(tmp_path / "ws")


@pytest.fixture
def experiment(request) -> str:
    """An MLflow experiment name of this test's own in the session's store."""
    return f"test-{request.node.name}-{os.getpid()}"[:200]


@pytest.fixture(scope="session")
def micro_run(prefect_server, tmp_path_factory):
    """Every stage of the pipeline run once per session with the MICRO overrides (about 20 s).

    Returns ``(workspace, flow output, overrides)``. Tests must not change this workspace; copy it first
    (``shutil.copytree``) to change or rerun anything.
    """
    from micro import MICRO

    from flows.pipeline import run_pipeline
    from lmpipe.workspace import Workspace

    ws = Workspace.resolve(tmp_path_factory.mktemp("micro") / "ws")
    overrides = [*MICRO, "tracking.experiment=micro-session"]
    out = run_pipeline(str(ws.root), preset="tiny", overrides=overrides)
    return ws, out, overrides
