"""Prefect tasks: thin wrappers that run one lmpipe stage inside an MLflow run, with caching."""

from tasks.stage_task import run_stage_task

__all__ = ["run_stage_task"]
