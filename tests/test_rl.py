"""The RLHF math against numbers worked out by hand: masked statistics, KL estimators, per-token rewards,
GAE, the clipped losses, diagnostics and the KL controllers."""

from __future__ import annotations

import math

import pytest
import torch

from lmpipe import rl

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])  # selects 1, 2 and 4


def close(a: torch.Tensor | float, b, tol: float = 1e-5) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol, rtol=0)


# ----------------------------------------------------------------------------------------------
# masked statistics


def test_masked_mean_over_everything_and_per_row():
    assert close(rl.masked_mean(X, M), 7 / 3)  # (1 + 2 + 4) / 3
    assert close(rl.masked_mean(X, M, dim=1), [1.5, 4.0])  # (1 + 2) / 2 and 4 / 1


def test_masked_var_biased_and_unbiased():
    # deviations from 7/3: -4/3, -1/3, 5/3; squares sum to 16/9 + 1/9 + 25/9 = 42/9
    assert close(rl.masked_var(X, M, unbiased=False), 42 / 9 / 3)  # 14/9
    assert close(rl.masked_var(X, M), 42 / 9 / 2)  # Bessel: divide by n - 1 = 2, giving 7/3


def test_masked_whiten_uses_the_masked_entries_only_and_zeros_padding():
    w = rl.masked_whiten(X, M)
    sd = math.sqrt(7 / 3)  # unbiased standard deviation of (1, 2, 4)
    assert close(w, [[-4 / 3 / sd, -1 / 3 / sd, 0.0], [5 / 3 / sd, 0.0, 0.0]])  # -0.8729, -0.2182, 1.0911
    assert close(rl.masked_mean(w, M), 0.0) and close(rl.masked_var(w, M), 1.0, tol=1e-4)
    kept = rl.masked_whiten(X, M, shift_mean=False)  # scaled, mean kept at 7/3
    assert close(rl.masked_mean(kept, M), 7 / 3, tol=1e-4)


# ----------------------------------------------------------------------------------------------
# log-probabilities, entropy, KL


def test_logprobs_and_entropy_from_logits():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # p = (1/4, 3/4), then (1/2, 1/2)
    assert close(rl.logprobs_from_logits(logits, torch.tensor([[1, 0]])), [[math.log(0.75), math.log(0.5)]])
    # H(1/4, 3/4) = 0.25 ln 4 + 0.75 ln(4/3) = 0.56233; H(1/2, 1/2) = ln 2
    assert close(rl.entropy_from_logits(logits), [[0.562335, math.log(2.0)]])
    assert close(rl.entropy_from_logits(torch.zeros(1, 1, 4)), [[math.log(4.0)]])


def test_linear_logprobs_by_hand():
    # h = (1, 1) against rows (0, 0) and (0, ln 3): logits (0, ln 3), p = (1/4, 3/4)
    h = torch.tensor([[1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    logp, entropy = rl.linear_logprobs(h, w, torch.tensor([1]))
    assert close(logp, [math.log(0.75)]) and close(entropy, [0.562335])
    logp.sum().backward()  # d log p_1 / dl = onehot(1) - p = (-1/4, 1/4); dl / dw_v = h, dl / dh = sum_v g_v w_v
    assert close(w.grad, [[-0.25, -0.25], [0.25, 0.25]]) and close(h.grad, [[0.0, 0.25 * math.log(3.0)]])
    h.grad = w.grad = None
    # at temperature 2: logits (0, ln 3) / 2, p = (1, sqrt 3) / (1 + sqrt 3)
    _, entropy = rl.linear_logprobs(h, w, torch.tensor([1]), temperature=2.0)
    p = torch.tensor([1.0, math.sqrt(3.0)]) / (1 + math.sqrt(3.0))
    assert close(entropy, [float(-(p * p.log()).sum())])
    entropy.sum().backward()  # dH / dl = -p (l - E[l]), then 1 / T for the division
    lgt = torch.tensor([0.0, math.log(3.0) / 2])
    g = -p * (lgt - (p * lgt).sum()) / 2
    assert close(w.grad, [[g[0], g[0]], [g[1], g[1]]]) and close(h.grad, [[0.0, g[1] * math.log(3.0)]])


def _logprobs_problem(n: int = 23, c: int = 6, v: int = 17) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, c, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.randn(v, c, dtype=torch.float64, generator=gen).requires_grad_()
    return h, w, torch.randint(0, v, (n,), generator=gen)


@pytest.mark.parametrize("uses", ["both", "logp", "entropy"])
def test_linear_logprobs_equal_the_full_logits_path_in_float64(uses):
    h, w, tokens = _logprobs_problem()
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(23, dtype=torch.float64, generator=gen), torch.randn(23, dtype=torch.float64, generator=gen)
    results = []
    for fused in (False, True):
        if fused:  # chunks of 5: the last one is short
            logp, entropy = rl.linear_logprobs(h, w, tokens, temperature=0.7, chunk=5)
        else:
            logits = h @ w.t() / 0.7
            logp = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
            entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        loss = {"both": (logp * a).sum() + (entropy * b).sum(), "logp": (logp * a).sum(),
                "entropy": (entropy * b).sum()}[uses]
        results.append((logp, entropy, *torch.autograd.grad(loss, (h, w))))
    for plain, fused in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)


def test_linear_logprobs_gradcheck_and_no_grad_path():
    h, w, tokens = _logprobs_problem(n=7, c=3, v=5)
    assert torch.autograd.gradcheck(lambda h, w: rl.linear_logprobs(h, w, tokens, 1.3, chunk=3), (h, w))
    with torch.no_grad():  # no graph: the forward-only loop, same numbers
        plain = rl.linear_logprobs(h, w, tokens, 1.3, chunk=3)
    for a, b in zip(plain, rl.linear_logprobs(h, w, tokens, 1.3, chunk=100), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="chunk"):
        rl.linear_logprobs(h, w, tokens, chunk=0)


def test_kl_estimators_by_hand():
    logp, ref = torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.25, 0.5]))
    # token 1: π = 1/2, π_ref = 1/4: k1 = ln 2; r = 1/2, k3 = (1/2 - 1) - ln(1/2) = 0.19315
    # token 2: π = 1/4, π_ref = 1/2: k1 = -ln 2 (negative); r = 2, k3 = 1 - ln 2 = 0.30685
    assert close(rl.kl_k1(logp, ref), [math.log(2), -math.log(2)])
    assert close(rl.kl_k3(logp, ref), [0.193147, 0.306853])
    assert close(rl.kl_estimate(logp, ref, "k3"), rl.kl_k3(logp, ref))
    with pytest.raises(ValueError, match="k1 or k3"):
        rl.kl_estimate(logp, ref, "k2")  # type: ignore[arg-type]


