"""Scheduled retraining without a server: the deployment, its schedule and parameters, and what a scheduled
run does with them (tests/test_prefect_server.py runs it against a real Prefect server and worker)."""

from __future__ import annotations

import pytest

from lmpipe.config import load_config


def test_cron_deployment_carries_schedule_and_resolved_config(workspace):
    from flows.schedule import build_deployment

    cfg = load_config("tiny", overrides=["ingest.min_chars=42"])
    dep = build_deployment(workspace, cfg, cron="0 3 * * 0")
    assert dep.name == "retrain-ws"  # one deployment per workspace folder unless named
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * 0"]
    assert dep.parameters["workspace"] == str(workspace.root)
    assert dep.parameters["config"]["ingest"]["min_chars"] == 42
    # importable by module wherever lmpipe is installed: a worker's working directory does not matter
    assert dep.entrypoint == "flows.pipeline.pipeline_flow"
    assert dep.concurrency_limit == 1
    assert dep.concurrency_options.collision_strategy.value == "CANCEL_NEW"


def test_interval_deployment_and_argument_checks(workspace):
    from flows.schedule import build_deployment

    cfg = load_config("tiny")
    dep = build_deployment(workspace, cfg, interval=90, name="nightly", work_pool="lmpipe")
    assert dep.name == "nightly" and dep.work_pool_name == "lmpipe"
    assert dep.schedules[0].schedule.interval.total_seconds() == 90
    with pytest.raises(ValueError, match="exactly one"):
        build_deployment(workspace, cfg)
    with pytest.raises(ValueError, match="exactly one"):
        build_deployment(workspace, cfg, cron="* * * * *", interval=60)
    with pytest.raises(ValueError, match="positive"):
        build_deployment(workspace, cfg, interval=0)


def test_source_paths_are_made_absolute_and_uris_kept(workspace, tmp_path, monkeypatch):
    from flows.schedule import build_deployment

    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", overrides=[
        "ingest.sources=[corpus, 'notes/*.txt', 'https://example.org/a.jsonl']", "sft.sources=[sft.jsonl]",
    ])
    config = build_deployment(workspace, cfg, interval=60).parameters["config"]
    assert config["ingest"]["sources"] == [
        str(tmp_path / "corpus"), str(tmp_path / "notes" / "*.txt"), "https://example.org/a.jsonl",
    ]
    assert config["sft"]["sources"] == [str(tmp_path / "sft.jsonl")]


@pytest.mark.usefixtures("prefect_server")
def test_each_scheduled_run_reingests_its_sources_and_adds_only_new_documents(workspace, experiment, tmp_path,
                                                                            monkeypatch):
    """What every scheduled run does with the deployment's parameters, from any working directory."""
    from flows.pipeline import pipeline_flow
    from flows.schedule import build_deployment

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(f"First file, line number {i}, says something new.\n" for i in range(30)))
    monkeypatch.chdir(tmp_path)
    overrides = ["ingest.sources=[corpus]", "ingest.near_dedup=false", f"tracking.experiment={experiment}"]
    cfg = load_config("tiny", overrides=overrides)
    params = build_deployment(workspace, cfg, cron="0 3 * * 0").parameters
    monkeypatch.chdir(workspace.root)  # a worker starts elsewhere: the relative source must still be found

    first = pipeline_flow(**params, only=("ingest",))
    assert first["_statuses"] == {"ingest": "completed"}
    assert first["ingest"]["metrics"]["documents_added"] == 30

    (corpus / "b.txt").write_text("".join(f"Second file, entry {i}, arrived this week.\n" for i in range(12)))
    second = pipeline_flow(**params, only=("ingest",))
    assert second["_statuses"] == {"ingest": "completed"}
    assert second["ingest"]["metrics"]["documents_added"] == 12  # a.txt is already in the warehouse
    assert second["ingest"]["fingerprint"] != first["ingest"]["fingerprint"]


def test_deploying_to_a_pool_needs_a_server(workspace, monkeypatch):
    from flows.schedule import deploy

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(RuntimeError, match="PREFECT_API_URL"):
        deploy(workspace, load_config("tiny"), "lmpipe", cron="0 3 * * 0")
