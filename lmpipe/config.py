"""Typed pipeline configuration.

One frozen dataclass per stage, nested in :class:`PipelineConfig`. Every field has a default, a type
and a one-line description (``field(metadata={"doc": ...})``). Configs are built from a preset
(``lmpipe/presets/<name>.yaml``), then YAML files, then ``section.key=value`` overrides; unknown keys
and wrong types are errors that name the key and list the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESETS_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key."""


def knob(default: Any, doc: str) -> Any:
    """A config field with its one-line description."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs are recorded. Not part of any stage's cache key."""

    experiment: str = knob("lmpipe", "MLflow experiment name (one per workspace by default).")
    tracking_uri: str | None = knob(
        None, "MLflow tracking URI; None means $MLFLOW_TRACKING_URI, else a SQLite store inside the workspace."
    )
    log_system_info: bool = knob(True, "Tag runs with git commit, host, CPU/GPU and library versions.")


@dataclass(frozen=True)
class IngestConfig:
    """Corpus ingestion into the DuckDB warehouse."""

    sources: tuple[str, ...] = knob(
        (), "Files, directories, globs or URIs to ingest; empty means the built-in stdlib-docstring corpus."
    )
    unit: Literal["line", "paragraph"] = knob("line", "Document unit of .txt/.md files: one per line or per paragraph.")
    text_field: str = knob("text", "Field (JSON) or column (Parquet/CSV) holding the document text.")
    builtin_modules: tuple[str, ...] = knob(
        (), "Restrict the built-in corpus to these stdlib modules (empty: the whole public standard library)."
    )
    min_chars: int = knob(16, "Drop documents shorter than this many characters after cleaning.")
    max_chars: int = knob(200_000, "Drop documents longer than this many characters after cleaning.")
    near_dedup: bool = knob(False, "Remove near-duplicates with MinHash LSH (exact dedup is always on).")
    near_dedup_threshold: float = knob(0.8, "Estimated Jaccard similarity at which a document counts as a near-duplicate.")
    minhash_perm: int = knob(128, "Number of MinHash permutations.")
    minhash_shingle: int = knob(5, "Character n-gram size of the MinHash shingles.")
    val_fraction: float = knob(0.05, "Share of documents assigned to the val split (by content hash).")
    test_fraction: float = knob(0.05, "Share of documents assigned to the test split (by content hash).")

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ConfigError("ingest.val_fraction and ingest.test_fraction must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("ingest.val_fraction + ingest.test_fraction must be below 1")
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise ConfigError("ingest.min_chars must be >= 0 and <= ingest.max_chars")
        if not 0 < self.near_dedup_threshold <= 1:
            raise ConfigError("ingest.near_dedup_threshold must be in (0, 1]")
        if self.minhash_perm < 16 or self.minhash_shingle < 1:
            raise ConfigError("ingest.minhash_perm must be >= 16 and ingest.minhash_shingle >= 1")


@dataclass(frozen=True)
class PipelineConfig:
    """The whole pipeline: one section per stage plus tracking."""

    tracking: TrackingConfig = knob(TrackingConfig(), "Experiment tracking (MLflow).")
    ingest: IngestConfig = knob(IngestConfig(), "Corpus ingestion.")


# ----------------------------------------------------------------------------------------------
# building configs from plain data


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "").replace("NoneType", "None")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples; raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]}; valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config dataclass, suitable for YAML/JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}`` for a config dataclass (lists JSON-encoded), e.g. for MLflow params."""
    flat: dict[str, Any] = {}
    for k, v in to_dict(cfg).items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            flat.update(flatten(getattr(cfg, k), key))
        else:
            flat[key] = json.dumps(v) if isinstance(v, list) else v
    return flat


def fingerprint_data(cfg: Any) -> str:
    """Canonical JSON of a config section, the part of a cache key that the section contributes."""
    return json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------
# presets, files and overrides


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"section.key=value"`` (value parsed as YAML) → nested dict."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
    nested: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        nested = {p: nested}
    return nested


def load_config(
    preset: str | None = "tiny", files: Iterable[str | Path] = (), overrides: Iterable[str] = ()
) -> PipelineConfig:
    """Preset, then YAML files in order, then ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    if preset:
        path = PRESETS_DIR / f"{preset}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(preset_names())}")
        data = _read_yaml(path)
    for f in files:
        data = _merge(data, _read_yaml(Path(f)))
    for o in overrides:
        data = _merge(data, parse_override(o))
    return from_dict(PipelineConfig, data)


def save_config(cfg: PipelineConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# reference documentation


def reference_markdown(cls: type = PipelineConfig) -> str:
    """The configuration reference as Markdown: one table per section, generated from the field docs."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = hints[f.name]
        lines += [f"### `{f.name}`: {f.metadata['doc']}", ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        sec_hints = typing.get_type_hints(section)
        for sf in dataclasses.fields(section):
            default = sf.default if sf.default is not dataclasses.MISSING else sf.default_factory()  # type: ignore[misc]
            shown = json.dumps(list(default) if isinstance(default, tuple) else default, ensure_ascii=False)
            tp = _type_name(sec_hints[sf.name]).replace("|", "\\|")
            lines.append(f"| `{sf.name}` | {tp} | `{shown}` | {sf.metadata['doc']} |")
        lines.append("")
    return "\n".join(lines)
