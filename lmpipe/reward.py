"""The ``reward`` stage: a reward model trained on preference pairs, the second step of InstructGPT (Ouyang et
al. 2022, "Training language models to follow instructions with human feedback", arXiv:2203.02155, sec. 3.5).

Model: the SFT transformer with its language-model head replaced by a scalar head, read at the last token
of the rendered (prompt, response) (:mod:`lmpipe.chat`; that token is the ``<|end|>`` closing the answer).
Rows are right-padded: with causal attention no real token sees the padding after it, so no mask is needed.

Loss (Bradley & Terry 1952; InstructGPT eq. 1): ``-log σ(r_chosen - r_rejected - m)`` with an optional
margin ``m`` (Touvron et al. 2023, "Llama 2", arXiv:2307.09288, eq. 2). A batch holds whole prompt groups:
each distinct answer of a group is scored once and every comparison of the group indexes into those
scores; each group weighs the same, however many comparisons it holds (InstructGPT's 1/C(K,2)). Training
runs the shared loop of :mod:`lmpipe.trainer` (optimizer, schedule, checkpoints, exact resume).

After training, the mean and standard deviation of the reward on train responses are stored with the
model, so PPO can normalise rewards. Evaluation on the held-out (test) pairs: pairwise accuracy overall,
per pair type and per family (corrupted negatives, ranked samples, files) beside two baselines, always
preferring the longer answer and a bag-of-words logistic model trained on the same pairs; the distribution
of r_chosen - r_rejected as a plot; calibration as accuracy per margin bucket. A model whose held-out
accuracy is below ``min_accuracy`` is refused to PPO with :class:`WeakRewardModel` (a weak reward model
invites reward hacking).
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model
from tokenizers import Tokenizer

from lmpipe import bootstrap, grounded, preferences
from lmpipe.bpe import PAD_ID
from lmpipe.chat import TEMPLATE_NAME, ChatTemplate, Message
from lmpipe.checkpoint import read_model_config, save_model_folder
from lmpipe.config import IngestConfig, PipelineConfig, RewardConfig
from lmpipe.gpt import GPT, GPTConfig
from lmpipe.preferences import Pair
from lmpipe.pretrain import TOKENIZER_FILE, file_sha256, load_lm, step_seed
from lmpipe.stage import Logger, NullLogger, StageContext, StageOutput
from lmpipe.trainer import Dist, Objective, Trainer, TrainSettings, resolve_device
from lmpipe.workspace import Workspace, atomic_write_text

MODEL_DIR = "model"


class WeakRewardModel(RuntimeError):
    """The reward model's held-out accuracy is below the floor set for handing it to PPO."""


# ----------------------------------------------------------------------------------------------
# the loss and the model


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """-log σ(r_chosen - r_rejected - margin), averaged (weighted by ``weight``, which sums to 1, if given).

    Under the Bradley-Terry model P(chosen ≻ rejected) = σ(r_chosen - r_rejected); this is its negative
    log-likelihood (InstructGPT eq. 1), with Llama 2's margin (eq. 2) asking for a gap of at least ``margin``.
    """
    nll = -F.logsigmoid(r_chosen.float() - r_rejected.float() - margin)
    return nll.mean() if weight is None else (nll * weight).sum()


class RewardNet(nn.Module):
    """A GPT body with a scalar head on the final hidden state of each sequence's last token."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.gpt = GPT(config)  # its language-model head is tied to the embedding and never used for rewards
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(config.n_embd + 1))  # InstructGPT-style unit scale
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) of right-padded token ids ``idx`` (B, T) read at positions ``last`` (B,)."""
        B, T = idx.shape
        rows = torch.arange(B, device=idx.device) * T + last  # the last block runs its MLP there only
        return self.head(self.gpt.hidden(idx, rows=rows)).squeeze(-1)  # (B,)

    def flops_per_token(self) -> float:
        return self.gpt.flops_per_token()


def from_sft(model: GPT, seed: int) -> RewardNet:
    """A reward net whose body is a copy of ``model`` and whose head is freshly initialised from ``seed``."""
    torch.manual_seed(seed)
    net = RewardNet(model.config)
    net.gpt.load_state_dict(model.state_dict())
    return net.to(model.wte.weight.device)


# ----------------------------------------------------------------------------------------------
# groups and batches


@dataclass(frozen=True)
class Group:
    """The comparisons of one prompt: each distinct answer rendered once, pairs as (chosen, rejected) indices."""

    seqs: list[list[int]]
    pairs: list[tuple[int, int]]
    pair_types: list[str]


