"""Configuration: presets, files, overrides, type checks, unknown keys, and the README reference."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from lmpipe.config import (
    TRAINING_KNOBS,
    ConfigError,
    PipelineConfig,
    PpoConfig,
    PretrainConfig,
    RewardConfig,
    SftConfig,
    flatten,
    from_dict,
    load_config,
    preset_names,
    reference_markdown,
    save_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, PipelineConfig)


def test_presets_exist():
    assert {"tiny", "gpu"} <= set(preset_names())


def test_file_then_override_precedence(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("ingest:\n  min_chars: 50\n  unit: paragraph\n", encoding="utf-8")
    cfg = load_config("tiny", [f], ["ingest.min_chars=70", "ingest.sources=[a.txt, b.jsonl]"])
    assert cfg.ingest.min_chars == 70
    assert cfg.ingest.unit == "paragraph"
    assert cfg.ingest.sources == ("a.txt", "b.jsonl")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key ingest\.min_char\b.*valid keys in ingest: .*min_chars"):
        load_config("tiny", overrides=["ingest.min_char=3"])
    with pytest.raises(ConfigError, match=r"unknown config key nosuch.*valid keys: tracking, ingest"):
        load_config("tiny", overrides=["nosuch.x=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ingest.min_chars=abc", r"ingest\.min_chars: expected int, got 'abc'"),
        ("ingest.min_chars=1.5", r"ingest\.min_chars: expected int"),
        ("ingest.near_dedup=3", r"ingest\.near_dedup: expected bool"),
        ("ingest.unit=sentence", r"ingest\.unit: 'sentence' is not one of 'line', 'paragraph'"),
        ("ingest.sources=a.txt", r"ingest\.sources: expected a list"),
        ("ingest.val_fraction=0.97", r"val_fraction \+ ingest\.test_fraction must be below 1"),
        ("sft.min_lr=0.5", r"sft needs 0 <= min_lr <= lr"),
        ("pretrain.warmup_steps=301", r"pretrain\.warmup_steps must be <= pretrain\.max_steps"),
        ("reward.beta2=1.0", r"reward\.beta1/beta2 must be in \[0, 1\)"),
        ("ppo.keep_last=-1", r"ppo\.keep_last must be >= 0"),
        ("sft.grad_accum=0", r"sft\.grad_accum must be >= 1"),
        ("pretrain.log_every=0", r"pretrain\.log_every must be >= 1"),
    ],
)
def test_wrong_values_are_errors_that_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides=[override])


def test_bad_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("ingest: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config("tiny", [f])
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("tiny", overrides=["ingest.sources=[x.txt]"])
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    assert from_dict(PipelineConfig, yaml.safe_load(path.read_text())) == cfg
    assert flatten(cfg.ingest, "ingest")["ingest.sources"] == '["x.txt"]'


def test_configs_are_frozen():
    cfg = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ingest.min_chars = 3  # type: ignore[misc]


def _walk(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield cls, f
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _walk(hints[f.name])


def test_every_knob_has_a_default_and_a_description():
    for cls, f in _walk(PipelineConfig):
        assert f.default is not dataclasses.MISSING, f"{cls.__name__}.{f.name} has no default"
        assert f.metadata.get("doc", "").strip(), f"{cls.__name__}.{f.name} has no description"
    assert to_dict(PipelineConfig())  # the defaults form a valid config on their own


def test_training_knobs_are_described_once_and_checked_alike():
    sections = [PretrainConfig, SftConfig, RewardConfig, PpoConfig]
    for cls in sections:
        shared = {f.name: f for f in dataclasses.fields(cls) if "training" in f.metadata}
        assert all(f.metadata["training"] == name for name, f in shared.items()), cls.__name__  # no copied names
        # every shared knob the section has is declared through the one description
        assert set(shared) == set(TRAINING_KNOBS) & {f.name for f in dataclasses.fields(cls)}, cls.__name__
    for name in ("beta1", "keep_last", "threads"):
        bad = -1 if name != "beta1" else 1.5
        for cls in sections:
            with pytest.raises(ConfigError, match=rf"\b{name}\b"):
                cls(**{name: bad})


def test_readme_reference_matches_the_code():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", readme, re.S)
    assert block, "README.md lacks the generated configuration reference block"
    assert block.group(1).strip() == reference_markdown().strip(), (
        "README configuration reference is stale: regenerate it with `lmpipe config reference`"
    )
