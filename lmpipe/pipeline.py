"""The pipeline's stages and their dependencies (pure data: no orchestration here).

Each :class:`~lmpipe.stage.Stage` names its config section and the stages it reads from; the source of
the modules its ``run`` imports is part of its cache key (:func:`lmpipe.stage.code_modules`).
``flows/pipeline.py`` runs them in this order.
"""

from __future__ import annotations

from lmpipe import corpus, embeddings, ngram, ppo, pretrain, report, reward, sft, shards
from lmpipe.stage import Stage

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
