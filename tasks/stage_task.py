"""The Prefect task that runs one stage.

Caching: the task's cache key is the stage's own key (config section, input fingerprints, code
version, external inputs), computed by the flow and passed in as ``cache_key``. Results are persisted
as JSON in the workspace, so a later run with the same key gets the stored result without executing
the stage; ``refresh_cache=True`` (``lmpipe run --force STAGE``) executes it anyway.

Retries: only transient I/O errors are retried; bad input and bugs fail at once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.runtime import flow_run as runtime_flow_run
from prefect.runtime import task_run as runtime_task_run

from lmpipe.config import PipelineConfig, flatten, from_dict
from lmpipe.pipeline import get_stage
from lmpipe.stage import StageContext, StageResult
from lmpipe.tracking import RunLogger, Tracker, git_info
from lmpipe.workspace import Workspace

NOT_TRANSIENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return parameters["cache_key"]


def _is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O errors (a busy disk, a dropped network share), never bad input or bugs."""
    try:
        state.result()
    except NOT_TRANSIENT:
        return False
    except (OSError, TimeoutError):
        return True
    except BaseException:
        return False
    return False


@task(
    cache_key_fn=_cache_key,
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_is_transient,
)
def run_stage_task(
    stage: str,
    cache_key: str,
    workspace: str,
    config: dict[str, Any],
    inputs: dict[str, dict[str, Any]],
    parent_run_id: str | None = None,
    key_detail: dict[str, Any] | None = None,
    why: list[str] | None = None,
) -> dict[str, Any]:
    """Run ``stage`` in its own MLflow child run and return its :class:`StageResult` as JSON."""
    ws = Workspace(Path(workspace))
    cfg = from_dict(PipelineConfig, config)
    spec = get_stage(stage)
    tracker = Tracker(ws, cfg.tracking.experiment, cfg.tracking.tracking_uri)
    parent = RunLogger(tracker.client, parent_run_id) if parent_run_id else None
    tags = {"lmpipe.stage": stage, "lmpipe.cache_key": cache_key, "lmpipe.reused": "false"}
    if why:  # what changed since the stage's last result (see `lmpipe run --dry-run`)
        tags["lmpipe.why"] = "; ".join(why)[:5000]
    tags |= {f"lmpipe.input.{name}": res["fingerprint"] for name, res in inputs.items()}
    if runtime_task_run.id:
        tags["prefect.task_run_id"] = str(runtime_task_run.id)
    if runtime_flow_run.id:
        tags["prefect.flow_run_id"] = str(runtime_flow_run.id)
    if cfg.tracking.log_system_info:
        tags |= git_info()
    run = tracker.start_run(stage, parent, tags)
    run.params(flatten(getattr(cfg, spec.section), prefix=spec.section))
    # Kept if it exists: an interrupted attempt with the same key left checkpoints the stage resumes from.
    out_dir = ws.stage_dir(stage, cache_key)
    ctx = StageContext(ws, cfg, {k: StageResult.from_json(v) for k, v in inputs.items()}, out_dir, log=run)
    t0 = time.perf_counter()
    try:
        output = spec.run(ctx)
    except BaseException as exc:
        run.tags({"lmpipe.error": f"{type(exc).__name__}: {exc}"[:5000]})
        run.end("FAILED")
        raise
    # every stage's record carries its wall time; tokens_processed is the stage's own count (see the README)
    metrics = {**output.metrics, "wall_seconds": time.perf_counter() - t0}
    run.metrics({"wall_seconds": metrics["wall_seconds"]})
    run.tags({"lmpipe.fingerprint": output.fingerprint})
    run.end("FINISHED")
    result = StageResult(stage, cache_key, output.fingerprint, output.outputs, metrics, output.summary,
                         run.run_id, time.time(), key_detail)
    return result.to_json()
