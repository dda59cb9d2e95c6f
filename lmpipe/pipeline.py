"""The pipeline's stages and their dependencies (pure data: no orchestration here).

Each :class:`~lmpipe.stage.Stage` names its config section, the stages it reads from, and the modules
whose source code is part of its cache key. ``flows/pipeline.py`` runs them in this order.
"""

from __future__ import annotations

from lmpipe import corpus
from lmpipe.stage import Stage

INGEST = Stage(
    name="ingest",
    section="ingest",
    deps=(),
    run=corpus.run_stage,
    code=(
        "lmpipe.corpus", "lmpipe.sources", "lmpipe.clean", "lmpipe.minhash", "lmpipe.stdlib_docs", "lmpipe.warehouse",
    ),
    headline=("documents_added", "documents_train", "documents_val", "documents_test", "mb_per_s"),
    external=corpus.external_inputs,
    valid=corpus.still_valid,
)


STAGES: tuple[Stage, ...] = (INGEST,)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def dependants(name: str) -> set[str]:
    """Stages that depend on ``name``, directly or through others (not including ``name``)."""
    out: set[str] = set()
    for s in STAGES:  # STAGES is in topological order, so one pass suffices
        if name in s.deps or out.intersection(s.deps):
            out.add(s.name)
    return out


def select(only: tuple[str, ...] = (), start: str | None = None, stop: str | None = None) -> list[str]:
    """Stage names to execute: ``only`` if given, else the range ``start``..``stop`` (inclusive)."""
    for n in (*only, start, stop):
        if n is not None:
            get_stage(n)
    if only:
        return [n for n in STAGE_NAMES if n in only]
    i = STAGE_NAMES.index(start) if start else 0
    j = STAGE_NAMES.index(stop) if stop else len(STAGE_NAMES) - 1
    if i > j:
        raise ValueError(f"--from {start} comes after --to {stop}")
    return list(STAGE_NAMES[i : j + 1])
