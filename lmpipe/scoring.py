"""Scoring text with any generation's language model, on one yardstick: bits per byte.

Bits per byte = total negative log2-likelihood / UTF-8 bytes of the scored text, where each document
counts as its text plus one trailing newline byte (the model's end-of-document prediction, ``</s>`` for
word models, pays for the line end). Models with different tokenizers are comparable on it; perplexity
is per token of the model's own tokenizer and is not.

Each language-model stage registers a scorer: a function ``(workspace, StageResult, texts, options) ->
TextScore``, named as ``"module:function"`` so that it is imported only when used (scoring with the n-gram
model never imports torch). A later stage adds itself with one line next to its code, for example
``SCORERS["gpt"] = "lmpipe.gpt:score_stage"`` here, or :func:`register` at import time; ``lmpipe score FILE
--stage NAME`` then scores with it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lmpipe.stage import StageResult
from lmpipe.workspace import Workspace

Scorer = Callable[[Workspace, StageResult, Sequence[str], Mapping[str, Any]], "TextScore"]

SCORERS: dict[str, str] = {
    "ngram": "lmpipe.ngram:score_stage",
    "embeddings": "lmpipe.embeddings:score_stage",
    "pretrain": "lmpipe.pretrain:score_stage",
    "sft": "lmpipe.pretrain:score_stage",  # same model folder format
}


@dataclass(frozen=True)
class TextScore:
    """How well one model predicts a set of texts."""

    model: str  # e.g. "ngram kn order 3"
    tokens: int  # predicted tokens, including each document's end token
    oov: int  # tokens outside the model's vocabulary
    nll_bits: float  # total negative log2-likelihood, out-of-vocabulary words charged for their spelling
    bytes: int  # UTF-8 bytes, one newline per document included (see text_bytes)
    perplexity: float  # 2^(nll_bits / tokens)
    perplexity_unk: float  # per-token perplexity with <unk> scored as one token, as KenLM reports it
    bits_per_byte: float  # nll_bits / bytes
    oov_rate: float  # oov / tokens
    zero_prob: int = 0  # tokens with probability 0 (unsmoothed models); perplexity is then infinite

    def to_json(self) -> dict[str, Any]:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in asdict(self).items()}


def text_bytes(texts: Iterable[str]) -> int:
    """UTF-8 bytes of ``texts`` with one newline byte per document (the bits-per-byte denominator)."""
    return sum(len(t.encode("utf-8")) + 1 for t in texts)


def make_score(model: str, texts: Sequence[str], tokens: int, oov: int, nll_bits: float, nll_bits_unk: float,
               zero_prob: int = 0) -> TextScore:
    """A :class:`TextScore` from totals; ``nll_bits_unk`` charges an unknown word as the single token ``<unk>``."""
    n_bytes = text_bytes(texts)
    per_token = nll_bits / tokens if tokens else float("nan")
    return TextScore(
        model=model, tokens=tokens, oov=oov, nll_bits=nll_bits, bytes=n_bytes,
        perplexity=2.0 ** per_token if math.isfinite(per_token) else float("inf"),
        perplexity_unk=2.0 ** (nll_bits_unk / tokens) if tokens and math.isfinite(nll_bits_unk) else float("inf"),
        bits_per_byte=nll_bits / n_bytes if n_bytes else float("nan"),
        oov_rate=oov / tokens if tokens else 0.0, zero_prob=zero_prob,
    )


def register(stage: str, target: str) -> None:
    """Make ``lmpipe score --stage STAGE`` use ``target`` ("module:function")."""
    SCORERS[stage] = target


def scorer(stage: str) -> Scorer:
    """The scoring function registered for ``stage`` (imported now)."""
    if stage not in SCORERS:
        raise KeyError(f"no scorer for stage {stage!r}; stages with one: {', '.join(sorted(SCORERS))}")
    module, _, name = SCORERS[stage].partition(":")
    return getattr(importlib.import_module(module), name)


def score(ws: Workspace, result: StageResult, texts: Sequence[str], options: Mapping[str, Any] | None = None
          ) -> TextScore:
    """Score ``texts`` with the model that ``result`` (a stage's last result) produced."""
    return scorer(result.stage)(ws, result, texts, options or {})
