"""The end-to-end pipeline flow.

Run it with the CLI (``lmpipe run --preset tiny``), or from Python::

    from flows.pipeline import run_pipeline
    run_pipeline(workspace="data/workspace", preset="tiny")

Stages run in dependency order. Each is a Prefect task whose cache key covers its own config section,
its inputs' fingerprints and its code, so a second run reuses every unchanged stage and a changed
section reruns that stage and what depends on it. ``force`` reruns a stage and its dependants;
``only`` / ``start`` / ``stop`` select stages, the others contributing their last good result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as runtime_flow_run

from lmpipe import pipeline as stages
from lmpipe.config import PipelineConfig, from_dict, load_config, save_config, to_dict
from lmpipe.stage import Stage, StageResult, key_changes
from lmpipe.state import append_history, load_stage_state, save_stage_state
from lmpipe.tracking import RunLogger, Tracker, git_info, system_info
from lmpipe.workspace import Workspace, apply_runtime_environment
from tasks.stage_task import run_stage_task


class StageUnavailable(RuntimeError):
    """A selected stage needs the result of a stage that was not selected and never ran."""


def _log_config(parent: RunLogger, ws: Workspace, cfg: PipelineConfig) -> None:
    path = ws.state_dir / "last_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)
    parent.artifact(path)


def _execute(
    stage: Stage, ws: Workspace, cfg: PipelineConfig, results: dict[str, StageResult], refresh: bool,
    parent: RunLogger, tracker: Tracker,
) -> tuple[StageResult, bool]:
    """Run (or reuse) one stage; return its result and whether it came from the cache."""
    logger = get_run_logger()
    inputs = {d: results[d] for d in stage.deps}
    key, detail = stage.key(ws, cfg, inputs)
    previous = load_stage_state(ws, stage.name)
    cached = not refresh and previous and previous.result and previous.result.cache_key == key
    why = ["forced"] if refresh else []
    if cached and not stage.is_valid(ws, previous.result):
        logger.info("%s: cached outputs no longer match the workspace; rerunning", stage.name)
        refresh, why = True, ["outputs missing"]
    elif not cached and previous and previous.result and previous.result.key_detail:
        why = why or key_changes(previous.result.key_detail, detail)
        logger.info("%s: cache key changed: %s", stage.name, "; ".join(why) or "stage version")
    task = run_stage_task.with_options(
        name=stage.name, task_run_name=stage.name, refresh_cache=refresh, result_storage=ws.results_dir
    )
    state = task(
        stage.name, key, str(ws.root), to_dict(cfg), {d: r.to_json() for d, r in inputs.items()}, parent.run_id,
        detail, why, return_state=True,
    )
    flow_run_id = str(runtime_flow_run.id) if runtime_flow_run.id else None
    if state.is_failed() or state.is_crashed() or state.is_cancelled():
        try:
            state.result()
            error = f"stage {stage.name} ended in state {state.name}"
        except BaseException as exc:  # the stage's own exception, re-raised below
            save_stage_state(ws, stage.name, "failed", None, None, flow_run_id, f"{type(exc).__name__}: {exc}")
            raise
        save_stage_state(ws, stage.name, "failed", None, None, flow_run_id, error)
        raise RuntimeError(error)
    result = StageResult.from_json(state.result())
    reused = state.name == "Cached"
    if result.key_detail is None:  # a result stored before results kept it: the key matched, so the detail is ours
        result = dataclasses.replace(result, key_detail=detail)
    if reused:
        child = tracker.start_run(stage.name, parent, {
            "lmpipe.stage": stage.name, "lmpipe.cache_key": key, "lmpipe.reused": "true",
            "lmpipe.reused_from": result.run_id or "", "lmpipe.fingerprint": result.fingerprint,
        })
        child.metrics(result.metrics)
        child.end("FINISHED")
        logger.info("%s: reused (cache key %s, produced by MLflow run %s)", stage.name, key[:12], result.run_id)
    else:
        logger.info("%s: completed. %s", stage.name, result.summary)
    save_stage_state(ws, stage.name, "reused" if reused else "completed", result, result.run_id, flow_run_id)
    return result, reused


def _register_models(
    stage: str, ws: Workspace, cfg: PipelineConfig, results: dict[str, StageResult], parent: RunLogger,
    tracker: Tracker,
) -> None:
    """After the ppo (and reward) stage, register its model in the MLflow model registry, as configured.

    A reused stage points at its existing version rather than adding one; the version's tags carry its
    lineage: the pipeline run, the data fingerprint, the stage's cache key and the code's git commit.
    """
    t = cfg.tracking
    names = {"ppo": t.registered_model, "reward": t.registered_reward_model if t.register_reward_model else ""}
    name = names.get(stage)
    result = results[stage] if name else None
    if result is None or not result.run_id:
        return
    lineage = {"lmpipe.stage": stage, "lmpipe.pipeline_run_id": parent.run_id, "lmpipe.cache_key": result.cache_key,
               "lmpipe.fingerprint": result.fingerprint, "lmpipe.data_fingerprint": results["ingest"].fingerprint,
               **git_info()}
    version, created = tracker.registry.register(name, result.run_id, ws.abs(result.outputs["model"]),
                                                 t.register_alias, lineage)
    parent.tags({f"lmpipe.registered.{stage}": f"{name}/{version.version}"})
    get_run_logger().info("%s: model %s as %s version %s%s", stage, "registered" if created else "already registered",
                          name, version.version, f", alias {t.register_alias}" if t.register_alias else "")


def _publish_report(ws: Workspace, result: StageResult, parent: RunLogger) -> None:
    """The evolution report on the pipeline run too: its files in MLflow, its table as a Prefect artifact."""
    from prefect.artifacts import create_markdown_artifact

    from lmpipe.report import load_report, markdown

    for name in ("json", "markdown", "html"):
        if name in result.outputs:
            parent.artifact(ws.abs(result.outputs[name]), "report")
    create_markdown_artifact(markdown=markdown(load_report(ws.abs(result.outputs["json"]))), key="lmpipe-report",
                             description="Every generation on the test split, side by side")


@flow(name="lmpipe-pipeline", flow_run_name="pipeline-{workspace_name}", validate_parameters=False)
def pipeline_flow(
    workspace: str,
    config: dict[str, Any],
    only: Sequence[str] = (),
    start: str | None = None,
    stop: str | None = None,
    force: Sequence[str] = (),
    wait: float = 0.0,
    workspace_name: str = "",
) -> dict[str, dict[str, Any]]:
    """Run the selected stages of the pipeline on ``workspace`` with the resolved ``config``."""
    ws = Workspace.resolve(workspace)
    cfg = from_dict(PipelineConfig, config)
    selected = stages.select(tuple(only), start, stop)
    forced = stages.forced(tuple(force))
    t0 = time.time()
    with ws.lock(wait, purpose="pipeline run"):
        tracker = Tracker(ws, cfg.tracking.experiment, cfg.tracking.tracking_uri)
        tags = {"lmpipe.kind": "pipeline", "lmpipe.stages": ",".join(selected), "lmpipe.workspace": str(ws.root)}
        if runtime_flow_run.id:
            tags["prefect.flow_run_id"] = str(runtime_flow_run.id)
        if cfg.tracking.log_system_info:
            tags |= git_info() | system_info()
        parent = tracker.start_run("pipeline", tags=tags)
        _log_config(parent, ws, cfg)
        results: dict[str, StageResult] = {}
        statuses: dict[str, str] = {}
        stage_seconds: dict[str, float] = {}  # this run's time per stage (a reused one costs only the lookup)
        try:
            for stage in stages.STAGES:
                if stage.name in selected:
                    refresh = stage.name in forced
                    t_stage = time.time()
                    results[stage.name], reused = _execute(stage, ws, cfg, results, refresh, parent, tracker)
                    statuses[stage.name] = "reused" if reused else "completed"
                    stage_seconds[f"stage_seconds.{stage.name}"] = time.time() - t_stage
                    _register_models(stage.name, ws, cfg, results, parent, tracker)
                else:
                    prior = load_stage_state(ws, stage.name)
                    if prior and prior.result:
                        results[stage.name] = prior.result
                    elif any(stage.name in s.deps for s in stages.STAGES if s.name in selected):
                        raise StageUnavailable(
                            f"stage {stage.name} has no result in workspace {ws.root}; run it first "
                            f"(e.g. `lmpipe run --to {stage.name}`)"
                        )
            if "ingest" in results:
                parent.tags({"lmpipe.data_fingerprint": results["ingest"].fingerprint})
            if "report" in statuses:
                _publish_report(ws, results["report"], parent)
            parent.metrics({"wall_seconds": time.time() - t0, **stage_seconds})
            parent.end("FINISHED")
        except BaseException as exc:
            parent.tags({"lmpipe.error": f"{type(exc).__name__}: {exc}"[:5000]})
            parent.end("FAILED")
            append_history(ws, {"run_id": parent.run_id, "at": t0, "status": "failed", "stages": statuses,
                                "error": f"{type(exc).__name__}: {exc}"})
            raise
        append_history(ws, {"run_id": parent.run_id, "at": t0, "status": "completed", "stages": statuses,
                            "seconds": time.time() - t0})
    return {k: v.to_json() for k, v in results.items()} | {"_run_id": parent.run_id, "_statuses": statuses}


def run_pipeline(
    workspace: str | None = None,
    preset: str | None = "tiny",
    config_files: Sequence[str] = (),
    overrides: Sequence[str] = (),
    config: PipelineConfig | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Resolve the workspace and config, then run :func:`pipeline_flow` (in this process)."""
    ws = Workspace.resolve(workspace)
    apply_runtime_environment(ws)
    cfg = config or load_config(preset, config_files, overrides)
    return pipeline_flow(str(ws.root), to_dict(cfg), workspace_name=ws.root.name, **kwargs)
