"""The Prefect flow end to end: MLflow parent/child runs, stage caching, --force, failures, the lock."""

from __future__ import annotations

import pytest

from lmpipe.config import load_config
from lmpipe.state import load_history, load_stage_state
from lmpipe.workspace import WorkspaceBusy

pytestmark = pytest.mark.usefixtures("prefect_server")

SMALL = ["ingest.builtin_modules=[json, textwrap]"]


def _run(ws, experiment, overrides=(), **kwargs):
    from flows.pipeline import run_pipeline

    cfg = load_config("tiny", (), [*SMALL, f"tracking.experiment={experiment}", *overrides])
    return run_pipeline(str(ws.root), config=cfg, only=("ingest",), **kwargs)


def _runs(ws, experiment):
    from lmpipe.tracking import Tracker

    tracker = Tracker(ws, experiment)
    runs = tracker.search_runs(max_results=1000)
    return tracker, sorted(runs, key=lambda r: r.info.start_time)


def test_first_run_records_parent_and_stage_runs(experiment, workspace, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default: a store inside the workspace
    out = _run(workspace, experiment)
    assert (workspace.root / "mlflow.db").exists()
    assert out["_statuses"] == {"ingest": "completed"}
    tracker, runs = _runs(workspace, experiment)
    parent = next(r for r in runs if r.info.run_name == "pipeline")
    child = next(r for r in runs if r.info.run_name == "ingest")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == child.info.status == "FINISHED"
    assert child.data.params["ingest.min_chars"] == "16"
    assert child.data.metrics["documents_added"] > 5
    assert parent.data.tags["lmpipe.data_fingerprint"] == out["ingest"]["fingerprint"]
    assert "prefect.flow_run_id" in parent.data.tags
    artifacts = {a.path for a in tracker.client.list_artifacts(child.info.run_id)}
    assert {"ingest_report.json", "ingest_report.md", "document_lengths.png"} <= artifacts
    assert "last_config.yaml" in {a.path for a in tracker.client.list_artifacts(parent.info.run_id)}
    state = load_stage_state(workspace, "ingest")
    assert state.status == "completed" and state.result.run_id == child.info.run_id
    detail = state.result.key_detail  # what the key was made of, for `lmpipe run --dry-run` to compare
    assert detail["config"]["min_chars"] == 16 and detail["inputs"] == {}
    assert {"lmpipe.corpus", "lmpipe.clean", "lmpipe.minhash"} <= set(detail["code"])


def test_second_run_reuses_and_force_reruns(experiment, workspace):
    first = _run(workspace, experiment)
    second = _run(workspace, experiment)
    assert second["_statuses"] == {"ingest": "reused"}
    assert second["ingest"]["run_id"] == first["ingest"]["run_id"]
    _, runs = _runs(workspace, experiment)
    reused = [r for r in runs if r.info.run_name == "ingest" and r.data.tags["lmpipe.reused"] == "true"]
    assert len(reused) == 1 and reused[0].data.tags["lmpipe.reused_from"] == first["ingest"]["run_id"]
    assert load_stage_state(workspace, "ingest").status == "reused"

    forced = _run(workspace, experiment, force=("ingest",))
    assert forced["_statuses"] == {"ingest": "completed"}
    client = _runs(workspace, experiment)[0].client
    assert client.get_run(forced["ingest"]["run_id"]).data.tags["lmpipe.why"] == "forced"
    assert forced["ingest"]["run_id"] != first["ingest"]["run_id"]
    # nothing new arrived, so the data fingerprint (what downstream stages key on) is unchanged
    assert forced["ingest"]["fingerprint"] == first["ingest"]["fingerprint"]
    assert [h["stages"]["ingest"] for h in load_history(workspace)] == ["completed", "reused", "completed"]


def test_config_change_reruns_the_stage(experiment, workspace):
    first = _run(workspace, experiment)
    changed = _run(workspace, experiment, ["ingest.min_chars=400"])
    assert changed["_statuses"] == {"ingest": "completed"}
    assert changed["ingest"]["cache_key"] != first["ingest"]["cache_key"]
    tracker, _ = _runs(workspace, experiment)  # the stage's MLflow run says why it ran again
    assert tracker.client.get_run(changed["ingest"]["run_id"]).data.tags["lmpipe.why"] == "config: min_chars 16 -> 400"
    assert "lmpipe.why" not in tracker.client.get_run(first["ingest"]["run_id"]).data.tags  # first run: no reason


def test_warehouse_changed_outside_the_pipeline_invalidates_the_cache(experiment, workspace, tmp_path):
    from lmpipe.config import IngestConfig
    from lmpipe.corpus import ingest

    first = _run(workspace, experiment)
    extra = tmp_path / "extra.txt"
    extra.write_text("a brand new document that the pipeline has not seen before\n", encoding="utf-8")
    ingest(workspace, IngestConfig(sources=(str(extra),)), progress=False)
    again = _run(workspace, experiment)
    assert again["_statuses"] == {"ingest": "completed"}
    assert again["ingest"]["fingerprint"] != first["ingest"]["fingerprint"]


def test_failed_stage_marks_runs_failed_and_keeps_previous_result(experiment, workspace, tmp_path):
    good = _run(workspace, experiment)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line of text here"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        _run(workspace, experiment, [f"ingest.sources=['{bad}']"])
    _, runs = _runs(workspace, experiment)
    last_parent = [r for r in runs if r.info.run_name == "pipeline"][-1]
    assert last_parent.info.status == "FAILED"
    failed_children = [r for r in runs if r.info.run_name == "ingest" and r.info.status == "FAILED"]
    assert failed_children and "bad.jsonl:2" in failed_children[-1].data.tags["lmpipe.error"]
    state = load_stage_state(workspace, "ingest")
    assert state.status == "failed" and "bad.jsonl:2" in state.error
    assert state.result.fingerprint == good["ingest"]["fingerprint"]  # the earlier output stays valid
    # and the next good run reuses it
    assert _run(workspace, experiment)["_statuses"] == {"ingest": "reused"}


def test_second_run_on_a_busy_workspace_is_refused(experiment, workspace):
    with workspace.lock(0, purpose="test holder"), pytest.raises(WorkspaceBusy, match="in use by another lmpipe"):
        _run(workspace, experiment)


def test_transient_io_errors_are_retried_and_bad_input_is_not(experiment, workspace, monkeypatch):
    from lmpipe import pipeline
    from lmpipe.stage import Stage, StageOutput

    calls = []

    def flaky(ctx):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk busy")
        return StageOutput("fp", metrics={"ok": 1.0})

    stage = Stage("ingest", "ingest", (), flaky, ("lmpipe.corpus",))
    monkeypatch.setattr(pipeline, "STAGES", (stage,))
    out = _run(workspace, experiment, ["ingest.min_chars=3"])
    assert out["_statuses"] == {"ingest": "completed"} and len(calls) == 2

    def bad(ctx):
        calls.append(1)
        raise ValueError("bad input")

    monkeypatch.setattr(pipeline, "STAGES", (Stage("ingest", "ingest", (), bad, ("lmpipe.corpus",)),))
    calls.clear()
    with pytest.raises(ValueError, match="bad input"):
        _run(workspace, experiment, ["ingest.min_chars=4"])
    assert len(calls) == 1
