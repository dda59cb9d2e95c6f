"""The ``ppo`` stage: RLHF with PPO, the third step of InstructGPT (Ouyang et al. 2022, arXiv:2203.02155).

The SFT model is the agent, a prompt its state, each response token an action, and the frozen reward
model the environment that scores the finished response. Each iteration:

1. rollout: sample responses to a batch of train prompts with the KV-cache generator, then record the
   per-token log-probs of the policy and of the frozen SFT reference, and the value of every state;
2. score: the reward model's score of each (prompt, response), normalised by the mean and standard
   deviation the reward stage measured on its train responses;
3. KL-penalised rewards: -β·KL(π || π_ref) on every response token, the score on the last one
   (Ziegler et al. 2019, arXiv:1909.08593); β fixed or steered towards a target KL;
4. advantages: GAE(γ, λ), whitened over the batch; returns for the value loss;
5. updates: several epochs over minibatches: PPO's clipped surrogate, the clipped value loss, an optional
   entropy bonus, gradient clipping (Schulman et al. 2017, arXiv:1707.06347).

The math lives in :mod:`lmpipe.rl`; the optimiser, schedule, checkpoints and exact resume are
:mod:`lmpipe.trainer`'s. The value function is a scalar head on its own transformer initialised from the
reward model, or a head on the policy's transformer (``ppo.value_model``). Dropout is off in every model:
the probability ratio must compare the same function before and after an update.

Evaluation, before (SFT) and after (PPO), on held-out (test) prompts answered greedily: the mean
reward-model score, and the grounded overlap with the reference answer (token F1, ROUGE-L, as in the
SFT stage), an independent check against reward hacking: a policy that games the reward model drifts
away from the reference. Reports: a table of both models' answers, and the reward-KL frontier plot.

Why a per-sample KL estimate can be negative: KL(π || π_ref) is an average over responses drawn from
π of log π(y) - log π_ref(y). For one sampled token or response that difference is negative whenever
the reference happened to give it more probability than the policy does, which is common; only the
average over many samples is guaranteed to be non-negative. The k1 estimator reports exactly that
difference, so single tokens, single responses and even small batches can show a negative KL (and a
negative penalty then *adds* reward). The k3 estimator, (r - 1) - log r with r = π_ref/π, has the same
expectation but is non-negative sample by sample, because log r <= r - 1 (Schulman 2020,
http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_model

from lmpipe import bootstrap, grounded, instructions, rl
from lmpipe.bpe import END_ID, PAD_ID
from lmpipe.chat import STOP_IDS, TEMPLATE_NAME, ChatTemplate, Message
from lmpipe.checkpoint import read_model_config, save_model_folder
from lmpipe.config import PipelineConfig, PpoConfig
from lmpipe.gpt import GPT, column_rows, widen
from lmpipe.pretrain import TOKENIZER_FILE, file_sha256, step_seed
from lmpipe.sft import answer, heldout
from lmpipe.stage import Logger, NullLogger, StageContext, StageOutput
from lmpipe.trainer import Dist, Trainer, TrainSettings, autocast, distributed, format_duration, resolve_device
from lmpipe.workspace import Workspace, atomic_write_text

MODEL_DIR = "model"


class RewardScorer(Protocol):
    """What PPO needs from a reward model: scores of (prompt, response) texts, and the mean and standard
    deviation of its scores on the reward stage's train responses (for normalisation)."""

    mean: float
    std: float

    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]
              ) -> torch.Tensor | Sequence[float]: ...


# ----------------------------------------------------------------------------------------------
# models


def load_gpt(folder: Path, device: torch.device | str, frozen: bool = False) -> GPT:
    """The GPT of a model folder with dropout off (PPO's ratio compares the same function twice)."""
    config, _ = read_model_config(folder)
    model = GPT(replace(config, dropout=0.0))
    load_model(model, str(Path(folder) / "model.safetensors"), device=str(device))
    model = model.to(device)
    if frozen:
        model.eval().requires_grad_(False)
    return model


class ValueModel(nn.Module):
    """A transformer with a scalar head: the value V(s_t) of the state before each token."""

    def __init__(self, body: GPT, head: nn.Linear | None = None) -> None:
        super().__init__()
        self.body = body
        self.head = head if head is not None else zero_head(body.config.n_embd)
        del self.body.lm_head  # unused: keeps the tied embedding counted once and out of the gradient check

    def forward(self, idx: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor, start: int = 0,
                stop: int | None = None) -> torch.Tensor:
        """Values (B, stop - start) of the states at columns ``start`` to ``stop`` - 1 (default: the last)."""
        stop = idx.size(1) if stop is None else stop
        return self.head(response_hidden(self.body, idx, positions, attn_mask, start, stop - start)).squeeze(-1)