def fit_length(ids: Sequence[int], block_size: int) -> list[int]:
    """The last ``block_size`` tokens: the reward is read at the end, which must survive truncation."""
    return list(ids[-block_size:])


def grouped(pairs: Sequence[Pair]) -> list[Pair]:
    """``pairs`` reordered so each ``group_id``'s pairs are adjacent (groups in first-seen order): the order of
    the comparisons in :func:`build_groups`' output."""
    by_group: dict[str, list[Pair]] = {}
    for p in pairs:
        by_group.setdefault(p.group_id or p.context_digest(), []).append(p)
    return [p for members in by_group.values() for p in members]


def build_groups(template: ChatTemplate, pairs: Sequence[Pair], block_size: int) -> list[Group]:
    """Pairs gathered by ``group_id`` (in first-seen order), each distinct (context, answer) rendered once."""
    convs: list[list[Message]] = []  # every group's distinct conversations, group after group
    layout: list[tuple[dict[tuple[str, str], int], list[tuple[int, int]], list[str]]] = []
    current = None
    for p in grouped(pairs):
        if (p.group_id or p.context_digest()) != current or not layout:
            current = p.group_id or p.context_digest()
            layout.append(({}, [], []))
        index, refs, types = layout[-1]
        ends = []
        for text in (p.chosen, p.rejected):
            key = (p.context_digest(), text)
            if key not in index:
                index[key] = len(index)
                convs.append([*p.prompt_messages(), Message("assistant", text)])
            ends.append(index[key])
        refs.append((ends[0], ends[1]))
        types.append(p.pair_type)
    rendered = iter(template.render_many(convs))
    return [Group([fit_length(next(rendered).ids, block_size) for _ in index], refs, types)
            for index, refs, types in layout]


@dataclass(frozen=True)
class PairBatch:
    """Right-padded sequences ``idx`` (N, T) with their last positions, and the pairs as indices into them."""

    idx: torch.Tensor
    last: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    weight: torch.Tensor  # per pair; every group weighs the same and the weights sum to 1

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(*(t.to(device) for t in (self.idx, self.last, self.chosen, self.rejected, self.weight)))

    @property
    def tokens(self) -> int:
        return int(self.last.sum()) + len(self.last)


def collate(groups: Sequence[Group]) -> PairBatch:
    """One batch of whole groups: their sequences padded with ``<|pad|>`` after the end, pairs re-indexed."""
    seqs = [s for g in groups for s in g.seqs]
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    chosen, rejected, weight, offset = [], [], [], 0
    for g in groups:
        for c, r in g.pairs:
            chosen.append(offset + c)
            rejected.append(offset + r)
            weight.append(1.0 / (len(g.pairs) * len(groups)))
        offset += len(g.seqs)
    last = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
    return PairBatch(idx, last, torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long),
                     torch.tensor(weight, dtype=torch.float32))


