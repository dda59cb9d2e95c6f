"""Scheduled retraining: the pipeline flow served as a Prefect deployment with a cron or interval schedule.

    lmpipe schedule --cron "0 3 * * 0" --preset tiny --workspace /data/lm
    lmpipe schedule --interval 3600

Each scheduled run re-ingests the configured sources (ingestion is idempotent, so only new documents
are added) and reuses every stage whose inputs did not change. Serving needs a Prefect API server:
with ``PREFECT_API_URL`` set, the deployment registers there; without it, ``serve`` starts a local
``prefect server`` bound to 127.0.0.1 with its database in the workspace, and stops it on exit.

For a team, run ``prefect server start`` (or Prefect Cloud), a work pool and a worker
(``prefect worker start --pool NAME``), and deploy with ``build_deployment(..., work_pool=NAME)``
and ``deployment.apply()``; the flow's code must then be importable where the worker runs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from flows.pipeline import pipeline_flow
from lmpipe.config import PipelineConfig, to_dict
from lmpipe.workspace import Workspace

DEPLOYMENT_NAME = "lmpipe-retrain"


def build_deployment(
    ws: Workspace,
    cfg: PipelineConfig,
    cron: str | None = None,
    interval: float | None = None,
    name: str = DEPLOYMENT_NAME,
    work_pool: str | None = None,
) -> Any:
    """The pipeline as a :class:`prefect.deployments.runner.RunnerDeployment` (no server needed to build it)."""
    if (cron is None) == (interval is None):
        raise ValueError("give exactly one of cron or interval")
    params = {"workspace": str(ws.root), "config": to_dict(cfg), "workspace_name": ws.root.name, "wait": 3600.0}
    return pipeline_flow.to_deployment(
        name=name,
        cron=cron,
        interval=timedelta(seconds=interval) if interval is not None else None,
        parameters=params,
        description=f"Retrain every lmpipe stage whose inputs changed, on workspace {ws.root}",
        tags=["lmpipe"],
        work_pool_name=work_pool,
        # the config is validated by lmpipe itself; Prefect's schema of a nested dict adds nothing
        enforce_parameter_schema=False,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_prefect_server(ws: Workspace, port: int | None = None, timeout: float = 120) -> Iterator[str]:
    """Start ``prefect server start`` on 127.0.0.1 (database in the workspace); yield its API URL; stop it."""
    port = port or _free_port()
    env = dict(os.environ, PREFECT_HOME=str(ws.prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log = open(ws.prefect_home / "server.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with code {proc.returncode}; see {log.name}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"prefect server did not answer within {timeout:.0f} s; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def serve(ws: Workspace, cfg: PipelineConfig, cron: str | None = None, interval: float | None = None,
          limit: int | None = None, on_server: Callable[[str], None] | None = None) -> None:
    """Serve the scheduled pipeline until interrupted (blocks).

    Registers with ``PREFECT_API_URL`` when it is set; otherwise starts a local Prefect server for the
    workspace first (``on_server`` is told its UI address) and stops it on exit.
    """
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deployment = build_deployment(ws, cfg, cron=cron, interval=interval)
    with contextlib.ExitStack() as stack:
        if not os.environ.get("PREFECT_API_URL"):
            url = stack.enter_context(local_prefect_server(ws))
            stack.enter_context(temporary_settings({PREFECT_API_URL: url}))
            if on_server:
                on_server(url.removesuffix("/api"))
        prefect_serve(deployment, limit=limit)
