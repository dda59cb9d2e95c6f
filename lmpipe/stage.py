"""The stage interface shared by every step of the pipeline.

A stage is a pure function ``run(ctx) -> StageOutput``: it reads its config section and the results of
the stages it depends on from the :class:`StageContext`, reports metrics through ``ctx.log`` and writes
files under ``ctx.out_dir``. The orchestration layer wraps it in a Prefect task and an MLflow run.

A stage's cache key hashes (stage name, its config section, the fingerprints of its inputs, the source
of the modules that implement it, and any external input it declares). The modules are found, not listed:
every module of the package that the stage's own module imports, directly or through others, at the top
or inside a function (:func:`code_modules`), less the few that cannot change a result (:data:`NOT_RESULTS`).
The key decides whether a cached result can be reused; the result's own ``fingerprint`` describes the data
it produced, so a stage that reruns and produces identical data leaves its dependants cached.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lmpipe import __version__
from lmpipe.config import PipelineConfig, fingerprint_data
from lmpipe.workspace import Workspace


class Logger(Protocol):
    """The metrics callback a stage reports through (MLflow in the pipeline, nothing in plain library use)."""

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None: ...
    def params(self, values: Mapping[str, Any]) -> None: ...
    def tags(self, values: Mapping[str, str]) -> None: ...
    def artifact(self, path: Path, subdir: str | None = None) -> None: ...
    def text(self, text: str, name: str) -> None: ...


class NullLogger:
    """A logger that records nothing, so "no tracking" needs no ``if`` in stage code."""

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        pass

    def params(self, values: Mapping[str, Any]) -> None:
        pass

    def tags(self, values: Mapping[str, str]) -> None:
        pass

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        pass

    def text(self, text: str, name: str) -> None:
        pass


class RecordingLogger(NullLogger):
    """A logger that keeps everything in memory: for tests, notebooks and scripts that want the numbers."""

    def __init__(self) -> None:
        self.history: list[tuple[dict[str, float], int | None]] = []  # (values, step), in logging order
        self.latest: dict[str, float] = {}  # the last value of each metric
        self.texts: dict[str, str] = {}
        self.artifacts: list[str] = []  # file names

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        self.history.append((dict(values), step))
        self.latest.update(values)

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        self.artifacts.append(Path(path).name)

    def text(self, text: str, name: str) -> None:
        self.texts[name] = text


@dataclass(frozen=True)
class StageOutput:
    """What a stage function returns: a fingerprint of its data, its files and its headline metrics."""

    fingerprint: str
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path relative to the workspace
    metrics: dict[str, float] = field(default_factory=dict)
    summary: str = ""


@dataclass(frozen=True)
class StageResult:
    """A stage's output plus where it came from; JSON round-trippable (stored by the cache)."""

    stage: str
    cache_key: str
    fingerprint: str
    outputs: dict[str, str]
    metrics: dict[str, float]
    summary: str = ""
    run_id: str | None = None  # MLflow run that produced it
    finished_at: float | None = None
    key_detail: dict[str, Any] | None = None  # what the cache key was made of (Stage.key), to say why it changed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class StageContext:
    workspace: Workspace
    config: PipelineConfig
    inputs: Mapping[str, StageResult]
    out_dir: Path
    log: Logger = field(default_factory=NullLogger)
    progress: bool = True

    def section(self, name: str) -> Any:
        return getattr(self.config, name)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    ``section`` names the config section; ``deps`` the upstream stages whose results it reads; ``code``
    modules whose source is part of the cache key besides those the module of ``run`` imports; ``external``
    an optional function returning a JSON-able description of inputs outside the workspace (e.g. source
    files' sizes and times); ``valid`` an optional check that a cached result still matches the workspace
    (outputs not deleted).
    """

    name: str
    section: str
    deps: tuple[str, ...]
    run: Callable[[StageContext], StageOutput]
    code: tuple[str, ...] = ()
    headline: tuple[str, ...] = ()
    external: Callable[[Workspace, PipelineConfig], Any] | None = None
    valid: Callable[[Workspace, StageResult], bool] | None = None

    def cache_key(self, ws: Workspace, cfg: PipelineConfig, inputs: Mapping[str, StageResult]) -> str:
        return self.key(ws, cfg, inputs)[0]

    def key(self, ws: Workspace, cfg: PipelineConfig, inputs: Mapping[str, StageResult]
            ) -> tuple[str, dict[str, Any]]:
        """The cache key and, readably, what it is made of: the section's values, the inputs' fingerprints,
        a digest per code module and one of the external inputs (compared by :func:`key_changes`)."""
        modules = code_modules((self.run.__module__, *self.code))
        external = self.external(ws, cfg) if self.external else None
        parts = {
            "stage": self.name,
            "config": json.loads(fingerprint_data(getattr(cfg, self.section))),
            "inputs": {d: inputs[d].fingerprint for d in self.deps},
            "code": code_version(modules),
            "external": external,
        }
        detail = {
            "config": parts["config"],
            "inputs": parts["inputs"],
            "code": self.code_digests(modules),
            "external": hashlib.sha256(json.dumps(external, sort_keys=True).encode()).hexdigest()[:16],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), detail

    def code_digests(self, modules: Iterable[str] | None = None) -> dict[str, str]:
        """A short digest of each module the stage's key covers (``modules``: those of :func:`code_modules`)."""
        if modules is None:
            modules = code_modules((self.run.__module__, *self.code))
        return {m: hashlib.sha256(_module_file(m).read_bytes()).hexdigest()[:16] for m in modules}

    def is_valid(self, ws: Workspace, result: StageResult) -> bool:
        """Outputs that a cached result names must still exist (and pass the stage's own check)."""
        if any(not ws.abs(p).exists() for p in result.outputs.values()):
            return False
        return self.valid(ws, result) if self.valid else True


# Modules whose source cannot change what a stage produces: configuration values are keyed by value, and
# these only route, record or draw. Editing one reruns no stage (``lmpipe run --force STAGE`` redraws its plots).
NOT_RESULTS = frozenset({
    "lmpipe.cli", "lmpipe.config", "lmpipe.launch", "lmpipe.pipeline", "lmpipe.plots", "lmpipe.stage",
    "lmpipe.state", "lmpipe.tracking", "lmpipe.workspace",
})


def _module_file(name: str) -> Path:
    try:
        origin = getattr(importlib.util.find_spec(name), "origin", None)
    except ValueError:  # a module without a spec, e.g. a script run as __main__
        origin = getattr(sys.modules.get(name), "__file__", None)
    if origin is None:
        raise ImportError(f"stage code module {name} not found")
    return Path(origin)


_IMPORTS: dict[tuple[str, str, int, int], frozenset[str]] = {}  # by module, file, mtime and size


def _imports_of(name: str) -> frozenset[str]:
    """:func:`_imported` of module ``name``, read again only when its file changes."""
    path = _module_file(name)
    st = path.stat()
    key = (name, str(path), st.st_mtime_ns, st.st_size)
    if key not in _IMPORTS:
        _IMPORTS[key] = frozenset(_imported(name, path.read_text(encoding="utf-8")))
    return _IMPORTS[key]


def _imported(name: str, source: str) -> set[str]:
    """The modules of ``name``'s package that ``source`` (the module ``name``) imports, anywhere in it."""
    package = name.split(".")[0]
    here = name if _module_file(name).name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package that holds this module, up level - 1 packages
                parent = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # "from pkg import module"
    return {m for m in out if m.split(".")[0] == package and m != package and _is_module(m)}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a name imported from a module, not a submodule of a package
        return False


def code_modules(roots: Iterable[str], leave_out: frozenset[str] = NOT_RESULTS) -> list[str]:
    """``roots`` and every module of their package they import, directly or not, less ``leave_out``, sorted."""
    seen: set[str] = set()
    todo = [r for r in roots if r not in leave_out]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += sorted(_imports_of(name) - leave_out - seen)
    return sorted(seen)


def changed(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two mappings (one missing counts), sorted."""
    return [k for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]


def key_changes(before: Mapping[str, Any], now: Mapping[str, Any], most: int = 3) -> list[str]:
    """Why a cache key changed, from two :meth:`Stage.key` details: config values, inputs, modules, external."""
    out = []
    old_cfg, new_cfg = before.get("config", {}), now.get("config", {})
    keys = changed(old_cfg, new_cfg)
    if keys:
        shown = ", ".join(f"{k} {json.dumps(old_cfg.get(k))} -> {json.dumps(new_cfg.get(k))}" for k in keys[:most])
        out.append(f"config: {shown}" + (f" and {len(keys) - most} more" if len(keys) > most else ""))
    old_in, new_in = before.get("inputs", {}), now.get("inputs", {})
    differ = [d for d in new_in if old_in.get(d) != new_in[d]]
    if differ:
        out.append(f"input: {', '.join(differ)} produced a different result")
    modules = changed(before.get("code", {}), now.get("code", {}))
    if modules:
        out.append(f"code: {', '.join(modules[:most])}" + (f" and {len(modules) - most} more" if len(modules) > most
                                                           else "") + " changed")
    if before.get("external") != now.get("external"):
        out.append("external inputs changed (files, or rows ingested outside the pipeline)")
    return out


def code_version(roots: Iterable[str], leave_out: frozenset[str] = NOT_RESULTS) -> str:
    """Hash of the package version and the source files of :func:`code_modules` of ``roots``."""
    h = hashlib.sha256(__version__.encode())
    for name in code_modules(roots, leave_out):  # idempotent on its own result, as Stage.key passes it
        h.update(name.encode())
        h.update(_module_file(name).read_bytes())
    return h.hexdigest()[:16]