@torch.no_grad()
def score_sequences(net: RewardNet, seqs: Sequence[Sequence[int]], batch_size: int = 32) -> np.ndarray:
    """Rewards of rendered sequences, batched by length (less padding), in the input order."""
    device = next(net.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = np.zeros(len(seqs), dtype=np.float64)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        batch = collate([Group([list(seqs[j]) for j in chunk], [], [])])
        out[chunk] = net(batch.idx.to(device), batch.last.to(device)).float().cpu().numpy()
    return out


@dataclass(frozen=True)
class Scored:
    """Rewards of every held-out pair: chosen, rejected and the pair type."""

    r_chosen: np.ndarray
    r_rejected: np.ndarray
    pair_types: list[str]

    @property
    def delta(self) -> np.ndarray:
        return self.r_chosen - self.r_rejected


def score_groups(net: RewardNet, groups: Sequence[Group], batch_size: int = 32) -> Scored:
    """Score each distinct answer once; return both rewards of every pair."""
    seqs = [s for g in groups for s in g.seqs]
    rewards = score_sequences(net, seqs, batch_size)
    chosen, rejected, types, offset = [], [], [], 0
    for g in groups:
        chosen += [offset + c for c, _ in g.pairs]
        rejected += [offset + r for _, r in g.pairs]
        types += g.pair_types
        offset += len(g.seqs)
    return Scored(rewards[chosen], rewards[rejected], types)


# ----------------------------------------------------------------------------------------------
# the objective


def group_stream(n_groups: int, position: int, count: int, seed: int) -> list[int]:
    """Groups ``position .. position + count - 1`` of an endless stream of shuffled epochs (a pure function)."""
    out = []
    for g in range(position, position + count):
        epoch, offset = divmod(g, n_groups)
        out.append(int(np.random.default_rng(step_seed(seed, epoch)).permutation(n_groups)[offset]))
    return out


class PreferenceObjective(Objective):
    """Bradley-Terry loss on batches of whole prompt groups; val pairwise accuracy and loss."""

    def __init__(self, cfg: RewardConfig, train: Sequence[Group], val: Sequence[Group], dist: Dist) -> None:
        if not train:
            raise ValueError("no train preference pairs to train the reward model on")
        self.cfg, self.train, self.dist = cfg, list(train), dist
        self.val = _first_pairs(val, cfg.eval_pairs)

    def batches(self, step: int) -> list[PairBatch]:
        cfg, d = self.cfg, self.dist
        per_rank = cfg.batch_size * cfg.grad_accum
        picked = group_stream(len(self.train), (step * d.world_size + d.rank) * per_rank, per_rank, cfg.seed)
        return [collate([self.train[i] for i in picked[j : j + cfg.batch_size]]).to(d.device)
                for j in range(0, per_rank, cfg.batch_size)]

    def loss(self, model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, int]:
        r = model(batch.idx, batch.last)  # (N,)
        return bradley_terry_loss(r[batch.chosen], r[batch.rejected], self.cfg.margin, batch.weight), batch.tokens

    def evaluate(self, model: RewardNet, step: int, last: bool) -> dict[str, float]:
        if not self.val:
            return {}
        scored = score_groups(model, self.val)
        delta = torch.from_numpy(scored.delta)
        return {"val_accuracy": pairwise_accuracy(scored.delta),
                "val_loss": float(bradley_terry_loss(delta, torch.zeros_like(delta), self.cfg.margin))}


def _first_pairs(groups: Sequence[Group], limit: int) -> list[Group]:
    """Whole groups from the start until they hold ``limit`` pairs (0: all)."""
    out, n = [], 0
    for g in groups:
        if limit and n >= limit:
            break
        out.append(g)
        n += len(g.pairs)
    return out


# ----------------------------------------------------------------------------------------------
# evaluation: accuracy, baselines, calibration


def pairwise_accuracy(delta: np.ndarray) -> float:
    """Share of pairs where the chosen answer scores higher; a tie counts half (a coin flip)."""
    delta = np.asarray(delta, dtype=np.float64)
    if not len(delta):
        return math.nan
    return float(((delta > 0).sum() + 0.5 * (delta == 0).sum()) / len(delta))


def accuracy_interval(delta: np.ndarray, groups: Sequence[str], level: float = 0.95, resamples: int = 2000,
                      seed: int = 0, baseline: np.ndarray | None = None) -> tuple[float, float]:
    """A ``level`` interval for :func:`pairwise_accuracy` by the percentile bootstrap over ``groups``; with
    ``baseline`` (another scorer's deltas on the same pairs), for the accuracy minus the baseline's.

    The pairs of one prompt share its context and its answers, so they are not independent draws: a
    bootstrap over pairs (or a binomial standard error) would be too narrow. This one resamples whole
    groups (``groups[i]`` is pair i's) with replacement, ``resamples`` times; both scorers see the same
    resampled pairs, so the difference is paired.
    """
    delta = np.asarray(delta, dtype=np.float64)
    if not len(delta):
        return math.nan, math.nan
    ids, index = np.unique(np.asarray(groups), return_inverse=True)

    def correct(d: np.ndarray) -> np.ndarray:  # right answers per group, a tie counting half
        return np.bincount(index, weights=(d > 0) + 0.5 * (d == 0), minlength=len(ids))

    right = correct(delta) if baseline is None else correct(delta) - correct(np.asarray(baseline, np.float64))
    count = np.bincount(index, minlength=len(ids)).astype(np.float64)
    draws = bootstrap.resample_counts(len(ids), resamples, seed)
    return bootstrap.percentile_interval((draws @ right) / (draws @ count), level)


def longer_baseline(pairs: Sequence[Pair]) -> np.ndarray:
    """The always-prefer-longer "reward" difference: len(chosen) - len(rejected) in characters."""
    return np.array([len(p.chosen) - len(p.rejected) for p in pairs], dtype=np.float64)


class BagOfWords:
    """A linear reward over word counts of the answer, r = w·φ(answer), fit by the same Bradley-Terry loss.

    Logistic regression on the feature differences φ(chosen) - φ(rejected) without intercept (the order of a
    pair carries no information), L2-regularised, fit full-batch by L-BFGS. The prompt's words cancel in the
    difference, so only the answer's are counted: the ``max_features`` most frequent words (seen in at least
    ``min_count`` train answers) from :func:`lmpipe.grounded.words`. The differences are held dense, which on
    a CPU is several times faster than sparse products at this size.
    """

    def __init__(self, min_count: int = 2, max_features: int = 20_000) -> None:
        self.min_count, self.max_features = min_count, max_features
        self.vocab: dict[str, int] = {}
        self.w = torch.zeros(0)

    def build_vocab(self, pairs: Sequence[Pair]) -> BagOfWords:
        counts = Counter(w for p in pairs for text in (p.chosen, p.rejected) for w in set(grounded.words(text)))
        common = [w for w, n in counts.most_common(self.max_features) if n >= self.min_count]
        self.vocab = {w: i for i, w in enumerate(sorted(common))}
        return self

    def difference(self, pairs: Sequence[Pair]) -> torch.Tensor:
        """φ(chosen) - φ(rejected) of every pair, (pairs, features)."""
        out = np.zeros((len(pairs), len(self.vocab)), dtype=np.float32)
        for i, p in enumerate(pairs):
            for text, sign in ((p.chosen, 1.0), (p.rejected, -1.0)):
                for word in grounded.words(text):
                    j = self.vocab.get(word)
                    if j is not None:
                        out[i, j] += sign
        return torch.from_numpy(out)

    def fit(self, diff: torch.Tensor, l2: float, max_iter: int = 100) -> BagOfWords:
        """Weights minimising the mean Bradley-Terry loss of ``diff`` (from :meth:`difference`) + l2/2·|w|²."""
        w = torch.zeros(diff.size(1), requires_grad=True)
        optimizer = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            delta = diff @ w
            loss = bradley_terry_loss(delta, torch.zeros_like(delta)) + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        if diff.numel():
            optimizer.step(closure)
        self.w = w.detach()
        return self

    def delta(self, pairs: Sequence[Pair]) -> np.ndarray:
        """r(chosen) - r(rejected) of each pair."""
        return (self.difference(pairs) @ self.w).double().numpy() if pairs else np.zeros(0)


def fit_bag_of_words(train: Sequence[Pair], val: Sequence[Pair], l2_grid: Sequence[float] = (1e-3, 1e-2, 1e-1)
                     ) -> BagOfWords:
    """The bag-of-words baseline with the L2 strength that does best on ``val`` (the first, without val pairs)."""
    bow = BagOfWords().build_vocab(train)
    diff, val_diff = bow.difference(train), bow.difference(val)
    best_w, best_acc = None, -1.0
    for l2 in l2_grid:
        w = bow.fit(diff, l2).w
        acc = pairwise_accuracy((val_diff @ w).numpy()) if len(val) else 0.0
        if acc > best_acc:
            best_w, best_acc = w, acc
    bow.w = best_w
    return bow


def accuracy_table(deltas: dict[str, np.ndarray], pair_types: Sequence[str]) -> dict[str, dict[str, float]]:
    """Accuracy of each scorer overall, per family (corrupted, ranked, file) and per pair type, with counts."""
    types = np.asarray(pair_types)
    families = np.asarray([preferences.FAMILIES.get(t, t) for t in pair_types])
    slices = {"all": np.ones(len(types), dtype=bool)}
    slices.update({f: families == f for f in dict.fromkeys(families.tolist())})
    slices.update({t: types == t for t in dict.fromkeys(types.tolist()) if t not in slices})
    table: dict[str, dict[str, float]] = {}
    for name, keep in slices.items():
        row = {scorer: pairwise_accuracy(d[keep]) for scorer, d in deltas.items()}
        table[name] = {**row, "pairs": float(keep.sum())}
    return table


def calibration(delta: np.ndarray, buckets: int) -> list[dict[str, float]]:
    """Accuracy per bucket of the margin |Δ| (quantile buckets), beside the Bradley-Terry prediction σ(|Δ|)."""
    delta = np.asarray(delta, dtype=np.float64)
    if not len(delta):
        return []
    size = np.abs(delta)
    edges = np.quantile(size, np.linspace(0, 1, buckets + 1))
    which = np.clip(np.searchsorted(edges, size, side="right") - 1, 0, buckets - 1)
    rows = []
    for b in range(buckets):
        keep = which == b
        if keep.any():
            mean = float(size[keep].mean())
            rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "pairs": float(keep.sum()),
                         "mean_margin": mean, "accuracy": pairwise_accuracy(delta[keep]),
                         "predicted": 1.0 / (1.0 + math.exp(-mean))})
    return rows