def test_both_kl_estimators_are_unbiased():
    # π = (1/2, 1/2), π_ref = (1/4, 3/4): KL = ½ ln 2 + ½ ln(2/3) = 0.143841; the expectation over x ~ π
    # of k1 is that by definition; of k3: ½(-½ + ln 2) + ½(½ - ln(3/2)) = 0.096574 + 0.047267
    logp, ref = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25, 0.75]))
    assert close(rl.kl_k1(logp, ref).mean(), 0.143841)
    assert close(rl.kl_k3(logp, ref).mean(), 0.143841)
    assert (rl.kl_k3(logp, ref) >= 0).all() and (rl.kl_k1(logp, ref) < 0).any()


def test_approx_kl_between_old_and_new_policy():
    old, new = torch.log(torch.tensor([[0.5, 0.3]])), torch.log(torch.tensor([[0.25, 0.3]]))
    # token 1: r = π_new / π_old = 1/2, k3 = 0.19315; token 2 unchanged: 0; masked mean over both
    assert close(rl.approx_kl(new, old, torch.ones(1, 2)), 0.193147 / 2)
    assert close(rl.approx_kl(new, old, torch.tensor([[0, 1]])), 0.0)


# ----------------------------------------------------------------------------------------------
# rewards and advantages


def test_token_rewards_put_the_score_on_the_last_real_token():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 2 ended after two tokens; its third is padding
    rewards, applied = rl.token_rewards(scores, kl, mask, beta=0.1)
    assert close(rewards, [[-0.01, -0.02, -0.03 + 1.0], [-0.05, -0.05 + 2.0, 0.0]])
    assert close(applied, [1.0, 2.0])


def test_token_rewards_penalise_a_missing_end_token_and_clip():
    scores, kl, mask = torch.tensor([1.0, 2.0]), torch.zeros(2, 2), torch.ones(2, 2)
    finished = torch.tensor([True, False])
    rewards, applied = rl.token_rewards(scores, kl, mask, 0.1, finished, missing_eot_penalty=-1.0)
    assert close(applied, [1.0, 1.0]) and close(rewards, [[0.0, 1.0], [0.0, 1.0]])
    _, clipped = rl.token_rewards(scores, kl, mask, 0.1, finished, missing_eot_penalty=-3.0, clip=0.5)
    assert close(clipped, [0.5, -0.5])  # 1 -> 0.5; 2 - 3 = -1 -> -0.5
    empty, _ = rl.token_rewards(scores, kl, torch.tensor([[1, 0], [0, 0]]), 0.1)  # an empty response: no reward
    assert close(empty, [[1.0, 0.0], [0.0, 0.0]])


