"""The command line as a user drives it: exit codes, messages, status after runs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml
from click.testing import CliRunner

from lmpipe.cli import main
from lmpipe.state import load_stage_state, save_stage_state

SMALL = ["--set", "ingest.builtin_modules=[json, textwrap]"]


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_ingest_reports_added_then_skipped(workspace, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one line of text that is long enough\nanother line of text that is long enough\n", encoding="utf-8")
    first = _invoke("ingest", f, "--workspace", workspace.root, "--no-track")
    assert first.exit_code == 0, first.output
    assert "2 read, 2 kept" in first.output and "2 documents added" in first.output
    again = _invoke("ingest", f, "--workspace", workspace.root, "--no-track")
    assert again.exit_code == 0 and "already ingested, nothing added" in again.output


def test_ingest_bad_file_exits_non_zero_naming_file_and_line(workspace, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine first record here"}\n\n{"text": 3}\n', encoding="utf-8")
    result = _invoke("ingest", bad, "--workspace", workspace.root)
    assert result.exit_code == 1
    assert "bad.jsonl:3:" in result.output


def test_unknown_config_key_is_a_usage_error(workspace):
    result = _invoke("run", "--workspace", workspace.root, "--set", "ingest.min_char=3")
    assert result.exit_code == 2
    assert "unknown config key ingest.min_char" in result.output and "min_chars" in result.output


def test_config_show_applies_overrides():
    result = _invoke("config", "show", "--set", "ingest.min_chars=99")
    assert result.exit_code == 0
    assert yaml.safe_load(result.output)["ingest"]["min_chars"] == 99


@pytest.mark.usefixtures("prefect_server")
def test_run_then_status_shows_fresh_then_cached(workspace, experiment):
    assert "never run" in _invoke("status", "--workspace", workspace.root).output
    tracking = ["--set", f"tracking.experiment={experiment}"]
    first = _invoke("run", "--workspace", workspace.root, "--only", "ingest", *SMALL, *tracking)
    assert first.exit_code == 0, first.output
    assert "ingest       completed" in first.output
    status = json.loads(_invoke("status", "--workspace", workspace.root, "--json").output)
    ingest = next(s for s in status["stages"] if s["stage"] == "ingest")
    assert ingest["status"] == "fresh" and ingest["metrics"]["documents_added"] > 5
    second = _invoke("run", "--workspace", workspace.root, "--only", "ingest", *SMALL, *tracking)
    assert "ingest       reused" in second.output
    assert "cached" in _invoke("status", "--workspace", workspace.root).output

    plan = _invoke("run", "--dry-run", "--workspace", workspace.root, "--only", "ingest", *SMALL, *tracking,
                   "--set", "ingest.min_chars=20").output
    assert "nothing is run" in plan and "ingest       run      config: min_chars 16 -> 20" in plan
    assert "ngram        skip" in plan
    # a result made by other code: status names the modules edited since
    state = load_stage_state(workspace, "ingest")
    detail = {**state.result.key_detail, "code": {**state.result.key_detail["code"], "lmpipe.clean": "0" * 16}}
    save_stage_state(workspace, "ingest", state.status, replace(state.result, key_detail=detail), state.run_id,
                     state.pipeline_run_id)
    assert "code changed since this result: lmpipe.clean" in _invoke("status", "--workspace", workspace.root).output
    status = json.loads(_invoke("status", "--workspace", workspace.root, "--json").output)
    assert next(s for s in status["stages"] if s["stage"] == "ingest")["code_changed"] == ["lmpipe.clean"]


def test_run_on_a_locked_workspace_refuses_with_a_clear_message(workspace):
    with workspace.lock(0, purpose="another run"):
        result = _invoke("ingest", "x.txt", "--workspace", workspace.root, "--no-track")
    assert result.exit_code == 1
    assert "is in use by another lmpipe process" in result.output and "--wait" in result.output