def plot_margins(scored: Scored, path: Path) -> Path:
    """Histogram of r_chosen - r_rejected on held-out pairs, one series per family."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    delta = scored.delta
    families = np.asarray([preferences.FAMILIES.get(t, t) for t in scored.pair_types])
    bins = np.linspace(float(delta.min(initial=-1)), float(delta.max(initial=1)), 40)
    for family in dict.fromkeys(families.tolist()):
        keep = families == family
        ax.hist(delta[keep], bins=bins, alpha=0.6, label=f"{family} (n={int(keep.sum())})")
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_title("Held-out pairs: r(chosen) - r(rejected); right of 0 is correct")
    ax.set_xlabel("reward margin")
    ax.set_ylabel("pairs")
    if len(delta):
        ax.legend()
    return _save(plt, fig, path)


def plot_calibration(rows: Sequence[dict[str, float]], path: Path) -> Path:
    """Observed accuracy per margin bucket against the Bradley-Terry prediction σ(|Δ|)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    x = [r["mean_margin"] for r in rows]
    ax.plot(x, [r["accuracy"] for r in rows], "o-", label="observed accuracy")
    ax.plot(x, [r["predicted"] for r in rows], "--", label="σ(margin) (Bradley-Terry)")
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("mean |r(chosen) - r(rejected)| in bucket")
    ax.set_ylabel("accuracy")
    ax.set_title("Calibration on held-out pairs")
    ax.legend()
    return _save(plt, fig, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# the trained model: loading, scoring, the floor


def check_floor(accuracy: float, floor: float) -> None:
    """Raise :class:`WeakRewardModel` unless ``accuracy`` (held-out pairwise) reaches ``floor``."""
    if not accuracy >= floor:  # NaN (no held-out pairs) is refused too
        shown = "unknown (no held-out pairs)" if math.isnan(accuracy) else f"{accuracy:.3f}"
        raise WeakRewardModel(
            f"reward model refused for PPO: held-out pairwise accuracy {shown} is below the floor {floor:.3f} "
            "(reward.min_accuracy); a weak reward model is the usual cause of reward hacking. Add or clean "
            "preference data, train longer, or lower the floor knowingly.")


class RewardModel:
    """A trained reward model ready to score: the net, the chat template and the train-reward statistics."""

    def __init__(self, net: RewardNet, tokenizer: Tokenizer, extra: dict[str, Any]) -> None:
        self.net, self.template, self.extra = net.eval(), ChatTemplate(tokenizer), extra
        self.mean = float(extra.get("reward_mean", 0.0))
        self.std = float(extra.get("reward_std", 1.0)) or 1.0

    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu", min_accuracy: float | None = None
             ) -> RewardModel:
        """The reward model in ``folder``; with ``min_accuracy``, refuse one whose held-out accuracy is lower."""
        config, extra = read_model_config(folder)
        if not extra.get("reward_model"):
            raise ValueError(f"{folder} holds no reward model (its config.json lacks reward_model: true)")
        if min_accuracy is not None:
            check_floor(float(extra.get("heldout_accuracy", math.nan)), min_accuracy)
        net = RewardNet(config)
        load_model(net, str(Path(folder) / "model.safetensors"), device=str(device))
        return cls(net.to(device), Tokenizer.from_file(str(Path(folder) / TOKENIZER_FILE)), extra)

    def score(self, prompts: Sequence[str | Sequence[Message]], responses: Sequence[str], normalize: bool = False,
              batch_size: int = 32) -> list[float]:
        """Rewards of each (prompt, response); ``normalize`` standardises them by the train statistics."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        convs = [[Message("user", p)] if isinstance(p, str) else list(p) for p in prompts]
        rendered = self.template.render_many([[*c, Message("assistant", r)] for c, r in zip(convs, responses,
                                                                                             strict=True)])
        block = self.net.config.block_size
        rewards = score_sequences(self.net, [fit_length(r.ids, block) for r in rendered], batch_size)
        return ((rewards - self.mean) / self.std if normalize else rewards).tolist()


# ----------------------------------------------------------------------------------------------
# entry points


@dataclass
class RewardResult:
    model_dir: Path
    metrics: dict[str, float]
    table: dict[str, dict[str, float]]
    calibration: list[dict[str, float]]
    scored: Scored
    losses: list[float] = field(default_factory=list)


def sampler(model: GPT, template: ChatTemplate, cfg: RewardConfig) -> preferences.Sampler:
    """K answers per prompt from ``model`` with the configured temperature and top-k, seeded."""
    from lmpipe.sft import answer

    def sample(prompts: Sequence[str], k: int) -> list[list[str]]:
        generator = torch.Generator(device=model.wte.weight.device).manual_seed(cfg.seed)
        texts = answer(model, template, [p for p in prompts for _ in range(k)], cfg.max_new_tokens,
                       cfg.sample_temperature, cfg.sample_top_k or None, batch_size=64, generator=generator)
        return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]

    return sample


def prepare_data(ws: Workspace, cfg: RewardConfig, ingest_cfg: IngestConfig, sft_dir: Path,
                 device: torch.device) -> dict[str, float]:
    """Ingest ``cfg.sources`` and derive the built-in pairs (if enabled); return counts per split and type."""
    if cfg.sources:
        preferences.ingest_files(ws, cfg.sources, ingest_cfg)
    if cfg.builtin:
        objects = preferences.stdlib_objects(ws, ingest_cfg, cfg.max_response_chars)
        preferences.replace_source(ws, preferences.CORRUPTED_SOURCE,
                                   preferences.corrupted_pairs(objects, cfg.corruptions, cfg.seed), ingest_cfg)
        ranked = []
        chosen = preferences.choose_ranked_objects(objects, cfg.ranked_prompts, cfg.seed)
        if chosen:
            model, tokenizer, _ = load_lm(sft_dir, device)
            ranked = preferences.ranked_pairs(chosen, sampler(model, ChatTemplate(tokenizer), cfg),
                                              cfg.samples_per_prompt)
        preferences.replace_source(ws, preferences.RANKED_SOURCE, ranked, ingest_cfg)
    counts = preferences.counts(ws, cfg.builtin)
    preferences.TABLE.require_train(counts, "reward", "preference pairs", cfg.builtin, "JSONL or Parquet: "
                                    "prompt/chosen/rejected, or chosen/rejected dialogues", "sft")
    return {f"pairs_{k}": float(n) for k, n in counts.items()}


def reward_stats(net: RewardNet, groups: Sequence[Group], limit: int, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of the reward over distinct train responses (a random ``limit`` of them)."""
    seqs = [s for g in groups for s in g.seqs]
    if not seqs:
        return 0.0, 1.0
    if limit and limit < len(seqs):
        seqs = [seqs[i] for i in np.random.default_rng(seed).choice(len(seqs), limit, replace=False)]
    rewards = score_sequences(net, seqs)
    return float(rewards.mean()), float(rewards.std()) if len(rewards) > 1 else 1.0


