"""The GPT model: shapes, parameter count, initialisation, causality, masks and KV-cache generation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmpipe.gpt import GPT, GPTConfig, below, categorical, linear_cross_entropy, sample_next

torch.set_num_threads(1)


def tiny(positions: str = "learned", **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, positions=positions, **kw)
    return GPT(cfg).eval()


def test_parameter_count_by_hand():
    m = tiny()
    # wte 64*32 + wpe 16*32 + 2 blocks * (ln 32 + qkv 32*96 + proj 32*32 + ln 32 + fc 32*128 + proj 128*32) + ln_f 32
    per_block = 32 + 3072 + 1024 + 32 + 4096 + 4096
    assert m.num_params(non_embedding=False) == 2048 + 512 + 2 * per_block + 32 == 27296
    assert m.num_params() == 27296 - 512
    assert m.lm_head.weight is m.wte.weight
    assert all(lin.bias is None for lin in m.modules() if isinstance(lin, torch.nn.Linear))


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=512, block_size=16, n_layer=4, n_head=4, n_embd=128))
    assert m.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert m.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_initial_loss_is_log_vocab(positions):
    m = tiny(positions)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    logits, loss = m(x, y)
    assert logits.shape == (4, 16, 64)
    # small init: logits of std ~0.02 * sqrt(32) ≈ 0.1, nearly uniform predictions of unrelated targets
    assert loss.item() == pytest.approx(math.log(64), abs=0.05)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_attention_is_causal(positions):
    m = tiny(positions)
    x = torch.randint(0, 64, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 64  # change the future only
    a, _ = m(x)
    b, _ = m(y)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_ignore_index_targets_are_skipped():
    m = tiny()
    x = torch.randint(0, 64, (2, 8))
    y = x.clone()
    y[:, 4:] = -100
    logits, loss = m(x, y)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 64), x[:, :4].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_packed_rows_with_block_mask_equal_separate_rows(positions):
    m = tiny(positions)
    a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 7))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([0] * 5 + [1] * 7)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    positions_ = torch.cat([torch.arange(5), torch.arange(7)])[None]
    out, _ = m(packed, positions=positions_, attn_mask=mask[None, None])
    torch.testing.assert_close(out[:, :5], m(a)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 5:], m(b)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_cached_greedy_generation_matches_full_recomputation(positions):
    m = tiny(positions)
    prompt = torch.randint(2, 64, (3, 5))
    gen = m.generate(prompt, 6, temperature=0, eot_id=None)
    seq = prompt
    for _ in range(6):
        logits, _ = m(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen.tokens, seq[:, 5:])
    assert gen.lengths.tolist() == [6, 6, 6]


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_left_padded_batch_equals_one_prompt_at_a_time(positions):
    m = tiny(positions)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    batched = m.generate(prompts, 5, temperature=0, eot_id=None).as_lists()
    alone = [m.generate([p], 5, temperature=0, eot_id=None).as_lists()[0] for p in prompts]
    assert batched == alone


def test_generation_stops_at_end_of_text_and_pads():
    m = tiny()
    prompts = [[5, 6, 7], [9, 3, 4]]
    free = m.generate(prompts, 4, temperature=0, eot_id=None)
    stop = int(free.tokens[0, 0])  # declare row 0's first greedy token the end-of-text id
    gen = m.generate(prompts, 4, temperature=0, eot_id=stop, pad_id=63)
    assert gen.finished[0] and gen.lengths[0] == 1
    assert gen.tokens[0].tolist() == [stop, 63, 63, 63]
    assert gen.as_lists()[0] == [] and gen.as_lists(drop_eot=False)[0] == [stop]


def test_long_prompts_keep_their_last_tokens():
    m = tiny()
    long = torch.randint(2, 64, (1, 30)).tolist()
    a = m.generate(long, 4, temperature=0, eot_id=None).as_lists()
    b = m.generate([long[0][-12:]], 4, temperature=0, eot_id=None).as_lists()
    assert a == b
    with pytest.raises(ValueError):
        m.generate(long, 16)


def test_sampling_is_reproducible_with_a_generator():
    m = tiny()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = m.generate([[1, 2, 3]] * 2, 8, temperature=1.0, top_k=10, generator=g1, eot_id=None)
    b = m.generate([[1, 2, 3]] * 2, 8, temperature=1.0, top_k=10, generator=g2, eot_id=None)
    assert torch.equal(a.tokens, b.tokens)


def test_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, top_k=1, generator=g).eq(0).all()
    # top_p = 0.6: token 1 stays (0.5 ranked above it < 0.6), token 2 goes (0.8 ranked above it)
    drawn = sample_next(logits, top_p=0.6, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    assert (drawn == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.04)
    assert sample_next(logits, top_p=0.5, generator=g).eq(0).all()  # 0.5 above token 1 already reaches 0.5
    assert sample_next(logits, temperature=0).eq(0).all()


def test_categorical_draws_in_proportion_and_never_a_zero_entry():
    # 130 entries: three blocks of 64, the last one padded; the second block is all zero; weights sum to 10
    w = torch.zeros(130)
    w[[0, 1, 3, 63, 128, 129]] = torch.tensor([5.0, 3.0, 1.5, 0.49, 0.01, 0.0])
    n = 200_000
    drawn = categorical(w.expand(n, 130).contiguous(), torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=130).double()
    assert counts[w == 0].sum() == 0  # the zero block, the padding and every zero entry
    p = w.double() / 10
    sd = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sd + 1)[w > 0].all(), counts[w > 0]  # 5 standard deviations
    again = categorical(w.expand(n, 130).contiguous(), torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)  # the generator decides the draw
    for last in (63, 64, 129):  # one-hot rows at block edges
        assert categorical(F.one_hot(torch.tensor([last] * 50), 130).float()).eq(last).all()
    for bad in (float("nan"), float("inf")):  # a diverged model's logits: an error, not a silent draw
        with pytest.raises(ValueError, match="positive, finite sum"):
            categorical(torch.tensor([[0.5, 0.5], [bad, 0.5]]))
    with pytest.raises(ValueError, match="positive, finite sum"):
        categorical(torch.zeros(1, 3))


def test_below_stays_under_the_total():
    total = torch.tensor([[1.0], [3.5]], dtype=torch.float64)
    capped = below(total.clone(), total)  # u * total rounded up to the total itself
    assert (capped < total).all() and torch.equal(capped, torch.nextafter(total, torch.zeros_like(total)))
    assert torch.equal(below(total / 2, total), total / 2)


def test_rope_needs_even_head_dim():
    with pytest.raises(ValueError, match="even head"):
        GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=2, n_embd=6, positions="rope"))


def test_generation_turns_dropout_off_and_restores_train_mode():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.5))
    expected = m.eval().generate([[3, 4, 5]], 6, temperature=0, eot_id=None).as_lists()
    m.train()
    assert m.generate([[3, 4, 5]], 6, temperature=0, eot_id=None).as_lists() == expected
    assert m.training


# ----------------------------------------------------------------------------------------------
# the fused LM head + cross-entropy


def _head_problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(29, 8, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(13, 8, dtype=dtype, generator=g, requires_grad=True)
    t = torch.randint(0, 13, (29,), generator=g)
    t[::4] = -100  # ignored positions (prompt tokens in SFT, padding)
    return h, w, t


def _loss_and_grads(loss_fn, h, w):
    h.grad = w.grad = None
    loss = loss_fn()
    (2.5 * loss).backward()  # a non-unit upstream gradient, as under a loss scale or accumulation
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk", [1, 5, 29, 1000])
def test_linear_cross_entropy_equals_logits_then_cross_entropy(chunk):
    h, w, t = _head_problem()
    want = _loss_and_grads(lambda: torch.nn.functional.cross_entropy(h @ w.t(), t), h, w)
    got = _loss_and_grads(lambda: linear_cross_entropy(h, w, t, chunk=chunk), h, w)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # without gradients only the loss is made, chunk by chunk
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk=chunk), want[0], rtol=1e-12, atol=1e-12)
    summed = torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum")
    want = _loss_and_grads(lambda: torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum"), h, w)
    got = _loss_and_grads(lambda: linear_cross_entropy(h, w, t, chunk=chunk, reduction="sum"), h, w)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk=chunk, reduction="sum"), summed.detach())


def test_linear_cross_entropy_by_hand():
    # one row, logits (0, ln 3) for target 1: -log(3 / 4); the gradient in the logits is softmax - one-hot
    h = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.0], [math.log(3)]], dtype=torch.float64, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.tensor([1]), chunk=1)
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(0.75), abs=1e-15)
    # d loss / d logits = (1/4, 3/4 - 1); d logits / d w = h = 1, d logits / d h = w
    torch.testing.assert_close(w.grad, torch.tensor([[0.25], [-0.25]], dtype=torch.float64))
    torch.testing.assert_close(h.grad, torch.tensor([[-0.25 * math.log(3)]], dtype=torch.float64))


def test_linear_cross_entropy_edge_cases():
    h, w, t = _head_problem()
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, t, chunk=0)
    none = torch.full_like(t, -100)  # no target at all: the mean is NaN and the sum 0, as F.cross_entropy's
    assert torch.isnan(linear_cross_entropy(h, w, none))
    assert torch.isnan(torch.nn.functional.cross_entropy(h @ w.t(), none))
    assert linear_cross_entropy(h, w, none, reduction="sum").item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="none")


def test_linear_cross_entropy_under_bf16_autocast():
    h, w, t = _head_problem(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _loss_and_grads(lambda: torch.nn.functional.cross_entropy((h @ w.t()).float(), t), h, w)
        got = _loss_and_grads(lambda: linear_cross_entropy(h, w, t, chunk=7), h, w)
    assert got[1].dtype == got[2].dtype == torch.float32  # gradients come back in the inputs' dtypes
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # bf16 matmul, float32 softmax: the same loss
    for a, b in zip(got[1:], want[1:], strict=True):  # (softmax - 1) rounded to bf16 once or twice
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_model_loss_chunk_gives_the_same_loss_and_gradients(positions):
    m = tiny(positions).double().train()
    x = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, dims=1)
    y[:, -1] = -100
    y[0, :9] = y[2, 3:] = -100  # many ignored targets, as instruction tuning's prompts and padding are
    grads = []
    for chunk, skip in ((0, False), (7, False), (7, True), (100, True)):
        m.zero_grad()
        logits, loss = m(x, y, loss_chunk=chunk, skip_ignored=skip)
        assert (logits is None) == (chunk > 0)  # the fused path makes no logits
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    for got in grads[1:]:
        torch.testing.assert_close(got[0], grads[0][0], rtol=1e-12, atol=1e-12)
        for name, g in grads[0][1].items():  # the tied embedding gets the head's gradient and the embedding's
            torch.testing.assert_close(got[1][name], g, rtol=1e-10, atol=1e-12, msg=name)
    with torch.no_grad():  # the gradient-free sum, as evaluation uses it
        want = torch.nn.functional.cross_entropy(m(x)[0].flatten(0, 1), y.flatten(), reduction="sum")
        got = m.target_nll(x, y, chunk=5, reduction="sum", skip_ignored=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_skip_ignored_runs_the_head_over_the_kept_positions_only(monkeypatch):
    import lmpipe.gpt as gpt_module

    seen = []
    real = gpt_module.linear_cross_entropy
    monkeypatch.setattr(gpt_module, "linear_cross_entropy", lambda h, *a: seen.append(h.shape[0]) or real(h, *a))
    m = tiny()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.full_like(x, -100)
    y[0, 3:7] = x[0, 4:8]
    y[1, 15] = 5
    m.target_nll(x, y, skip_ignored=True)
    m.target_nll(x, y)
    assert seen == [5, 32]


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_hidden_rows_equal_the_full_states_at_those_rows(positions):
    m = tiny(positions).double().train()
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    doc = torch.tensor([0] * 5 + [1] * 7)  # packed rows, as instruction tuning makes them
    mask = ((doc[:, None] == doc[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril())[None, None]
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, -1)
    rows = torch.tensor([23, 0, 4, 13, 4])  # any order, repeats allowed
    weight = torch.randn(5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for sub in (False, True):
        m.zero_grad()
        h = m.hidden(x, pos, mask, rows=rows) if sub else m.hidden(x, pos, mask).flatten(0, 1)[rows]
        assert h.shape == (5, 32)
        (h * weight).sum().backward()
        grads.append((h.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-12, atol=1e-12)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_hidden_rows_run_the_last_mlp_over_those_rows_only(monkeypatch):
    import lmpipe.gpt as gpt_module

    seen = []
    real = gpt_module.MLP.forward
    monkeypatch.setattr(gpt_module.MLP, "forward", lambda self, x: seen.append(tuple(x.shape)) or real(self, x))
    m = tiny()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    m.hidden(x, rows=gpt_module.column_rows(2, 16, 10, 13))
    assert seen == [(2, 16, 32), (6, 32)]  # the first block over every position, the last over 2 x 3 rows
    assert gpt_module.column_rows(2, 16, 10, 13).tolist() == [10, 11, 12, 26, 27, 28]


def test_model_loss_chunk_compiles_into_one_graph():
    import torch._dynamo

    m = tiny().train()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for skip in (False, True):  # under compile skip_ignored is passed over: no data-dependent shapes
        explained = torch._dynamo.explain(m)(x, x, loss_chunk=8, skip_ignored=skip)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