def zero_head(n_embd: int) -> nn.Linear:
    """A scalar head that starts at V = 0: the first advantages are then the rewards themselves."""
    head = nn.Linear(n_embd, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class ActorCritic(nn.Module):
    """The trained parameters: the policy, and a value function on its own transformer or on the policy's."""

    def __init__(self, policy: GPT, value: ValueModel | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.value = value
        self.value_head = zero_head(policy.config.n_embd) if value is None else None

    def forward(self, idx: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor, start: int,
                response: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0, chunk: int = 1024
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probs, entropies and values (B, N) of the N ``response`` tokens predicted from columns ``start``
        onwards (:func:`response_logprobs`; 0 at padding). The values are those of the states the tokens are
        chosen in."""
        N = response.size(1)
        hidden = response_hidden(self.policy, idx, positions, attn_mask, start, N)
        logp, entropy = response_logprobs(self.policy, hidden, response, mask, temperature, chunk)
        if self.value_head is not None:
            return logp, entropy, self.value_head(hidden).squeeze(-1)
        return logp, entropy, self.value(idx, positions, attn_mask, start, start + N)


def response_hidden(model: GPT, idx: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor, start: int,
                    n: int) -> torch.Tensor:
    """The final states (B, n, C) at columns ``start`` to ``start + n`` - 1, those that predict the response: the
    prompt's columns go through every layer but the last (:meth:`GPT.hidden`'s ``rows``)."""
    B, T = idx.shape
    rows = column_rows(B, T, start, start + n, idx.device)
    return model.hidden(idx, positions, attn_mask, rows=rows).view(B, n, -1)


def response_logprobs(model: GPT, hidden: torch.Tensor, response: torch.Tensor, mask: torch.Tensor,
                      temperature: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies (B, N) of ``response`` under softmax(model's head(``hidden``) / temperature).

    ``hidden`` (B, N, C) are the final states that predict the tokens. With ``chunk`` > 0 the head goes
    through :func:`lmpipe.rl.linear_logprobs` over the real tokens only (``mask``), ``chunk`` at a time, and
    no (B, N, V) logits are made; 0 makes the full logits. Padding positions hold 0 either way. Under
    ``torch.compile`` every position goes through the head (finding the real ones has a data-dependent shape).
    """
    B, N = response.shape
    weight = model.lm_head.weight
    if chunk == 0:
        logits = widen(model.lm_head(hidden)) / temperature
        m = mask.to(torch.float32)
        return rl.logprobs_from_logits(logits, response) * m, rl.entropy_from_logits(logits) * m
    h, tokens = hidden.flatten(0, 1), response.reshape(-1)
    if torch.compiler.is_compiling():
        logp, entropy = rl.linear_logprobs(h, weight, tokens, temperature, chunk)
        m = mask.to(logp.dtype)
        return logp.view(B, N) * m, entropy.view(B, N) * m
    keep = mask.reshape(-1).nonzero().squeeze(1)
    logp, entropy = rl.linear_logprobs(h.index_select(0, keep), weight, tokens.index_select(0, keep), temperature,
                                       chunk)
    zeros = logp.new_zeros(B * N)
    return zeros.index_copy(0, keep, logp).view(B, N), zeros.index_copy(0, keep, entropy).view(B, N)


def reward_value_model(reward_model: Any) -> ValueModel:
    """A value model initialised from the reward model (:class:`lmpipe.reward.RewardModel`): a trainable copy
    of its transformer and scalar head, so the first values already rank responses as the reward does."""
    net = getattr(reward_model, "net", None)
    body, head = getattr(net, "gpt", None), getattr(net, "head", None)
    if not isinstance(body, GPT) or not isinstance(head, nn.Linear):
        raise TypeError("ppo.value_model=reward needs a reward model whose `net` has a GPT `gpt` and a linear "
                        "`head`; set ppo.value_model=policy to put the value head on the policy instead")
    copy = GPT(replace(body.config, dropout=0.0)).to(body.wte.weight.device)
    copy.load_state_dict(body.state_dict())
    value_head = nn.Linear(head.in_features, 1).to(head.weight.device)
    value_head.load_state_dict(head.state_dict())
    return ValueModel(copy, value_head).requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# rollouts


@dataclass
class Batch:
    """Prompt + response sequences laid out for one forward pass, and the per-token rollout data.

    Prompts are left-padded to ``P`` columns, so response token t sits at column P + t of ``idx`` for every
    row and is predicted from column P - 1 + t.
    """

    idx: torch.Tensor  # (B, P + N)
    positions: torch.Tensor  # (B, P + N), each row's positions start at 0 at its first prompt token
    attn_mask: torch.Tensor  # (B, 1, P + N, P + N)
    prompt_len: int  # P
    response: torch.Tensor  # (B, N) token ids, PAD_ID after the end
    mask: torch.Tensor  # (B, N) 1 on real response tokens (the end token included)
    finished: torch.Tensor  # (B,) the response emitted an end token
    data: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token tensors (B, N): logp, values, ...

    def rows(self, index: torch.Tensor) -> Batch:
        return Batch(self.idx[index], self.positions[index], self.attn_mask[index], self.prompt_len,
                     self.response[index], self.mask[index], self.finished[index],
                     {k: v[index] for k, v in self.data.items()})


def truncate_at_stop(tokens: torch.Tensor, lengths: torch.Tensor, stop_ids: Sequence[int] = tuple(STOP_IDS)
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each generated row after its first stop token: (tokens padded with PAD_ID, mask, finished)."""
    N = tokens.size(1)
    col = torch.arange(N, device=tokens.device)
    valid = col[None, :] < lengths[:, None]
    is_stop = torch.isin(tokens, torch.tensor(list(stop_ids), device=tokens.device)) & valid
    first = torch.where(is_stop, col, N).min(dim=1).values  # N where no stop token
    finished = first < N
    new_len = torch.where(finished, first + 1, lengths)
    mask = col[None, :] < new_len[:, None]
    return tokens.masked_fill(~mask, PAD_ID), mask.long(), finished


def layout(prompts: Sequence[Sequence[int]], response: torch.Tensor, mask: torch.Tensor, finished: torch.Tensor
           ) -> Batch:
    """Left-pad the prompts, append the responses, and build the positions and attention mask."""
    device = response.device
    B, N = response.shape
    P = max(len(p) for p in prompts)
    prompt = torch.tensor([[PAD_ID] * (P - len(p)) + list(p) for p in prompts], device=device)
    valid = torch.ones(B, P + N, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        valid[i, : P - len(p)] = False
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    L = P + N
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    # a padding query attends to itself only, so no row of the mask is empty (which would give NaN)
    attn = (causal & valid[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=device)
    return Batch(torch.cat([prompt, response], 1), positions, attn, P, response, mask, finished)


@torch.no_grad()
def sample(model: ActorCritic, prompts: Sequence[Sequence[int]], cfg: PpoConfig, generator: torch.Generator
           ) -> Batch:
    """Responses to ``prompts`` from the policy's KV-cache generator, cut at the first stop token."""
    gen = model.policy.generate(list(prompts), cfg.max_new_tokens, temperature=cfg.temperature,
                                top_k=cfg.top_k or None, eot_id=END_ID, pad_id=PAD_ID, generator=generator)
    response, mask, finished = truncate_at_stop(gen.tokens, gen.lengths)
    return layout(prompts, response, mask, finished)


@torch.no_grad()
def annotate(model: ActorCritic, ref: GPT, batch: Batch, temperature: float, chunk: int = 1024) -> None:
    """Add the policy's and the reference's log-probs and the values of every response state to ``batch``.

    The log-probs are under softmax(logits / ``temperature``), the distribution the tokens were sampled from,
    made as in the updates (:func:`response_logprobs`, ``chunk``): before the first step, the updates' ratios
    differ from 1 by the rounding of other batch shapes only.
    """
    start, N = batch.prompt_len - 1, batch.response.size(1)
    logp, _, values = model(batch.idx, batch.positions, batch.attn_mask, start, batch.response, batch.mask,
                            temperature, chunk)
    ref_hidden = response_hidden(ref, batch.idx, batch.positions, batch.attn_mask, start, N)
    batch.data["logp"] = logp
    batch.data["ref_logp"] = response_logprobs(ref, ref_hidden, batch.response, batch.mask, temperature, chunk)[0]
    batch.data["values"] = values.float() * batch.mask


def score_batch(reward_model: RewardScorer, template: ChatTemplate, prompts: Sequence[Sequence[Message]],
                batch: Batch) -> tuple[list[str], torch.Tensor]:
    """The response texts and their raw reward-model scores (B,)."""
    texts = [template.decode_answer(row) for row in batch.response.tolist()]
    raw = torch.as_tensor(reward_model.score(list(prompts), texts), dtype=torch.float32)
    return texts, raw.to(batch.response.device).flatten()


def normalise(raw: torch.Tensor, reward_model: RewardScorer) -> torch.Tensor:
    """(score - mean) / std with the reward stage's train statistics."""
    return (raw - float(reward_model.mean)) / max(float(reward_model.std), 1e-8)


# ----------------------------------------------------------------------------------------------
# the PPO update


@dataclass
class UpdateStats:
    """Per-micro-batch diagnostics of one iteration's updates, averaged when reported."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, **kv: torch.Tensor) -> None:
        for k, v in kv.items():
            self.values.setdefault(k, []).append(float(v))

    def means(self, dist: Dist | None = None) -> dict[str, float]:
        """The mean of each diagnostic; under torchrun (``dist``) averaged over the ranks too."""
        means = {k: float(np.mean(v)) for k, v in self.values.items()}
        if dist is None or dist.world_size == 1 or not means:
            return means
        total = dist.all_sum(torch.tensor(list(means.values()), dtype=torch.float64, device=dist.device))
        return dict(zip(means, (total / dist.world_size).tolist(), strict=True))


def ppo_loss(cfg: PpoConfig, stats: UpdateStats) -> Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]:
    """The loss of one micro-batch: clipped surrogate + vf_coef · clipped value loss - entropy_coef · entropy."""

    def loss_fn(model: nn.Module, mb: Batch) -> tuple[torch.Tensor, int]:
        d = mb.data
        logp, entropy, values = model(mb.idx, mb.positions, mb.attn_mask, mb.prompt_len - 1, mb.response, mb.mask,
                                      cfg.temperature, cfg.loss_chunk)
        values, entropy = values.float(), rl.masked_mean(entropy, mb.mask)
        pg_loss = rl.clipped_surrogate_loss(logp, d["logp"], d["advantages"], mb.mask, cfg.clip_range)
        vf_loss = rl.clipped_value_loss(values, d["values"], d["returns"], mb.mask, cfg.value_clip)
        with torch.no_grad():
            stats.add(policy_loss=pg_loss, value_loss=vf_loss, entropy=entropy,
                      clip_frac=rl.clip_fraction(logp, d["logp"], mb.mask, cfg.clip_range),
                      approx_kl=rl.approx_kl(logp, d["logp"], mb.mask),
                      value_clip_frac=rl.masked_mean(((values - d["values"]).abs() > cfg.value_clip).float(),
                                                     mb.mask))
        return pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * entropy, int(mb.mask.sum())

    return loss_fn


def minibatches(n: int, size: int, micro: int, generator: torch.Generator) -> list[list[torch.Tensor]]:
    """A random split of ``n`` rows into minibatches of ``size`` rows, each cut into micro-batches."""
    order = torch.randperm(n, generator=generator)
    return [[order[j : min(j + micro, i + size)] for j in range(i, min(i + size, n), micro)]
            for i in range(0, n, size)]


# ----------------------------------------------------------------------------------------------
# the loop


@dataclass
class PpoModels:
    """The trained actor-critic, the frozen reference policy and reward model, and the chat template."""

    actor_critic: ActorCritic
    ref: GPT
    reward: RewardScorer
    template: ChatTemplate


@dataclass
class PpoResult:
    model_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, float]]
    rows: list[dict[str, Any]]


def settings_for(cfg: PpoConfig, n_prompts_per_iter: int) -> TrainSettings:
    """The shared trainer's settings; its step is one optimizer step (one minibatch)."""
    per_iter = cfg.ppo_epochs * math.ceil(n_prompts_per_iter / cfg.mini_batch_size)
    return TrainSettings.from_section(cfg, max_steps=cfg.iterations * per_iter, eval_every=0)


def prompt_indices(n: int, batch: int, iteration: int, seed: int) -> list[int]:
    """Prompts of ``iteration``: consecutive slices of one shuffled order per pass over the ``n`` prompts."""
    orders: dict[int, np.ndarray] = {}
    out: list[int] = []
    for k in range(iteration * batch, (iteration + 1) * batch):
        epoch, i = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng(step_seed(seed, epoch)).permutation(n)
        out.append(int(orders[epoch][i]))
    return out


def rollout_seed(seed: int, iteration: int, rank: int) -> int:
    """Seed of the rollout generator of ``iteration`` on data-parallel ``rank`` (each rank samples its own)."""
    base = step_seed(seed, iteration)
    return base if rank == 0 else step_seed(base, rank)


def iteration(models: PpoModels, trainer: Trainer, ctl: rl.FixedKLController | rl.AdaptiveKLController,
              prompts: Sequence[Sequence[Message]], prompt_ids: Sequence[Sequence[int]], cfg: PpoConfig, it: int
              ) -> dict[str, float]:
    """One PPO iteration on ``prompts``: rollout, score, rewards, advantages, updates. Returns its metrics.

    Under torchrun each rank brings its own prompts; the statistics every rank must agree on (the KL the
    controller sees, the advantage whitening) and the reported metrics are reduced over all of them, and the
    updates are all-reduced by DDP, so every rank takes the same steps.
    """
    ac, device, reduce = models.actor_critic, trainer.device, trainer.dist.all_sum
    # private generators seeded by the iteration: a resumed run samples and shuffles exactly as an unbroken one
    generator = torch.Generator(device=device).manual_seed(rollout_seed(cfg.seed, it, trainer.dist.rank))
    shuffle = torch.Generator().manual_seed(step_seed(cfg.seed + 1, it))
    ac.eval()
    # 1. rollout
    t0 = time.perf_counter()
    with autocast(device, trainer.dtype):
        batch = sample(ac, prompt_ids, cfg, generator)
    t_gen = time.perf_counter() - t0
    with autocast(device, trainer.dtype):
        annotate(ac, models.ref, batch, cfg.temperature, cfg.loss_chunk)
    d, mask = batch.data, batch.mask
    # 2. score
    _, raw = score_batch(models.reward, models.template, prompts, batch)
    scores = normalise(raw, models.reward)
    # 3. KL-penalised rewards
    kl = rl.kl_estimate(d["logp"], d["ref_logp"], cfg.kl_estimator) * mask
    beta = ctl.value
    rewards, applied = rl.token_rewards(scores, kl, mask, beta, batch.finished, cfg.missing_eot_penalty,
                                        cfg.score_clip or None)
    # sums over this rank's responses, then over every rank: the controller and the metrics see the global batch
    sums = reduce(torch.stack([
        torch.tensor(float(len(prompts)), device=device), kl.sum(), raw.sum(), scores.sum(), applied.sum(),
        (rl.kl_k1(d["logp"], d["ref_logp"]) * mask).sum(), (rl.kl_k3(d["logp"], d["ref_logp"]) * mask).sum(),
        mask.sum().float(), batch.finished.float().sum(), torch.tensor(float(batch.idx.numel()), device=device)
    ]).float())
    n, kl_sum, raw_sum, score_sum, applied_sum, k1_sum, k3_sum, tokens, finished, sequence_tokens = sums.tolist()
    ctl.update(kl_sum / n, int(n))  # KL per response by the configured estimator; the other two for the metrics
    # 4. advantages, whitened with the mean and variance of every rank's tokens
    advantages, returns = rl.gae(rewards, d["values"], mask, cfg.gamma, cfg.lam)
    d["advantages"], d["returns"] = rl.masked_whiten(advantages, mask, reduce=reduce), returns
    # 5. updates (DDP all-reduces every step's gradients)
    stats, grad_norms = UpdateStats(), []
    t1 = time.perf_counter()
    loss_fn = ppo_loss(cfg, stats)
    for _ in range(cfg.ppo_epochs):
        for micro in minibatches(len(prompts), cfg.mini_batch_size, cfg.micro_batch_size, shuffle):
            step = trainer.train_step([batch.rows(ix) for ix in micro], loss_fn)
            trainer.step += 1
            grad_norms.append(step.grad_norm)
    t_upd = time.perf_counter() - t1
    update_tokens = cfg.ppo_epochs * sequence_tokens  # prompt and response tokens of every rank, per epoch
    return {"reward_raw": raw_sum / n, "reward": score_sum / n, "score_applied": applied_sum / n,
            "kl_k1": k1_sum / n, "kl_k3": k3_sum / n, "beta": beta, "beta_next": ctl.value,
            "response_length": tokens / n, "finished": finished / n,
            "explained_variance": float(rl.explained_variance(d["values"], returns, mask, reduce)),
            "return_mean": float(rl.masked_mean(returns, mask, reduce=reduce)), "grad_norm": float(np.mean(grad_norms)),
            "lr": step.lr, "rollout_tokens_per_s": tokens / max(t_gen, 1e-9),
            "update_tokens_per_s": update_tokens / max(t_upd, 1e-9), "rollout_s": t_gen, "update_s": t_upd,
            "rollout_tokens": tokens, "update_tokens": float(update_tokens),
            **stats.means(trainer.dist)}


def progress_line(it: int, total: int, m: dict[str, float], eta_s: float) -> str:
    """``iter 0003/0030 | reward +0.412 (raw 1.234) | kl 0.812 | beta 0.0500 | len 21.4 | ... | eta 1m20s``."""
    w = max(4, len(str(total)))
    return (f"iter {it:0{w}d}/{total:0{w}d} | reward {m['reward']:+.3f} (raw {m['reward_raw']:.3f}) | "
            f"kl {m['kl_k1']:.3f} | beta {m['beta']:.4f} | len {m['response_length']:.1f} | "
            f"clip {m['clip_frac']:.3f} | ev {m['explained_variance']:+.2f} | "
            f"rollout tok/s {m['rollout_tokens_per_s']:,.0f} | eta {format_duration(eta_s)}")


def train(models: PpoModels, prompts: Sequence[instructions.Instruction], cfg: PpoConfig, out_dir: Path,
          log: Logger, progress: bool = True, dist: Dist | None = None) -> tuple[Trainer, list[dict[str, float]]]:
    """Run PPO iterations up to ``cfg.iterations``, resuming from ``out_dir``'s latest checkpoint.

    Under torchrun (``dist``) an iteration's prompts are ``batch_size`` per rank: consecutive slices of the
    global batch of ``batch_size × processes`` prompts, one slice per rank.
    """
    trainer = Trainer(models.actor_critic, settings_for(cfg, cfg.batch_size), out_dir, log, dist, progress)
    rank, world = trainer.dist.rank, trainer.dist.world_size
    ctl = rl.kl_controller(cfg.init_kl_coef, cfg.target_kl or None, cfg.kl_horizon, cfg.kl_k_beta)
    state = trainer.resume()
    start = int(state["iteration"]) if state else 0
    history: list[dict[str, float]] = list(state["history"]) if state else []
    if state:
        ctl.load_state_dict(state["kl_ctl"])
    messages = [p.messages(with_response=False) for p in prompts]
    keep = models.ref.config.block_size - cfg.max_new_tokens  # a longer prompt keeps its end, as generate does
    prompt_ids = [ids[-keep:] for ids in models.template.render_prompts(messages)]
    t_start = time.perf_counter()
    for it in range(start, cfg.iterations):
        idx = prompt_indices(len(prompts), cfg.batch_size * world, it, cfg.seed)
        idx = idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        metrics = iteration(models, trainer, ctl, [messages[i] for i in idx], [prompt_ids[i] for i in idx], cfg, it)
        history.append({"iteration": float(it), **metrics})
        trainer.log.metrics(metrics, step=it)  # rank 0's logger; the metrics are the same on every rank
        if it % cfg.log_every == 0 or it == cfg.iterations - 1:
            eta = (time.perf_counter() - t_start) / (it - start + 1) * (cfg.iterations - it - 1)
            trainer.print(progress_line(it, cfg.iterations, metrics, eta))
        if (cfg.save_every and (it + 1) % cfg.save_every == 0) or it == cfg.iterations - 1:
            trainer.save(extra={"iteration": it + 1, "kl_ctl": ctl.state_dict(), "history": history})
    return trainer, history


# ----------------------------------------------------------------------------------------------
# evaluation and reports


def evaluate(policy: GPT, models: PpoModels, prompts: Sequence[instructions.Instruction], cfg: PpoConfig
             ) -> tuple[dict[str, float], list[str], list[float]]:
    """Greedy answers to held-out prompts: mean raw and normalised reward, grounded overlap, length."""
    messages = [p.messages(with_response=False) for p in prompts]
    answers = answer(policy, models.template, messages, cfg.max_new_tokens, batch_size=cfg.batch_size)
    # float64, as the bootstrap intervals around these means are computed
    raw = torch.as_tensor(models.reward.score(messages, answers), dtype=torch.float64).flatten()
    overlap = grounded.mean_overlap(answers, [p.response for p in prompts])
    metrics = {"heldout_reward_raw": float(raw.mean()), "heldout_reward": float(normalise(raw, models.reward).mean()),
               "heldout_token_f1": overlap["token_f1"], "heldout_rouge_l": overlap["rouge_l"],
               "heldout_answer_words": float(np.mean([len(grounded.words(a)) for a in answers]))}
    return metrics, answers, raw.tolist()


def compare(models: PpoModels, prompts: Sequence[instructions.Instruction], cfg: PpoConfig
            ) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """The SFT reference and the PPO policy on the same held-out prompts: metrics and rows side by side."""
    rows: list[dict[str, Any]] = [{"prompt": p.prompt, "reference": p.response} for p in prompts]
    metrics = {}
    for name, model in (("sft", models.ref), ("ppo", models.actor_critic.policy)):
        metrics[name], answers, raw = evaluate(model, models, prompts, cfg)
        for row, text, r in zip(rows, answers, raw, strict=True):
            row.update({name: text, f"{name}_reward": r, f"{name}_token_f1": grounded.token_f1(text, row["reference"]),
                        f"{name}_rouge_l": grounded.rouge_l(text, row["reference"])})
    return metrics, rows


COLUMNS = (("heldout_reward_raw", "reward (raw)"), ("heldout_reward", "reward (normalised)"),
           ("heldout_token_f1", "token F1"), ("heldout_rouge_l", "ROUGE-L"), ("heldout_answer_words", "answer words"))


def comparison_markdown(models: dict[str, dict[str, float]], summary: dict[str, float], n: int) -> str:
    lines = ["# PPO evaluation", "", "| model | " + " | ".join(t for _, t in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for name, m in models.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k, _ in COLUMNS) + " |")
    lines.append("| change | " + " | ".join(f"{models['ppo'][k] - models['sft'][k]:+.4f}" for k, _ in COLUMNS) + " |")
    if "heldout_reward_gain_low" in summary:
        lines += ["", "95% intervals of the changes (the same prompts answered by both models; a bootstrap over "
                  f"prompts): reward (normalised) {summary['heldout_reward_gain_low']:+.4f} to "
                  f"{summary['heldout_reward_gain_high']:+.4f}, token F1 {summary['heldout_token_f1_gain_low']:+.4f} "
                  f"to {summary['heldout_token_f1_gain_high']:+.4f}."]
    return "\n".join([*lines, "", f"Greedy answers to {n} held-out (test) prompts. Final training KL to the "
                      f"reference: {summary['final_kl']:.3f} nats per response (k1; k3 {summary['final_kl_k3']:.3f}), "
                      f"target {summary['target_kl']:.3f}.", ""])


def _cell(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def samples_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["# Held-out prompts: SFT vs PPO", "", "| prompt | reference | sft | reward | F1 | ppo | reward | F1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_cell(r['prompt'])} | {_cell(r['reference'])} | {_cell(r['sft'])} | {r['sft_reward']:.3f} | "
                     f"{r['sft_token_f1']:.2f} | {_cell(r['ppo'])} | {r['ppo_reward']:.3f} | {r['ppo_token_f1']:.2f} |")
    return "\n".join(lines) + "\n"


def frontier_plot(history: Sequence[dict[str, float]], path: Path, target_kl: float = 0.0) -> Path:
    """Mean normalised reward against KL to the reference, one point per iteration (the reward-KL frontier),
    with the controller's target KL as a dashed line."""
    from lmpipe.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    kl = [h["kl_k1"] for h in history]
    reward = [h["reward"] for h in history]
    ax.plot(kl, reward, color="0.7", linewidth=0.8, zorder=1)
    points = ax.scatter(kl, reward, c=[h["iteration"] for h in history], cmap="viridis", s=18, zorder=2)
    fig.colorbar(points, ax=ax, label="iteration")
    if target_kl > 0:
        ax.axvline(target_kl, color="tab:red", linestyle="--", linewidth=1, label=f"target KL {target_kl:g}")
        ax.legend(loc="lower right")
    ax.set_xlabel("KL(π || π_ref) per response, nats (k1)")
    ax.set_ylabel("mean normalised reward")
    ax.set_title("Reward-KL frontier over PPO training")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# entry points


def build_models(sft_dir: Path, reward_model: RewardScorer, cfg: PpoConfig, device: torch.device) -> PpoModels:
    """Policy and reference from the SFT folder; the value function as ``cfg.value_model`` says."""
    from tokenizers import Tokenizer

    torch.manual_seed(cfg.seed)
    policy, ref = load_gpt(sft_dir, device), load_gpt(sft_dir, device, frozen=True)
    value = reward_value_model(reward_model) if cfg.value_model == "reward" else None
    template = ChatTemplate(Tokenizer.from_file(str(Path(sft_dir) / TOKENIZER_FILE)))
    return PpoModels(ActorCritic(policy, value), ref, reward_model, template)


def train_prompts(ws: Workspace, builtin: bool = True) -> list[instructions.Instruction]:
    """The distinct train prompts of the ``instructions`` table (their answers are not used by PPO)."""
    seen: set[tuple[str, str | None]] = set()
    out = []
    for row in instructions.load_instructions(ws, "train", builtin):
        key = (row.prompt, row.system)
        if key not in seen and not row.history:
            seen.add(key)
            out.append(row)
    return out


def ppo(ws: Workspace, cfg: PpoConfig, sft_dir: Path, reward_model: RewardScorer, out_dir: Path,
        log: Logger | None = None, progress: bool = True, builtin: bool = True, dist: Dist | None = None) -> PpoResult:
    """Align the SFT model in ``sft_dir`` to ``reward_model`` with PPO (resuming if ``out_dir`` has checkpoints),
    write the policy to ``out_dir/model``, and evaluate it beside the SFT model on held-out prompts.

    Under torchrun (``dist``) every rank trains; rank 0 alone writes the model and evaluates, and the other
    ranks return a result with the training history and no evaluation.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log = log or NullLogger()
    dist = dist or Dist(device=resolve_device(cfg.device))
    device, out_dir = dist.device, Path(out_dir)
    prompts = train_prompts(ws, builtin)
    if len(prompts) < cfg.batch_size * dist.world_size:
        raise ValueError(f"{len(prompts)} distinct train prompts, fewer than ppo.batch_size={cfg.batch_size} "
                         f"× {dist.world_size} processes")
    models = build_models(sft_dir, reward_model, cfg, device)
    trainer, history = train(models, prompts, cfg, out_dir, log, progress, dist)
    model_dir = out_dir / MODEL_DIR
    if not dist.is_main:
        return PpoResult(model_dir, {}, history, [])
    policy = models.actor_critic.policy.eval()
    _, extra = read_model_config(sft_dir)
    export_policy(policy, sft_dir, model_dir, {**extra, "ppo_iterations": cfg.iterations})
    with torch.no_grad(), autocast(device, trainer.dtype):
        evals, rows = compare(models, heldout(instructions.load_instructions(ws, "test", builtin),
                                              cfg.heldout_prompts), cfg)
    metrics = summary_metrics(evals, history, cfg, trainer.step) | gain_intervals(rows, models.reward, cfg.seed)
    return PpoResult(model_dir, metrics, history, rows)


def gain_intervals(rows: Sequence[dict[str, Any]], reward_model: RewardScorer, seed: int = 0) -> dict[str, float]:
    """95% intervals of the held-out gains, PPO - SFT on the same prompts (paired), by a bootstrap over prompts:
    ``heldout_reward_gain_low`` and ``_high`` (normalised reward), and the same for token F1 and ROUGE-L."""
    columns = {"reward": max(float(reward_model.std), 1e-8), "token_f1": 1.0, "rouge_l": 1.0}
    return bootstrap.paired_gain_intervals(rows, "sft", "ppo", columns, seed=seed)


def export_policy(policy: GPT, sft_dir: Path, model_dir: Path, extra: dict[str, Any]) -> Path:
    """The aligned model folder: weights, config marked with the chat template, the SFT tokenizer."""
    save_model_folder(policy, model_dir, {**extra, "chat_template": TEMPLATE_NAME})
    shutil.copyfile(Path(sft_dir) / TOKENIZER_FILE, model_dir / TOKENIZER_FILE)
    return model_dir


def summary_metrics(evals: dict[str, dict[str, float]], history: Sequence[dict[str, float]], cfg: PpoConfig,
                    steps: int) -> dict[str, float]:
    """PPO's held-out metrics, SFT's as ``sft_*``, the gains, and the KL at the end of training."""
    after, before = evals["ppo"], evals["sft"]
    out = {**after, **{f"sft_{k}": v for k, v in before.items()}}
    out.update({f"{k}_gain": after[k] - before[k] for k in ("heldout_reward", "heldout_reward_raw",
                                                           "heldout_token_f1", "heldout_rouge_l")})
    tail = history[-max(1, len(history) // 10):]  # the last tenth of training, to smooth the batch noise
    out.update({"final_kl": float(np.mean([h["kl_k1"] for h in tail])),
                "final_kl_k3": float(np.mean([h["kl_k3"] for h in tail])),
                "final_train_reward": float(np.mean([h["reward"] for h in tail])),
                "final_beta": history[-1]["beta_next"], "target_kl": cfg.target_kl, "iterations": float(len(history)),
                "optimizer_steps": float(steps),
                "rollout_tokens_per_s": float(np.mean([h["rollout_tokens_per_s"] for h in history])),
                "update_tokens_per_s": float(np.mean([h["update_tokens_per_s"] for h in history])),
                # tokens generated in rollouts plus tokens run through the updates (each PPO epoch counts)
                "tokens_processed": float(sum(h.get("rollout_tokens", 0.0) + h.get("update_tokens", 0.0)
                                              for h in history))})
    return out


def write_reports(result: PpoResult, evals_rows: int, out_dir: Path) -> dict[str, Path]:
    """metrics.json (with the per-iteration history), the comparison and sample tables, the frontier plot."""
    m = result.metrics
    evals = {name: {k: m[p + k] for k, _ in COLUMNS} for name, p in (("sft", "sft_"), ("ppo", ""))}
    files = {"metrics": out_dir / "metrics.json", "comparison": out_dir / "comparison.md",
             "samples": out_dir / "samples.md", "samples_json": out_dir / "samples.json",
             "frontier": out_dir / "reward_kl_frontier.png"}
    atomic_write_text(files["metrics"], json.dumps({"metrics": m, "history": result.history}, indent=2))
    atomic_write_text(files["comparison"], comparison_markdown(evals, m, len(result.rows)))
    atomic_write_text(files["samples"], samples_markdown(result.rows[:evals_rows]))
    atomic_write_text(files["samples_json"], json.dumps(result.rows[:evals_rows], indent=2, ensure_ascii=False))
    frontier_plot(result.history, files["frontier"], m["target_kl"])
    return files


def load_reward_model(reward_dir: Path, device: torch.device, min_accuracy: float | None = None) -> RewardScorer:
    """The reward stage's frozen reward model with its recorded normalisation; one whose held-out accuracy is
    below ``min_accuracy`` is refused (:class:`lmpipe.reward.WeakRewardModel`)."""
    from lmpipe.reward import RewardModel

    model = RewardModel.load(reward_dir, device, min_accuracy)
    model.net.requires_grad_(False)
    return model


def run_stage(ctx: StageContext) -> StageOutput:
    """The ``ppo`` stage: align the SFT model to the reward model, evaluate both, report."""
    cfg: PpoConfig = ctx.section("ppo")
    ws = ctx.workspace
    sft_dir = ws.abs(ctx.inputs["sft"].outputs["model"])
    reward_model = load_reward_model(ws.abs(ctx.inputs["reward"].outputs["model"]), resolve_device(cfg.device),
                                     ctx.config.reward.min_accuracy)
    ctx.log.params({"reward_mean": float(reward_model.mean), "reward_std": float(reward_model.std)})
    result = ppo(ws, cfg, sft_dir, reward_model, ctx.out_dir, ctx.log, ctx.progress, ctx.config.sft.builtin)
    files = write_reports(result, cfg.sample_rows, ctx.out_dir)
    for path in files.values():
        ctx.log.artifact(path)
    ctx.log.artifact(result.model_dir, "model")  # once, at the end: the policy the model registry points at
    m = result.metrics
    ctx.log.metrics(m)
    summary = (f"{int(m['iterations'])} iterations; held-out reward {m['sft_heldout_reward']:+.3f} -> "
               f"{m['heldout_reward']:+.3f} (gain 95% interval {m['heldout_reward_gain_low']:+.3f} to "
               f"{m['heldout_reward_gain_high']:+.3f}), token F1 {m['sft_heldout_token_f1']:.3f} -> "
               f"{m['heldout_token_f1']:.3f} ({m['heldout_token_f1_gain_low']:+.3f} to "
               f"{m['heldout_token_f1_gain_high']:+.3f}) (sft -> ppo); final KL {m['final_kl']:.3f} "
               f"(target {m['target_kl']:g})")
    outputs = {"model": ws.rel(result.model_dir), "tokenizer": ws.rel(result.model_dir / TOKENIZER_FILE),
               **{name: ws.rel(path) for name, path in files.items()}}
    return StageOutput(file_sha256(result.model_dir / "model.safetensors")[:32], outputs, m, summary)


def external_inputs(ws: Workspace, cfg: PipelineConfig) -> dict[str, Any]:
    """The instruction rows the prompts come from (the sft stage writes them; its result fingerprints weights)."""
    return {"instructions": instructions.TABLE.fingerprint(ws, cfg.sft.builtin)}


def main(argv: list[str] | None = None) -> None:
    """Run PPO outside the pipeline, e.g. under torchrun on several GPUs (see lmpipe.launch)."""
    from lmpipe import launch

    p = launch.parser("python -m lmpipe.ppo", main.__doc__)
    p.add_argument("--sft", help="SFT model folder (default: the workspace's last sft result).")
    p.add_argument("--reward", help="Reward model folder (default: the workspace's last reward result).")
    args = p.parse_args(argv)
    cfg = launch.config(args)
    ws = Workspace.resolve(args.workspace)
    sft_dir = launch.stage_output(ws, args.sft, "sft", "model", "--sft")
    reward_dir = launch.stage_output(ws, args.reward, "reward", "model", "--reward")
    with distributed(cfg.ppo.device) as dist:
        reward_model = load_reward_model(reward_dir, dist.device, cfg.reward.min_accuracy)
        result = ppo(ws, cfg.ppo, sft_dir, reward_model, Path(args.out), dist=dist, builtin=cfg.sft.builtin)
        if dist.is_main:
            write_reports(result, cfg.ppo.sample_rows, Path(args.out))
        launch.report(dist, result.metrics)


if __name__ == "__main__":
    main()