def evaluate(net: RewardNet, template: ChatTemplate, data: dict[str, list[Pair]], cfg: RewardConfig
             ) -> tuple[dict[str, dict[str, float]], list[dict[str, float]], Scored]:
    """Held-out (test) accuracies of the model and both baselines, and the model's calibration."""
    test = data["test"]
    scored = score_groups(net, build_groups(template, test, net.config.block_size))
    ordered = grouped(test)  # the pair order of score_groups' output
    bow = fit_bag_of_words(data["train"], data["val"])
    deltas = {"reward_model": scored.delta, "longer": longer_baseline(ordered), "bag_of_words": bow.delta(ordered)}
    table = accuracy_table(deltas, scored.pair_types)
    if "all" in table:
        groups = [p.group_id or p.context_digest() for p in ordered]
        low, high = accuracy_interval(scored.delta, groups, seed=cfg.seed)
        table["all"] |= {"reward_model_low": low, "reward_model_high": high}
        for name in ("longer", "bag_of_words"):  # the gain over each baseline, on the same resampled prompts
            low, high = accuracy_interval(scored.delta, groups, seed=cfg.seed, baseline=deltas[name])
            table["all"] |= {f"gain_over_{name}_low": low, f"gain_over_{name}_high": high}
    return table, calibration(scored.delta, cfg.calibration_buckets), scored


