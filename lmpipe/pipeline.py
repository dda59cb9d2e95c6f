"""The pipeline's stages and their dependencies (pure data: no orchestration here).

Each :class:`~lmpipe.stage.Stage` names its config section and the stages it reads from; the source of
the modules its ``run`` imports is part of its cache key (:func:`lmpipe.stage.code_modules`).
``flows/pipeline.py`` runs them in this order.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmpipe import corpus, embeddings, ngram, ppo, pretrain, report, reward, sft, shards
from lmpipe.config import PipelineConfig
from lmpipe.stage import Stage, StageResult, key_changes
from lmpipe.state import load_stage_state
from lmpipe.workspace import Workspace

INGEST = Stage(
    name="ingest",
    section="ingest",
    deps=(),
    run=corpus.run_stage,
    headline=("documents_added", "documents_train", "documents_val", "documents_test", "mb_per_s"),
    external=corpus.external_inputs,
    valid=corpus.still_valid,
)

NGRAM = Stage(
    name="ngram",
    section="ngram",
    deps=("ingest",),
    run=ngram.run_stage,
    headline=("best_val_perplexity", "best_val_bits_per_byte", "oov_rate_val", "vocab_size", "train_tokens"),
)

EMBEDDINGS = Stage(
    name="embeddings",
    section="embeddings",
    deps=("ngram",),
    run=embeddings.run_stage,
    headline=("nnlm_val_perplexity", "nnlm_val_bits_per_byte", "rnnlm_val_perplexity", "rnnlm_val_bits_per_byte",
              "w2v_sg-ns_words_per_s"),
)

TOKENIZER = Stage(
    name="tokenizer",
    section="tokenizer",
    deps=("ingest",),
    run=shards.run_stage,
    headline=("vocab_size", "tokens_train", "val_bytes_per_token", "encode_mb_per_s"),
    valid=shards.still_valid,
)

PRETRAIN = Stage(
    name="pretrain",
    section="pretrain",
    deps=("tokenizer",),
    run=pretrain.run_stage,
    headline=("val_loss", "val_bpb", "test_bpb", "params"),
)

SFT = Stage(
    name="sft",
    section="sft",
    deps=("ingest", "tokenizer", "pretrain"),
    run=sft.run_stage,
    headline=("val_response_loss", "heldout_token_f1", "heldout_token_f1_gain", "heldout_rouge_l", "test_bpb"),
    external=sft.external_inputs,
)

REWARD = Stage(
    name="reward",
    section="reward",
    deps=("ingest", "sft"),
    run=reward.run_stage,
    headline=("heldout_accuracy", "longer_accuracy", "bag_of_words_accuracy", "reward_mean", "reward_std"),
    external=reward.external_inputs,
)

PPO = Stage(
    name="ppo",
    section="ppo",
    deps=("ingest", "sft", "reward"),
    run=ppo.run_stage,
    headline=("heldout_reward", "heldout_reward_gain", "heldout_token_f1_gain", "final_kl", "target_kl"),
    external=ppo.external_inputs,
)

REPORT = Stage(
    name="report",
    section="report",
    deps=("ingest", "ngram", "embeddings", "tokenizer", "pretrain", "sft", "reward", "ppo"),
    run=report.run_stage,
    headline=report.HEADLINE,
)

STAGES: tuple[Stage, ...] = (INGEST, NGRAM, EMBEDDINGS, TOKENIZER, PRETRAIN, SFT, REWARD, PPO, REPORT)
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


def forced(names: tuple[str, ...]) -> set[str]:
    """The stages that ``--force`` reruns: each named stage and its dependants."""
    out: set[str] = set()
    for name in names:
        get_stage(name)
        out |= {name} | dependants(name)
    return out


@dataclass(frozen=True)
class Step:
    """What a run would do with one stage, and why (:func:`plan`)."""

    stage: str
    action: str  # "reuse", "run", "maybe" (runs unless its inputs reproduce their results), "skip" or "missing"
    reasons: tuple[str, ...] = ()


def plan(ws: Workspace, cfg: PipelineConfig, only: tuple[str, ...] = (), start: str | None = None,
         stop: str | None = None, force: tuple[str, ...] = ()) -> list[Step]:
    """What ``lmpipe run`` with these options would do, stage by stage, without running anything.

    A stage is reused when its cache key matches a stored result; a stage downstream of one that runs is
    "maybe" unless its own config, code or external inputs changed: its key depends on what the upstream
    stage produces, and a rerun that reproduces its result leaves it cached.
    """
    selected, rerun = select(only, start, stop), forced(force)
    last: dict[str, StageResult | None] = {}
    steps: list[Step] = []
    pending: set[str] = set()  # stages whose result this run may change
    for stage in STAGES:
        state = load_stage_state(ws, stage.name)
        prior = last[stage.name] = state.result if state else None
        if stage.name not in selected:
            if prior is not None:
                steps.append(Step(stage.name, "skip", ("its last result is used",)))
            elif any(stage.name in s.deps for s in STAGES if s.name in selected):
                steps.append(Step(stage.name, "missing", ("never run, and a selected stage needs it",)))
            else:
                steps.append(Step(stage.name, "skip"))
            continue
        if stage.name in rerun:
            steps.append(Step(stage.name, "run", ("forced",)))
            pending.add(stage.name)
            continue
        if any(last[d] is None for d in stage.deps):
            missing = [d for d in stage.deps if last[d] is None]
            steps.append(Step(stage.name, "run" if prior is None else "maybe", (f"after {', '.join(missing)}",)))
            pending.add(stage.name)
            continue
        key, detail = stage.key(ws, cfg, {d: last[d] for d in stage.deps})  # type: ignore[misc]
        waiting = [d for d in stage.deps if d in pending]
        if prior is None:
            steps.append(Step(stage.name, "run", ("never run" if state is None else "its last attempt failed",)))
        elif prior.cache_key == key and not waiting:
            valid = stage.is_valid(ws, prior)
            steps.append(Step(stage.name, "reuse" if valid else "run", () if valid else ("outputs missing",)))
        else:
            why = key_changes(prior.key_detail, detail) if prior.key_detail else []  # none: an older result
            own = [r for r in why if not r.startswith("input:")] if why or waiting else ["cache key changed"]
            if waiting and not own:
                steps.append(Step(stage.name, "maybe", (_unless(waiting),)))
            elif (ws.results_dir / key).exists() and not waiting:
                steps.append(Step(stage.name, "reuse", ("an earlier result with this key", *why)))
            else:
                steps.append(Step(stage.name, "run", tuple(own or why)))
        if steps[-1].action != "reuse" or steps[-1].reasons:  # an earlier result: not the last one's fingerprint
            pending.add(stage.name)
    return steps


def _unless(stages: list[str]) -> str:
    if len(stages) == 1:
        return f"runs unless {stages[0]} reproduces its last result"
    return f"runs unless {', '.join(stages[:-1])} and {stages[-1]} reproduce their last results"
