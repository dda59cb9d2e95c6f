"""The model registry (register, list, promote), run metadata tags and the `promote` / `models` commands.

Against the session's SQLite MLflow store; every test registers under a model name of its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmpipe.cli import main
from lmpipe.config import ConfigError, load_config
from lmpipe.tracking import Registry, Tracker, UnknownModelVersion, git_info, system_info


@pytest.fixture
def model_name(experiment) -> str:
    return re.sub(r"[^\w-]", "-", experiment) + "-policy"


def _model_dir(tmp_path, name="m", payload=b"weights"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "config.json").write_text('{"n_layer": 1}', encoding="utf-8")
    (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
    return folder


def _stage_run(tracker, parent=None):
    """A finished stage run like the pipeline's: a child of ``parent`` with the git tags of its code."""
    run = tracker.start_run("ppo", parent, {"lmpipe.stage": "ppo", "git.commit": "abc123", "git.dirty": "false"})
    run.end()
    return run


def test_register_creates_a_version_with_lineage_and_alias_and_never_duplicates_a_run(workspace, experiment,
                                                                                       model_name, tmp_path):
    tracker = Tracker(workspace, experiment)
    parent = tracker.start_run("pipeline")
    run = _stage_run(tracker, parent)
    lineage = {"lmpipe.cache_key": "key1", "lmpipe.data_fingerprint": "fp1", "lmpipe.pipeline_run_id": "ignored"}

    first, created = tracker.registry.register(model_name, run.run_id, _model_dir(tmp_path), "candidate", lineage)
    assert created and first.version == "1" and first.aliases == ("candidate",)
    assert first.run_id == run.run_id
    # the producing run's own parent and commit win over what the caller passed
    assert first.tags["lmpipe.pipeline_run_id"] == parent.run_id
    assert first.tags["git.commit"] == "abc123" and first.tags["lmpipe.data_fingerprint"] == "fp1"
    assert first.source.startswith(tracker.get_run(run.run_id).info.artifact_uri)
    files = {a.path for a in tracker.client.list_artifacts(run.run_id, "model")}
    assert files == {"model/model.safetensors", "model/config.json", "model/tokenizer.json"}

    again, created = tracker.registry.register(model_name, run.run_id, tmp_path / "gone", "candidate", lineage)
    assert not created and again.version == "1"  # a reused stage: same version, and nothing uploaded again
    assert [v.version for v in tracker.registry.versions(model_name)] == ["1"]

    second_run = _stage_run(tracker, parent)
    second, created = tracker.registry.register(model_name, second_run.run_id, _model_dir(tmp_path, "m2"), "candidate")
    assert created and second.version == "2"
    versions = tracker.registry.versions(model_name)
    assert [(v.version, v.aliases) for v in versions] == [("1", ()), ("2", ("candidate",))]


def test_register_uses_the_model_artifact_the_run_already_logged(workspace, experiment, model_name, tmp_path):
    tracker = Tracker(workspace, experiment)
    run = _stage_run(tracker)
    run.artifact(_model_dir(tmp_path, payload=b"logged by the stage"), "model")
    info, _ = tracker.registry.register(model_name, run.run_id, tmp_path / "no-such-folder")
    assert info.aliases == ()  # no alias asked for
    local = tracker.client.download_artifacts(run.run_id, "model/model.safetensors", str(tmp_path))
    assert Path(local).read_bytes() == b"logged by the stage"


def test_register_without_a_model_folder_or_artifact_is_an_error_naming_the_folder(workspace, experiment, model_name,
                                                                                   tmp_path):
    tracker = Tracker(workspace, experiment)
    run = _stage_run(tracker)
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        tracker.registry.register(model_name, run.run_id, tmp_path / "no-such-folder")


def test_promote_moves_the_alias_and_refuses_unknown_versions(workspace, experiment, model_name, tmp_path):
    tracker = Tracker(workspace, experiment)
    for i in range(2):
        tracker.registry.register(model_name, _stage_run(tracker).run_id, _model_dir(tmp_path, f"m{i}"), "candidate")
    registry = Registry.connect(tracker.uri)
    assert registry.promote(model_name, "1", "production").aliases == ("production",)
    assert registry.promote(model_name, 2, "production").aliases == ("candidate", "production")
    assert registry.version(model_name, 1).aliases == ()
    with pytest.raises(UnknownModelVersion, match=rf"{model_name}.*no version 7 \(versions: 1, 2\)"):
        registry.promote(model_name, "7")
    with pytest.raises(UnknownModelVersion, match="no registered model 'nobody-registered-this'"):
        registry.versions("nobody-registered-this")
    with pytest.raises(ValueError, match="alias"):
        registry.promote(model_name, "1", "bad alias!")


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_promote_and_models_commands(workspace, experiment, model_name, tmp_path):
    tracker = Tracker(workspace, experiment)
    parent = tracker.start_run("pipeline")
    for i in range(2):
        run = _stage_run(tracker, parent)
        tracker.registry.register(model_name, run.run_id, _model_dir(tmp_path, f"m{i}"), "candidate",
                                  {"lmpipe.data_fingerprint": f"data-{i}"})
    where = ["--workspace", workspace.root, "--set", f"tracking.registered_model={model_name}"]

    listed = _cli("models", *where)
    assert listed.exit_code == 0, listed.output
    assert re.search(r"version 2\s+candidate", listed.output) and "data data-1" in listed.output
    assert f"pipeline {parent.run_id[:12]}" in listed.output and "git abc123" in listed.output

    promoted = _cli("promote", "1", *where)
    assert promoted.exit_code == 0, promoted.output
    assert f"{model_name}@production -> version 1" in promoted.output
    rows = json.loads(_cli("models", *where, "--json").output)
    assert {r["version"]: r["aliases"] for r in rows} == {"1": ["production"], "2": ["candidate"]}

    missing = _cli("promote", "9", "--alias", "staging", "--name", model_name, "--workspace", workspace.root)
    assert missing.exit_code == 1
    assert f"registered model '{model_name}' has no version 9 (versions: 1, 2)" in missing.output
    unknown = _cli("models", "--name", "never-registered-model", "--workspace", workspace.root)
    assert unknown.exit_code == 1 and "no registered model 'never-registered-model'" in unknown.output


def test_registry_knobs_are_checked():
    assert load_config("tiny").tracking.registered_model == "lmpipe-policy"
    with pytest.raises(ConfigError, match="tracking.registered_model"):
        load_config("tiny", (), ["tracking.registered_model=team/policy"])
    with pytest.raises(ConfigError, match="tracking.register_alias"):
        load_config("tiny", (), ["tracking.register_alias=latest"])


def test_run_metadata_names_the_commit_and_the_hardware():
    info = system_info()
    assert int(info["host.cpu_count"]) >= 1 and info["host.cpu_model"]
    assert float(info["host.memory_gib"]) > 0
    assert int(info["host.gpu_count"]) >= 0
    git = git_info()
    if git:  # a git checkout (not an installed copy)
        assert re.fullmatch(r"[0-9a-f]{40}", git["git.commit"]) and git["git.dirty"] in ("true", "false")