def train_reward(ws: Workspace, cfg: RewardConfig, sft_dir: Path, out_dir: Path, log: Logger | None = None,
                 progress: bool = True, dist: Dist | None = None) -> RewardResult | None:
    """Train the reward model from the SFT model in ``sft_dir`` on the workspace's preference pairs (resuming
    if ``out_dir`` has checkpoints), record the train reward statistics, evaluate, write ``out_dir/model``.

    Under torchrun (``dist``) each rank trains on its own prompt groups of every step and DDP averages the
    gradients; rank 0 alone evaluates and writes, and the other ranks return None.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = dist or Dist(device=resolve_device(cfg.device))
    device, out_dir = dist.device, Path(out_dir)
    sft_model, tokenizer, extra = load_lm(sft_dir, device)
    template, block = ChatTemplate(tokenizer), sft_model.config.block_size
    data = {s: preferences.load_pairs(ws, s, cfg.builtin) for s in preferences.SPLITS}
    groups = {s: build_groups(template, data[s], block) for s in ("train", "val")}
    net = from_sft(sft_model, cfg.seed)
    trainer = Trainer(net, TrainSettings.from_section(cfg), out_dir, log or NullLogger(), dist, progress)
    trainer.fit(PreferenceObjective(cfg, groups["train"], groups["val"], trainer.dist))
    if not dist.is_main:
        return None
    net = trainer.raw_model.eval()
    mean, std = reward_stats(net, groups["train"], cfg.norm_responses, cfg.seed)
    table, calib, scored = evaluate(net, template, data, cfg)
    accuracy = table.get("all", {}).get("reward_model", math.nan)
    model_dir = out_dir / MODEL_DIR
    save_model_folder(net, model_dir, {  # type: ignore[arg-type] - RewardNet carries the GPTConfig as .config
        **{k: v for k, v in extra.items() if k in ("eot_id", "pad_id")}, "chat_template": TEMPLATE_NAME,
        "reward_model": True, "reward_mean": mean, "reward_std": std, "heldout_accuracy": accuracy,
        "trained_steps": trainer.step})
    shutil.copyfile(Path(sft_dir) / TOKENIZER_FILE, model_dir / TOKENIZER_FILE)
    metrics = summary_metrics(table, {s: len(p) for s, p in data.items()}, mean, std, trainer)
    return RewardResult(model_dir, metrics, table, calib, scored, trainer.losses)


def summary_metrics(table: dict[str, dict[str, float]], sizes: dict[str, int], mean: float, std: float,
                    trainer: Trainer) -> dict[str, float]:
    """Flat metrics: ``heldout_accuracy``, ``heldout_accuracy_<slice>`` and the baselines' ``<name>_accuracy...``."""
    out = {"reward_mean": mean, "reward_std": std, "steps": float(trainer.step),
           "tokens_trained": float(trainer.tokens), "tokens_processed": float(trainer.tokens),
           **{f"pairs_used_{s}": float(n) for s, n in sizes.items()}, **trainer.eval_metrics}
    for name, row in table.items():
        suffix = "" if name == "all" else f"_{name}"
        out[f"heldout_accuracy{suffix}"] = row["reward_model"]
        out[f"longer_accuracy{suffix}"] = row["longer"]
        out[f"bag_of_words_accuracy{suffix}"] = row["bag_of_words"]
        out[f"heldout_pairs{suffix}"] = row["pairs"]
        for key in ("reward_model_low", "reward_model_high", "gain_over_longer_low", "gain_over_longer_high",
                    "gain_over_bag_of_words_low", "gain_over_bag_of_words_high"):  # intervals, overall only
            if key in row:
                out[f"heldout_accuracy{suffix}_{key.removeprefix('reward_model_')}"] = row[key]
    return out


