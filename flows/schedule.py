"""Scheduled retraining: the pipeline flow as a Prefect deployment with a cron or interval schedule.

Two ways to run it (see the README's "Scheduled retraining"):

- **serve** (one machine, one command): ``lmpipe schedule --cron "0 3 * * 0"`` registers the deployment
  and runs its flow runs itself, until stopped. With ``PREFECT_API_URL`` set it uses that server;
  without it, it starts a local ``prefect server`` on 127.0.0.1 (database in the workspace) and stops
  it on exit.
- **work pool** (a team): ``lmpipe schedule --pool NAME --cron ...`` only registers the deployment on a
  process work pool of the server at ``PREFECT_API_URL`` and returns; ``prefect worker start --pool NAME``,
  on any machine with lmpipe installed that sees the workspace, runs the scheduled flow runs.

Every scheduled run gets the same parameters: the workspace and the resolved config, whose source paths
are made absolute here so that a worker starting in another directory finds them. Each run resolves the
configured sources again (directories and globs pick up new files; the ingest stage's cache key covers
every file's size and time), ingestion skips what the warehouse already holds, and every stage whose
cache key is unchanged is reused: an unchanged corpus costs a few seconds, new documents rerun the
stages that read them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from flows.pipeline import pipeline_flow
from lmpipe.config import PipelineConfig, to_dict
from lmpipe.sources import REMOTE_SCHEMES
from lmpipe.workspace import Workspace


def deployment_name(ws: Workspace) -> str:
    """The default deployment name: one deployment per workspace, so two workspaces on one server never clash."""
    return f"retrain-{ws.root.name}"


def _absolute(spec: str) -> str:
    return spec if spec.startswith(REMOTE_SCHEMES) else os.path.abspath(os.path.expanduser(spec))


def absolute_sources(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with every local path in a section's ``sources`` made absolute (remote URIs unchanged)."""
    changes = {}
    for field in dataclasses.fields(cfg):
        section = getattr(cfg, field.name)
        if getattr(section, "sources", None):
            changes[field.name] = dataclasses.replace(section, sources=tuple(map(_absolute, section.sources)))
    return dataclasses.replace(cfg, **changes)


def build_deployment(
    ws: Workspace,
    cfg: PipelineConfig,
    cron: str | None = None,
    interval: float | None = None,
    name: str | None = None,
    work_pool: str | None = None,
) -> Any:
    """The pipeline as a :class:`prefect.deployments.runner.RunnerDeployment` (no server needed to build it).

    The entrypoint is the module path ``flows.pipeline.pipeline_flow``: wherever lmpipe is installed,
    a runner or a process worker imports it, whatever its working directory. At most one run at a time:
    a scheduled run that comes while the previous one still trains is cancelled, not queued.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType

    if (cron is None) == (interval is None):
        raise ValueError("give exactly one of cron or interval")
    if interval is not None and interval <= 0:
        raise ValueError(f"interval must be a positive number of seconds, not {interval:g}")
    params = {
        "workspace": str(ws.root), "config": to_dict(absolute_sources(cfg)), "workspace_name": ws.root.name,
        "wait": 3600.0,  # a manual `lmpipe run` holding the workspace delays the scheduled run, up to an hour
    }
    return pipeline_flow.to_deployment(
        name=name or deployment_name(ws),
        cron=cron,
        interval=timedelta(seconds=interval) if interval is not None else None,
        parameters=params,
        description=f"Retrain every lmpipe stage whose inputs changed, on workspace {ws.root}",
        tags=["lmpipe"],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        work_pool_name=work_pool,
        # the config is validated by lmpipe itself; Prefect's schema of a nested dict adds nothing
        enforce_parameter_schema=False,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def deploy(ws: Workspace, cfg: PipelineConfig, pool: str, cron: str | None = None, interval: float | None = None,
           name: str | None = None) -> str:
    """Register the scheduled deployment on work pool ``pool`` of the server at ``PREFECT_API_URL``; return its id.

    Returns at once: the pool's workers (``prefect worker start --pool POOL``) run the scheduled flow runs.
    """
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise RuntimeError("a work pool lives on a Prefect server: set PREFECT_API_URL (e.g. http://HOST:4200/api)")
    deployment = build_deployment(ws, cfg, cron=cron, interval=interval, name=name, work_pool=pool)
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            create = f"prefect work-pool create {pool} --type process"
            raise RuntimeError(f"work pool {pool!r} not found on {url}; create it with `{create}`") from None
        except httpx.TransportError as exc:
            raise RuntimeError(f"cannot reach the Prefect server at {url}: {exc}") from exc
    return str(deployment.apply())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):  # children the leader left behind
        os.killpg(proc.pid, signal.SIGKILL)


def wait_until_healthy(proc: subprocess.Popen, health_url: str, timeout: float, what: str) -> None:
    """Poll ``health_url`` until it answers 200; raise if ``proc`` (the server) exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(health_url, timeout=2) as r:
            if r.status == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer at {health_url} within {timeout:.0f} s")
        time.sleep(0.25)


@contextlib.contextmanager
def local_prefect_server(home: Path, port: int | None = None, timeout: float = 120, ui: bool = True) -> Iterator[str]:
    """Run ``prefect server start`` on 127.0.0.1 with its home (and database) in ``home``; yield its API URL.

    The server and its process group are stopped on exit; its output goes to ``home/server.log``.
    """
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log = open(home / "server.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*cmd, "--ui" if ui else "--no-ui"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_until_healthy(proc, f"{url}/health", timeout, f"prefect server (log: {log.name})")
        yield url
    finally:
        stop_process_group(proc)
        log.close()


def serve(ws: Workspace, cfg: PipelineConfig, cron: str | None = None, interval: float | None = None,
          name: str | None = None, limit: int | None = None, on_server: Callable[[str], None] | None = None) -> None:
    """Serve the scheduled pipeline until interrupted (blocks); its schedule is paused when serving stops.

    Registers with ``PREFECT_API_URL`` when it is set; otherwise starts a local Prefect server for the
    workspace first (``on_server`` is told its UI address) and stops it on exit.
    """
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deployment = build_deployment(ws, cfg, cron=cron, interval=interval, name=name)
    with contextlib.ExitStack() as stack:
        if not os.environ.get("PREFECT_API_URL"):
            url = stack.enter_context(local_prefect_server(ws.prefect_home))
            stack.enter_context(temporary_settings({PREFECT_API_URL: url}))  # flow-run processes inherit it
            if on_server:
                on_server(url.removesuffix("/api"))
        prefect_serve(deployment, limit=limit)

