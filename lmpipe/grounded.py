"""Grounded overlap metrics: how much of a reference answer a generated answer reproduces.

Both metrics compare normalised word tokens: lower-cased runs of letters, digits and underscores, with
the articles "a", "an" and "the" dropped, as in the SQuAD evaluation (Rajpurkar et al. 2016,
arXiv:1606.05250). ``os.path.join`` gives ``["os", "path", "join"]``.

- Token F1 (SQuAD): the harmonic mean of precision and recall of the bag of tokens.
- ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", sec. 3): the F-measure
  of the longest common subsequence, so word order counts where token F1 ignores it.

Empty against empty scores 1, empty against non-empty 0 (the SQuAD convention).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

ARTICLES = frozenset({"a", "an", "the"})
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The normalised tokens of ``text``: lower-cased ``\\w+`` runs without articles."""
    return [w for w in _WORD.findall(text.lower()) if w not in ARTICLES]


def f_measure(precision: float, recall: float, beta: float = 1.0) -> float:
    """F_beta = (1 + β²)·P·R / (R + β²·P); 0 when both are 0 (van Rijsbergen 1979)."""
    denominator = recall + beta**2 * precision
    return (1 + beta**2) * precision * recall / denominator if denominator > 0 else 0.0


def token_f1(candidate: str, reference: str) -> float:
    """SQuAD token F1: overlap counted with multiplicity, P = overlap/|candidate|, R = overlap/|reference|."""
    cand, ref = words(candidate), words(reference)
    if not cand or not ref:
        return float(cand == ref)
    overlap = sum((Counter(cand) & Counter(ref)).values())
    return f_measure(overlap / len(cand), overlap / len(ref))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, O(|a|·|b|))."""
    if len(a) < len(b):
        a, b = b, a  # keep the row over the shorter sequence
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(candidate: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure: P = LCS/|candidate|, R = LCS/|reference| (Lin 2004, eqs. 2-4)."""
    cand, ref = words(candidate), words(reference)
    if not cand or not ref:
        return float(cand == ref)
    lcs = lcs_length(cand, ref)
    return f_measure(lcs / len(cand), lcs / len(ref), beta)


def mean_overlap(candidates: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean token F1 and ROUGE-L of paired candidates and references."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if not candidates:
        return {"token_f1": float("nan"), "rouge_l": float("nan")}
    n = len(candidates)
    return {
        "token_f1": sum(token_f1(c, r) for c, r in zip(candidates, references, strict=True)) / n,
        "rouge_l": sum(rouge_l(c, r) for c, r in zip(candidates, references, strict=True)) / n,
    }