def evaluation_markdown(table: dict[str, dict[str, float]], calib: Sequence[dict[str, float]], floor: float) -> str:
    """The held-out accuracy table (model vs baselines) and the calibration table."""
    lines = ["# Reward model: held-out pairwise accuracy", "",
             "| pairs | n | reward model | always longer | bag of words |", "|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} | {int(row['pairs'])} | {row['reward_model']:.3f} | {row['longer']:.3f} | "
                     f"{row['bag_of_words']:.3f} |")
    overall = table.get("all", {})
    if "reward_model_low" in overall:
        lines += ["", f"Reward model on all pairs: {overall['reward_model']:.3f}, 95% interval "
                      f"{overall['reward_model_low']:.3f}-{overall['reward_model_high']:.3f} (bootstrap over prompts: "
                      "the pairs of one prompt are not independent)."]
    lines += ["", f"Floor for PPO (reward.min_accuracy): {floor:.3f}. A tie counts as half a correct answer.", "",
              "## Calibration: accuracy by margin bucket", "",
              "| margin range | n | mean margin | accuracy | σ(mean margin) |", "|---|---|---|---|---|"]
    for r in calib:
        lines.append(f"| {r['low']:.3f}-{r['high']:.3f} | {int(r['pairs'])} | {r['mean_margin']:.3f} | "
                     f"{r['accuracy']:.3f} | {r['predicted']:.3f} |")
    return "\n".join(lines) + "\n"


