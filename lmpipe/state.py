"""What the workspace remembers about stages: the last good result of each, and the run history.

Kept as small JSON files (written atomically) rather than in the warehouse so that ``lmpipe status``
can read them while another process holds the DuckDB file open for writing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from lmpipe.stage import StageResult
from lmpipe.workspace import Workspace, atomic_write_text


@dataclass(frozen=True)
class StageState:
    stage: str
    status: str  # "completed", "reused" or "failed"
    result: StageResult | None  # the last successful result (kept when a later attempt fails)
    run_id: str | None  # MLflow run of the last attempt
    pipeline_run_id: str | None
    at: float
    error: str | None = None


def _path(ws: Workspace, stage: str):
    return ws.state_dir / "stages" / f"{stage}.json"


def load_stage_state(ws: Workspace, stage: str) -> StageState | None:
    path = _path(ws, stage)
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    result = StageResult.from_json(data["result"]) if data.get("result") else None
    return StageState(**{**data, "result": result})


def save_stage_state(
    ws: Workspace,
    stage: str,
    status: str,
    result: StageResult | None,
    run_id: str | None,
    pipeline_run_id: str | None,
    error: str | None = None,
) -> StageState:
    """Record one attempt; a failure keeps the previous good result so earlier outputs stay usable."""
    if result is None:
        previous = load_stage_state(ws, stage)
        result = previous.result if previous else None
    state = StageState(stage, status, result, run_id, pipeline_run_id, time.time(), error)
    data: dict[str, Any] = {**state.__dict__, "result": result.to_json() if result else None}
    atomic_write_text(_path(ws, stage), json.dumps(data, indent=2))
    return state


def append_history(ws: Workspace, record: dict[str, Any]) -> None:
    ws.state_dir.mkdir(parents=True, exist_ok=True)
    with open(ws.state_dir / "runs.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def load_history(ws: Workspace) -> list[dict[str, Any]]:
    path = ws.state_dir / "runs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