def test_gae_by_hand():
    rewards, values, mask = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3)
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # δ2 = 1 - 0.7 = 0.3; δ1 = 0.7 - 0.6 = 0.1; δ0 = 0.6 - 0.5 = 0.1
    # A2 = 0.3; A1 = 0.1 + 0.5·0.3 = 0.25; A0 = 0.1 + 0.5·0.25 = 0.225
    assert close(adv, [[0.225, 0.25, 0.3]])
    assert close(ret, [[0.725, 0.85, 1.0]])


def test_gae_stops_at_the_end_of_each_sequence():
    rewards = torch.tensor([[0.0, 2.0, 99.0]])
    values, mask = torch.tensor([[1.0, 1.0, 99.0]]), torch.tensor([[1, 1, 0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=1.0)
    # padding is ignored: δ1 = 2 + 0.9·0 - 1 = 1, A1 = 1; δ0 = 0.9·1 - 1 = -0.1, A0 = -0.1 + 0.9·1 = 0.8
    # (λ = 1 is the Monte-Carlo return minus the value: 0 + 0.9·2 - 1 = 0.8)
    assert close(adv, [[0.8, 1.0, 0.0]]) and close(ret, [[1.8, 2.0, 0.0]])


def test_gae_with_lambda_zero_is_the_one_step_td_error():
    rewards, values = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.25]])
    adv, _ = rl.gae(rewards, values, torch.ones(1, 2), gamma=0.5, lam=0.0)
    assert close(adv, [[1.0 + 0.5 * 0.25 - 0.5, 2.0 - 0.25]])  # 0.625, 1.75


# ----------------------------------------------------------------------------------------------
# losses and diagnostics


def test_clipped_surrogate_loss_value_gradient_and_clip_fraction():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()  # ratios 1.5, 0.5, 1.1
    adv, mask = torch.tensor([[1.0, 1.0, -2.0]]), torch.ones(1, 3)
    loss = rl.clipped_surrogate_loss(logp, old, adv, mask, clip=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5; token 3: max(2.2, 2.2) = 2.2
    assert close(loss, (-1.2 - 0.5 + 2.2) / 3)
    loss.backward()
    # d/dlogp of -A·ρ is -A·ρ; the clipped token gets no gradient
    assert close(logp.grad, [[0.0, -0.5 / 3, 2.2 / 3]])
    assert close(rl.clip_fraction(logp.detach(), old, mask, 0.2), 2 / 3)  # |ρ - 1| = 0.5, 0.5, 0.1


def test_clipped_value_loss_by_hand():
    values, old = torch.tensor([[1.0, 2.0, 1.0]]), torch.tensor([[0.5, 2.0, 0.5]])
    returns, mask = torch.tensor([[0.8, 3.0, 1.2]]), torch.ones(1, 3)
    # token 1: (1 - 0.8)² = 0.04, clipped V = 0.7: 0.01 -> 0.04; token 2: 1 and 1 -> 1
    # token 3: (1 - 1.2)² = 0.04, clipped V = 0.7: 0.25 -> 0.25; ½·(0.04 + 1 + 0.25) / 3 = 0.215
    assert close(rl.clipped_value_loss(values, old, returns, mask, clip=0.2), 0.215)
    assert close(rl.clipped_value_loss(values, old, returns, torch.tensor([[1, 1, 0]]), clip=0.2), 0.26)


def test_explained_variance():
    target, mask = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.ones(4)
    assert close(rl.explained_variance(target, target, mask), 1.0)
    assert close(rl.explained_variance(torch.full((4,), 2.5), target, mask), 0.0)
    # residuals (1, 0, 0, -1): variance 0.5; Var[target] = 1.25; 1 - 0.4 = 0.6
    assert close(rl.explained_variance(torch.tensor([0.0, 2.0, 3.0, 5.0]), target, mask), 0.6)


# ----------------------------------------------------------------------------------------------
# KL controllers


def test_adaptive_kl_controller_by_hand():
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))  # error 1 clipped to 0.2
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(6.6, 256) == pytest.approx(0.1 * (1 + 0.1 * 0.0256))  # error 0.1: 0.100256
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(0.0, 256) == pytest.approx(0.1 * (1 - 0.2 * 0.0256))  # error -1 clipped to -0.2: 0.099488
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=1, k_beta=0.1)
    assert ctl.update(3.0, 1) == pytest.approx(0.098)  # error -0.5 -> -0.2; 0.1·(1 - 0.1·0.2)


def test_fixed_controller_and_the_factory():
    fixed = rl.kl_controller(0.05, None, 10000)
    assert isinstance(fixed, rl.FixedKLController) and fixed.update(100.0, 64) == 0.05
    adaptive = rl.kl_controller(0.05, 2.0, 100)
    assert isinstance(adaptive, rl.AdaptiveKLController)
    adaptive.update(4.0, 50)  # β grows: 0.05·(1 + 0.2·0.5) = 0.055
    restored = rl.kl_controller(0.05, 2.0, 100)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == pytest.approx(0.055)
