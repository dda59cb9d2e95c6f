"""The math of RLHF with PPO as small pure tensor functions.

Conventions: per-token tensors are (B, T) over the response tokens of B rollouts, right-padded; ``mask``
(B, T) is 1 on real response tokens (the closing end-of-turn token included: emitting it is an action)
and 0 on padding. Log-probabilities are natural logs of the sampled tokens.

References: PPO (Schulman et al. 2017, arXiv:1707.06347), GAE (Schulman et al. 2016, arXiv:1506.02438),
KL-penalised reward and the adaptive KL controller (Ziegler et al. 2019, arXiv:1909.08593, sec. 2.2),
KL estimators (Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lmpipe.gpt import add_weight_grad, head_dtype, widen

KLEstimator = Literal["k1", "k3"]


# ----------------------------------------------------------------------------------------------
# masked statistics

# Sums a tensor of partial sums over every data-parallel process (Dist.all_sum); None in one process. Masked
# statistics reduce (sum, count) pairs with it, so every process gets the statistic of the global batch.
Reduce = Callable[[torch.Tensor], torch.Tensor] | None


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, reduce: Reduce = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (over ``dim``, or over everything).

    With ``reduce`` (only for the mean over everything) the sum and the count are first summed over the
    processes: the mean of the masked entries of every process's ``x``.
    """
    mask = mask.to(x.dtype)
    if dim is not None:
        return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)
    total, count = _reduced(torch.stack([(x * mask).sum(), mask.sum()]), reduce)
    return total / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, reduce: Reduce = None) -> torch.Tensor:
    """Variance of the masked entries of ``x``; ``unbiased`` applies Bessel's correction n / (n - 1).

    Two passes (the mean, then the mean squared deviation from it), each reduced over the processes by
    ``reduce`` when given: more accurate than one pass over sums of squares, for one more reduction.
    """
    mean = masked_mean(x, mask, reduce=reduce)
    m = mask.to(x.dtype)
    total, n = _reduced(torch.stack([((x - mean) ** 2 * m).sum(), m.sum()]), reduce)
    var = total / n.clamp(min=1)
    if unbiased:
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce: Reduce = None) -> torch.Tensor:
    """``x`` scaled to unit variance over its masked entries (and centred unless ``shift_mean`` is False);
    padding entries are set to 0. With ``reduce``, mean and variance are those of every process's entries."""
    mean, var = masked_mean(x, mask, reduce=reduce), masked_var(x, mask, reduce=reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def _reduced(sums: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    return sums if reduce is None else reduce(sums)


# ----------------------------------------------------------------------------------------------
# log-probabilities, entropy, KL


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for every position: (B, T, V), (B, T) -> (B, T), in float32 (or float64)."""
    return torch.gather(F.log_softmax(widen(logits), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at every position: H = logsumexp(l) - sum_v p_v l_v. (B, T, V) -> (B, T)."""
    logits = widen(logits)
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


def _head_logits(x: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """One chunk's logits ``x @ w.T / temperature``: the matmul in its inputs' dtype, the result in float32 (or
    float64), as a linear layer under autocast followed by ``.float()``."""
    return widen(x @ w.t()).div_(temperature)


class _LinearLogprobs(torch.autograd.Function):
    """Log-probs of given tokens and entropies through the LM head, chunk by chunk, logits recomputed in backward.

    Forward keeps per row only the log-sum-exp and the mean logit under the softmax. Backward remakes each
    chunk's logits and applies d log p_y / dl = onehot(y) - p and dH / dl = -p (l - E_p[l]), weighted by the
    upstream gradients of the two outputs. The loss of PPO is not linear in the log-probs (the ratio, the clip),
    so the gradients cannot be made in forward as :func:`lmpipe.gpt.linear_cross_entropy` does; recomputing
    costs one more (chunk × C × V) matmul per chunk and holds no (N, V) tensor.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        logp, entropy, lse, mean_logit = _logprobs_entropy(h.to(dtype), weight.to(dtype), tokens, temperature, chunk)
        ctx.save_for_backward(h, weight, tokens, lse, mean_logit)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        h, weight, tokens, lse, mean_logit = ctx.saved_tensors
        if g_logp is None and g_entropy is None:
            return None, None, None, None, None, None
        x_all, w, chunk = h.to(ctx.dtype), weight.to(ctx.dtype), ctx.chunk
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                x, rows = x_all[s : s + chunk], slice(s, s + chunk)
                logits = _head_logits(x, w, ctx.temperature)  # (c, V)
                p = torch.exp(logits - lse[rows, None])
                if g_entropy is None:  # -p g
                    g = p.mul_(-g_logp[rows, None])
                else:  # -p (g_logp + g_H (l - E[l]))
                    g = logits.sub_(mean_logit[rows, None]).mul_(g_entropy[rows, None])
                    if g_logp is not None:
                        g.add_(g_logp[rows, None])
                    g = g.mul_(p).neg_()
                if g_logp is not None:  # + g at the token: the one-hot part of d log p_y / dl
                    g.scatter_add_(1, tokens[rows, None], g_logp[rows, None].to(g.dtype))
                g = g.div_(ctx.temperature).to(ctx.dtype)
                grad_h[rows] = g @ w
                add_weight_grad(grad_w, g, x)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None


def _logprobs_entropy(x_all: torch.Tensor, w: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk: int
                      ) -> tuple[torch.Tensor, ...]:
    """Per row of ``x_all``: log p(token), the entropy, the log-sum-exp and E_p[logit], ``chunk`` rows at a time."""
    n, wide = x_all.shape[0], torch.promote_types(x_all.dtype, torch.float32)
    logp, entropy, lse, mean_logit = (torch.empty(n, dtype=wide, device=x_all.device) for _ in range(4))
    with torch.autocast(x_all.device.type, enabled=False):
        for s in range(0, n, chunk):
            rows = slice(s, s + chunk)
            logits = _head_logits(x_all[rows], w, temperature)
            lse[rows] = torch.logsumexp(logits, dim=1)
            logp[rows] = logits.gather(1, tokens[rows, None]).squeeze(1) - lse[rows]
            mean_logit[rows] = (torch.exp(logits - lse[rows, None]) * logits).sum(1)
    torch.sub(lse, mean_logit, out=entropy)
    return logp, entropy, lse, mean_logit


def linear_logprobs(h: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                    chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``tokens`` and entropies under softmax(h @ weight.T / temperature), without the (N, V) logits.

    ``h`` (N, C) are final hidden states, ``weight`` (V, C) the LM head, ``tokens`` (N,). Returns ``(logp,
    entropy)``, each (N,), equal to :func:`logprobs_from_logits` and :func:`entropy_from_logits` of those
    logits, with gradients. The logits are made ``chunk`` rows at a time (and again in backward), so the
    largest thing held is one chunk's (chunk, V) logits. Under autocast the matmuls run in the autocast dtype
    and the softmax in float32, as in the plain path.
    """
    if chunk < 1:
        raise ValueError(f"linear_logprobs: chunk must be >= 1, got {chunk}")
    if temperature <= 0:
        raise ValueError(f"linear_logprobs: temperature must be > 0, got {temperature}")
    dtype = head_dtype(h)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearLogprobs.apply(h, weight, tokens, temperature, chunk, dtype)
    logp, entropy, _, _ = _logprobs_entropy(h.to(dtype), weight.to(dtype), tokens, temperature, chunk)
    return logp, entropy


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π(x) - log π_ref(x) for x ~ π: unbiased for KL(π || π_ref), high variance, can be negative.

    Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html).
    """
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = π_ref(x) / π(x), x ~ π: unbiased for KL(π || π_ref), never negative
    (log r <= r - 1), lower variance than k1. Schulman 2020, "Approximating KL Divergence"."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token KL(π || π_ref) estimate by ``estimator`` ("k1" or "k3")."""
    if estimator == "k1":
        return kl_k1(logp, ref_logp)
    if estimator == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1 or k3")


def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(π_old || π_new) per token by k3, the tokens having been sampled from π_old."""
    return masked_mean(kl_k3(old_logp, logp), mask)


# ----------------------------------------------------------------------------------------------
# rewards and advantages


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                  finished: torch.Tensor | None = None, missing_eot_penalty: float = 0.0,
                  clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -β·KL_t, plus the sequence's score on its last real token (Ziegler et al. 2019,
    eq. 2). Returns (rewards (B, T), the scores as applied (B,)).

    ``scores`` (B,) are the normalised reward-model scores. A row with ``finished`` False (it never emitted
    its end token) gets ``missing_eot_penalty`` added; then scores are clipped to [-clip, clip] if ``clip``.
    Padding gets no reward; the end token is a real token and carries the score when it was emitted.
    """
    scores = scores.float()
    if finished is not None and missing_eot_penalty:
        scores = scores + missing_eot_penalty * (~finished.bool()).float()
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    mask = mask.float()
    rewards = -beta * kl.float() * mask
    lengths = mask.sum(1).long()
    rows = torch.nonzero(lengths > 0).squeeze(1)  # an empty response has no token to carry its score
    rewards[rows, lengths[rows] - 1] += scores[rows]
    return rewards, scores


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11-16) over right-padded sequences.

    δ_t = r_t + γ·V_{t+1} - V_t and A_t = δ_t + γλ·A_{t+1}, with V and A taken as 0 past the last real
    token (the episode ends there). Returns (advantages, returns = advantages + values), 0 on padding.
    """
    mask = mask.to(values.dtype)
    T = rewards.size(1)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t] * mask[:, t]
    return advantages, (advantages + values) * mask


# ----------------------------------------------------------------------------------------------
# losses and diagnostics


def clipped_surrogate_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor, clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped policy loss (Schulman et al. 2017, eq. 7), negated to be minimised:
    mean_t max(-A_t·ρ_t, -A_t·clip(ρ_t, 1-ε, 1+ε)) with ρ_t = π(a_t|s_t) / π_old(a_t|s_t)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    return masked_mean(torch.maximum(unclipped, clipped), mask)


def clip_fraction(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, clip: float = 0.2) -> torch.Tensor:
    """Share of tokens whose ratio ρ_t left [1-ε, 1+ε] (where the clip can stop the gradient)."""
    return masked_mean(((logp - old_logp).exp() - 1.0).abs().gt(clip).float(), mask)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float = 0.2) -> torch.Tensor:
    """½·mean_t max((V_t - R_t)², (V_t^clip - R_t)²) with V_t^clip = V_old,t + clip(V_t - V_old,t, -ε, ε)
    (the value clipping of OpenAI's PPO baselines, also used by Ziegler et al. 2019)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, reduce: Reduce = None
                       ) -> torch.Tensor:
    """1 - Var[target - predicted] / Var[target] over masked entries: 1 is perfect, 0 no better than the mean."""
    var_target = masked_var(target, mask, unbiased=False, reduce=reduce)
    return 1.0 - masked_var(target - predicted, mask, unbiased=False, reduce=reduce) / var_target.clamp(min=1e-12)


# ----------------------------------------------------------------------------------------------
# KL coefficient controllers


@dataclass
class FixedKLController:
    """β stays where it was set."""

    value: float

    def update(self, kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Steers the observed KL towards ``target`` (Ziegler et al. 2019, sec. 2.2):
    e = clip(KL / target - 1, -0.2, 0.2), β ← β·(1 + K_β·e·n_steps / horizon)."""

    value: float
    target: float
    horizon: float
    k_beta: float = 1.0

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + self.k_beta * error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def kl_controller(beta: float, target: float | None, horizon: float, k_beta: float = 1.0
                  ) -> FixedKLController | AdaptiveKLController:
    """An adaptive controller when a ``target`` KL is given, a fixed β otherwise."""
    if target is None or target <= 0:
        return FixedKLController(beta)
    return AdaptiveKLController(beta, target, horizon, k_beta)
