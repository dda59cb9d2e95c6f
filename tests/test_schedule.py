"""Scheduled retraining: the deployment is built with its schedule and parameters, without a server."""

from __future__ import annotations

import pytest

from lmpipe.config import load_config


def test_cron_deployment_carries_schedule_and_resolved_config(workspace):
    from flows.schedule import build_deployment

    cfg = load_config("tiny", overrides=["ingest.min_chars=42"])
    dep = build_deployment(workspace, cfg, cron="0 3 * * 0")
    assert dep.name == "lmpipe-retrain"
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * 0"]
    assert dep.parameters["workspace"] == str(workspace.root)
    assert dep.parameters["config"]["ingest"]["min_chars"] == 42


def test_interval_deployment_and_argument_checks(workspace):
    from flows.schedule import build_deployment

    cfg = load_config("tiny")
    dep = build_deployment(workspace, cfg, interval=90)
    assert dep.schedules[0].schedule.interval.total_seconds() == 90
    with pytest.raises(ValueError, match="exactly one"):
        build_deployment(workspace, cfg)
    with pytest.raises(ValueError, match="exactly one"):
        build_deployment(workspace, cfg, cron="* * * * *", interval=60)