def write_reports(result: RewardResult, out_dir: Path, floor: float) -> dict[str, Path]:
    """metrics.json, evaluation.md and the two plots."""
    files = {"metrics": out_dir / "metrics.json", "evaluation": out_dir / "evaluation.md",
             "margins_plot": out_dir / "reward_margins.png", "calibration_plot": out_dir / "calibration.png"}
    atomic_write_text(files["metrics"], json.dumps({"metrics": result.metrics, "accuracy": result.table,
                                                    "calibration": result.calibration, "losses": result.losses},
                                                   indent=2))
    atomic_write_text(files["evaluation"], evaluation_markdown(result.table, result.calibration, floor))
    plot_margins(result.scored, files["margins_plot"])
    plot_calibration(result.calibration, files["calibration_plot"])
    return files


def run_stage(ctx: StageContext) -> StageOutput:
    """The ``reward`` stage: build the preference pairs, train the reward model, evaluate, refuse a weak one."""
    cfg: RewardConfig = ctx.section("reward")
    ws = ctx.workspace
    sft_dir = ws.abs(ctx.inputs["sft"].outputs["model"])
    counts = prepare_data(ws, cfg, ctx.config.ingest, sft_dir, resolve_device(cfg.device))
    ctx.log.metrics(counts)
    result = train_reward(ws, cfg, sft_dir, ctx.out_dir, ctx.log, ctx.progress)
    files = write_reports(result, ctx.out_dir, cfg.min_accuracy)
    for path in files.values():
        ctx.log.artifact(path)
    ctx.log.metrics(result.metrics)
    m = result.metrics
    check_floor(m.get("heldout_accuracy", math.nan), cfg.min_accuracy)  # after the reports, which show why
    interval = (f"95% interval {m['heldout_accuracy_low']:.3f}-{m['heldout_accuracy_high']:.3f}; "
                if "heldout_accuracy_low" in m else "")
    summary = (f"held-out pairwise accuracy {m['heldout_accuracy']:.3f} ({interval}always longer "
               f"{m['longer_accuracy']:.3f}, bag of words {m['bag_of_words_accuracy']:.3f}) on "
               f"{int(m['heldout_pairs'])} pairs; train reward {m['reward_mean']:.2f} ± {m['reward_std']:.2f}")
    outputs = {"model": ws.rel(result.model_dir), "tokenizer": ws.rel(result.model_dir / TOKENIZER_FILE),
               **{name: ws.rel(path) for name, path in files.items()}}
    return StageOutput(file_sha256(result.model_dir / "model.safetensors")[:32], outputs, {**counts, **m}, summary)


def external_inputs(ws: Workspace, cfg: PipelineConfig) -> dict[str, Any]:
    """The configured preference files (size, mtime) and the preference rows ingested outside the stage."""
    return preferences.TABLE.external_inputs(ws, cfg.reward.sources)


def main(argv: list[str] | None = None) -> None:
    """Train the reward model outside the pipeline, e.g. under torchrun on several GPUs (see lmpipe.launch)."""
    from lmpipe import launch
    from lmpipe.trainer import distributed

    p = launch.parser("python -m lmpipe.reward", main.__doc__)
    p.add_argument("--sft", help="SFT model folder (default: the workspace's last sft result).")
    args = p.parse_args(argv)
    cfg = launch.config(args)
    ws = Workspace.resolve(args.workspace)
    sft_dir = launch.stage_output(ws, args.sft, "sft", "model", "--sft")
    with distributed(cfg.reward.device) as dist:
        launch.prepare(ws, dist, "reward data", lambda: prepare_data(ws, cfg.reward, cfg.ingest, sft_dir, dist.device))
        result = train_reward(ws, cfg.reward, sft_dir, Path(args.out), dist=dist)
        if result is not None:
            write_reports(result, Path(args.out), cfg.reward.min_accuracy)
            launch.report(dist, result.metrics)
            check_floor(result.metrics.get("heldout_accuracy", math.nan), cfg.reward.min_accuracy)


if __name__ == "__main__":
    main()
