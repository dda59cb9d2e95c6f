"""word2vec: Huffman codes, subsampling, noise table, loss gradients (torch and the numba kernels), training."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from lmpipe import word2vec as w2v
from lmpipe.vectors import WordVectors


def test_huffman_codes_by_hand():
    # counts 4, 2, 1, 1: merge w2+w3 -> n0 (2), then w1+n0 -> n1 (4), then w0+n1 -> n2 (8, the root).
    # The first node popped takes branch 0, the second branch 1. Paths from the root:
    # w0: root -0-> w0; w1: root -1-> n1 -0-> w1; w2: root -1-> n1 -1-> n0 -0-> w2; w3: ... n0 -1-> w3
    codes, points, lengths = w2v.huffman_tree([4, 2, 1, 1])
    assert lengths.tolist() == [1, 2, 3, 3]
    assert [codes[w, : lengths[w]].tolist() for w in range(4)] == [[0], [1, 0], [1, 1, 0], [1, 1, 1]]
    assert [points[w, : lengths[w]].tolist() for w in range(4)] == [[2], [2, 1], [2, 1, 0], [2, 1, 0]]


def test_hierarchical_softmax_is_a_distribution():
    counts = [50, 20, 9, 9, 5, 3, 1]
    codes, points, lengths = w2v.huffman_tree(counts)
    gen = torch.Generator().manual_seed(0)
    h, syn1 = torch.randn(1, 6, generator=gen), torch.randn(len(counts) - 1, 6, generator=gen)
    total = 0.0
    for w in range(len(counts)):
        mask = torch.arange(codes.shape[1]) < int(lengths[w])
        loss = w2v.hs_loss(h, syn1[torch.from_numpy(points[w]).long()][None], torch.from_numpy(codes[w]).double()[None],
                           mask.double()[None])
        total += math.exp(-float(loss))
    assert total == pytest.approx(1.0, abs=1e-5)


def test_keep_probabilities_by_hand():
    # word2vec.c: keep = (sqrt(f / (t*T)) + 1) * (t*T) / f, capped at 1. T = 1110, t = 0.01, t*T = 11.1
    keep = w2v.keep_probabilities(np.array([1000, 100, 10]), 0.01)
    assert keep[0] == pytest.approx((math.sqrt(1000 / 11.1) + 1) * 11.1 / 1000, rel=1e-6)  # 0.11646
    assert keep[0] == pytest.approx(0.11646, abs=1e-5)
    assert keep[1] == pytest.approx(0.44417, abs=1e-5)  # (3.0015 + 1) * 0.111
    assert keep[2] == 1.0  # (0.9492 + 1) * 1.11 = 2.16, capped
    assert w2v.keep_probabilities(np.array([5, 1]), 0.0).tolist() == [1.0, 1.0]


def test_noise_table_follows_unigram_to_the_three_quarters():
    table = w2v.noise_table(np.array([16, 1]), size=9000)  # 16^0.75 = 8, 1^0.75 = 1: shares 8/9 and 1/9
    assert np.bincount(table).tolist() == [8000, 1000]


def test_torch_losses_gradcheck():
    gen = torch.Generator().manual_seed(1)
    v, u, neg = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
                 for shape in ((3, 4), (3, 4), (3, 2, 4)))
    assert torch.autograd.gradcheck(lambda a, b, c: w2v.ns_loss(a, b, c).sum(), (v, u, neg))
    nodes = torch.randn(3, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    codes = torch.tensor([[0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: w2v.hs_loss(a, b, codes, mask).sum(), (v, nodes))


def _sigmoid_loss(x):
    return np.logaddexp(0, -x)  # -log σ(x)


def _tables(hs):
    codes, points, lengths = w2v.huffman_tree([5, 4, 3, 2])
    table = np.full(10, 3, np.int32)  # every noise draw is word 3, so the kernel's loss is deterministic
    return codes, points, lengths, table


def _pair_loss(syn0, syn1, src, tgt, hs, negative, tables):
    codes, points, lengths, _ = tables
    v = syn0[src]
    if hs:
        return sum(_sigmoid_loss((1 - 2 * int(codes[tgt, d])) * syn1[points[tgt, d]] @ v) for d in range(lengths[tgt]))
    return _sigmoid_loss(syn1[tgt] @ v) + negative * _sigmoid_loss(-(syn1[3] @ v))


def _numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        up = f()
        x[idx] = old - eps
        down = f()
        x[idx] = old
        g[idx] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("hs", [False, True])
def test_skipgram_kernel_update_is_minus_alpha_times_the_gradient(hs):
    rng = np.random.default_rng(0)
    tables = _tables(hs)
    syn0 = rng.normal(size=(4, 5)) * 0.5
    syn1 = rng.normal(size=(4, 5)) * 0.5
    alpha, negative = 1e-5, 2

    def loss():
        return _pair_loss(syn0, syn1, 1, 0, hs, negative, tables)

    g0, g1 = _numeric_grad(loss, syn0), _numeric_grad(loss, syn1)
    a0, a1 = syn0.copy(), syn1.copy()
    reported = w2v.sg_pair_update(a0, a1, a1, 1, 0, *tables[:3], tables[3], negative, hs, alpha)
    assert reported == pytest.approx(loss(), rel=1e-5)  # the second noise draw sees the first one's update
    np.testing.assert_allclose((a0 - syn0) / -alpha, g0, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose((a1 - syn1) / -alpha, g1, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(("hs", "mean"), [(False, True), (True, False)])
def test_cbow_kernel_update_is_minus_alpha_times_the_gradient(hs, mean):
    rng = np.random.default_rng(1)
    tables = _tables(hs)
    codes, points, lengths, _ = tables
    syn0 = rng.normal(size=(4, 5)) * 0.5
    syn1 = rng.normal(size=(4, 5)) * 0.5
    sentence, alpha, negative = [0, 1, 2], 1e-5, 2

    def loss():  # window 1: centre 0 <- {1}, centre 1 <- {0, 2}, centre 2 <- {1}
        total = 0.0
        for i, ctx in ((0, [1]), (1, [0, 2]), (2, [1])):
            h = syn0[ctx].sum(0) / (len(ctx) if mean else 1)
            if hs:
                total += sum(_sigmoid_loss((1 - 2 * int(codes[i, d])) * syn1[points[i, d]] @ h)
                             for d in range(lengths[i]))
            else:
                total += _sigmoid_loss(syn1[i] @ h) + negative * _sigmoid_loss(-(syn1[3] @ h))
        return total

    g0, g1 = _numeric_grad(loss, syn0), _numeric_grad(loss, syn1)
    a0, a1 = syn0.copy(), syn1.copy()
    reported = w2v.cbow_update(a0, a1, a1, np.array(sentence), codes, points, lengths, tables[3], negative, hs, mean,
                               1, alpha)
    assert reported == pytest.approx(loss(), rel=1e-5)  # later centres see the earlier updates
    np.testing.assert_allclose((a0 - syn0) / -alpha, g0, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose((a1 - syn1) / -alpha, g1, rtol=1e-3, atol=1e-5)


def _topic_corpus(n_sentences=1500, seed=0):
    """6 topics of 4 words; each sentence draws 8 words from one topic: words of a topic share contexts."""
    rng = np.random.default_rng(seed)
    topics = [[f"t{t}w{i}" for i in range(4)] for t in range(6)]
    return topics, [list(rng.choice(topics[rng.integers(6)], 8)) for _ in range(n_sentences)]


def _topic_hits(model, topics):
    wv = WordVectors(model.words, model.syn0)
    words = [w for t in topics for w in t]
    return sum(wv.nearest(w, 1)[0][0][:2] == w[:2] for w in words) / len(words)


@pytest.mark.parametrize("variant", ["sg-ns", "sg-hs", "cbow-ns", "cbow-hs"])
def test_planted_topics_are_nearest_neighbours(variant):
    topics, sentences = _topic_corpus()
    s = w2v.Word2VecSettings(sg=variant.startswith("sg"), hs=variant.endswith("hs"), dim=12, window=3, epochs=3,
                             min_count=1, sample=0.0, threads=2, seed=3)
    reports = []
    model = w2v.train(sentences, dataclasses.replace(s, report_words=2000), progress=reports.append)
    assert _topic_hits(model, topics) == 1.0
    assert len(model.history) == 3 and model.history[-1]["loss"] < model.history[0]["loss"]
    assert len(reports) >= 3 and all(math.isfinite(r["loss"]) and r["words_per_s"] > 0 for r in reports)
    assert reports[-1]["progress"] == pytest.approx(1.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_every_stream_layout_trains_each_sentence_once_per_epoch(threads):
    _, sentences = _topic_corpus(6000)  # 48,000 words: five chunks, so three streams get unequal parts
    expected = sum(2 * (len(sent) - 1) for sent in sentences)  # window 1 and no subsampling: two examples a word
    vectors = {}
    for streams, chunk_words in ((1, 10_000), (2, 10_000), (3, 10_000), (7, 10_000), (64, 97), (5000, 1)):
        s = w2v.Word2VecSettings(dim=8, window=1, epochs=2, min_count=1, sample=0.0, threads=threads,
                                 streams=streams, chunk_words=chunk_words, seed=5, report_words=2000)
        reports = []
        model = w2v.train(sentences, s, progress=reports.append)
        assert [r["examples"] for r in model.history] == [expected, expected]
        assert [r["progress"] for r in reports] == sorted(r["progress"] for r in reports)
        assert reports[-1]["progress"] == pytest.approx(1.0)
        vectors[streams] = model.syn0
    if threads == 1:  # one thread is deterministic: the same layout gives the same vectors, another does not
        again = w2v.train(sentences, w2v.Word2VecSettings(dim=8, window=1, epochs=2, min_count=1, sample=0.0,
                                                          threads=1, streams=2, seed=5, report_words=2000))
        np.testing.assert_array_equal(again.syn0, vectors[2])
        assert not np.array_equal(vectors[1], vectors[2])
    with pytest.raises(ValueError, match="chunk_words"):
        w2v.train(sentences, w2v.Word2VecSettings(min_count=1, chunk_words=0))


def test_torch_engine_on_cpu_learns_the_same_structure():
    topics, sentences = _topic_corpus(600)
    for sg in (True, False):
        s = w2v.Word2VecSettings(sg=sg, dim=12, window=3, epochs=3, min_count=1, sample=0.0, seed=3, engine="torch",
                                 batch_pairs=256)
        epochs = []
        model = w2v.train(sentences, s, epoch_done=lambda e, r, m, out=epochs: out.append((e, r["loss"])))
        assert [e for e, _ in epochs] == [0, 1, 2] and epochs[-1][1] < epochs[0][1]
        assert _topic_hits(model, topics) >= 0.9


def _gpu_step_case(sg, hs, cap):
    """One batched step of the torch engine on the CPU: 3 centres, a window of 2, word 5 the only noise word."""
    gen = torch.Generator().manual_seed(0)
    V, D = 6, 4
    syn0 = torch.randn(V, D, generator=gen, dtype=torch.float64) * 0.5
    syn1 = torch.randn(V - 1 if hs else V, D, generator=gen, dtype=torch.float64) * 0.5
    codes, points, lengths = w2v.huffman_tree([9, 7, 5, 4, 3, 2])
    t = {"syn0": syn0.clone(), "syn1": syn1.clone(), "table": torch.full((8,), 5, dtype=torch.int32),
         "codes": torch.from_numpy(codes.astype(np.int64)), "points": torch.from_numpy(points),
         "pmask": torch.arange(codes.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]}
    centre = torch.tensor([0, 1, 2])
    ctx = torch.tensor([[-1, 3, 4, 1], [0, 2, -1, 4], [3, 3, 4, -1]])  # -1: absent slot
    s = w2v.Word2VecSettings(sg=sg, hs=hs, dim=D, window=2, negative=2, gpu_row_cap=cap)
    loss, examples = w2v._gpu_step(t, centre, ctx, s, 0.1, gen)
    return syn0, syn1, t, centre, ctx, (codes, points, lengths), loss, examples


@pytest.mark.parametrize("sg", [True, False])
@pytest.mark.parametrize("hs", [False, True])
def test_gpu_step_update_is_minus_alpha_times_the_gradient(sg, hs):
    syn0, syn1, t, centre, ctx, (codes, points, lengths), loss, examples = _gpu_step_case(sg, hs, cap=10**9)
    a0, a1 = syn0.clone().requires_grad_(True), syn1.clone().requires_grad_(True)
    valid = ctx >= 0
    if sg:  # one example per present (context, centre) slot
        src, tgt = ctx[valid], centre[:, None].expand_as(ctx)[valid]
        h = a0[src]
    else:  # one example per centre: the mean of its present context vectors
        tgt = centre
        h = torch.stack([a0[row[row >= 0]].mean(0) for row in ctx])
    if hs:
        pts, cds = torch.from_numpy(points).long()[tgt], torch.from_numpy(codes).double()[tgt]
        mask = (torch.arange(codes.shape[1])[None, :] < torch.from_numpy(lengths)[tgt][:, None]).double()
        ref = w2v.hs_loss(h, a1[pts], cds, mask).sum()
    else:
        neg = torch.full((len(tgt), 2), 5)
        ref = w2v.ns_loss(h, a1[tgt], a1[neg], (neg != tgt[:, None]).double()).sum()
    ref.backward()
    assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-9)
    assert float(examples) == (valid.sum() if sg else 3)
    torch.testing.assert_close((t["syn0"] - syn0) / -0.1, a0.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((t["syn1"] - syn1) / -0.1, a1.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sg", [True, False])
@pytest.mark.parametrize("hs", [False, True])
def test_gpu_warm_up_step_changes_no_weight(sg, hs):
    # the torch engine's warm-up before its clock: one centre with no context slot, α 0
    syn0, syn1, t, *_ = _gpu_step_case(sg, hs, cap=10**9)
    before = {k: t[k].clone() for k in ("syn0", "syn1")}
    s = w2v.Word2VecSettings(sg=sg, hs=hs, dim=4, window=2, negative=2)
    loss, examples = w2v._gpu_step(t, torch.tensor([1]), torch.full((1, 4), -1), s, 0.0, torch.Generator())
    assert float(loss) == 0.0 and float(examples) == 0.0
    assert torch.equal(t["syn0"], before["syn0"]) and torch.equal(t["syn1"], before["syn1"])


def test_gpu_row_cap_scales_a_busy_rows_update():
    free = _gpu_step_case(True, False, cap=10**9)
    capped = _gpu_step_case(True, False, cap=2)
    syn0, syn1 = free[0], free[1]
    d_free0, d_cap0 = free[2]["syn0"] - syn0, capped[2]["syn0"] - syn0
    d_free1, d_cap1 = free[2]["syn1"] - syn1, capped[2]["syn1"] - syn1
    # context rows 3 and 4 are used 3 times each (cap 2: scaled by 2/3); rows 0, 1, 2 once (unscaled)
    torch.testing.assert_close(d_cap0[3:5], d_free0[3:5] * 2 / 3)
    torch.testing.assert_close(d_cap0[:3], d_free0[:3])
    # each centre is the target of its 3 present slots (2/3); noise word 5: 2 draws x 9 examples, scaled by 2/18
    torch.testing.assert_close(d_cap1[:3], d_free1[:3] * 2 / 3)
    torch.testing.assert_close(d_cap1[5], d_free1[5] * 2 / 18)


def test_gpu_path_divergence_is_an_error_not_nan_vectors():
    _, sentences = _topic_corpus(600)
    s = w2v.Word2VecSettings(dim=12, window=3, epochs=4, min_count=1, sample=0.0, seed=3, engine="torch",
                             batch_pairs=4096, gpu_row_cap=10**9, alpha=0.5)
    with pytest.raises(FloatingPointError, match=r"diverged.*batch_pairs \(4096\)"):
        w2v.train(sentences, s)


def test_vocabulary_and_encoding():
    words, counts = w2v.build_vocab({"b": 3, "a": 3, "c": 1, "d": 5}, min_count=2)
    assert words == ["d", "a", "b"] and counts.tolist() == [5, 3, 3]
    ids, starts = w2v.encode_corpus([["a", "c", "d"], ["c"], ["b", "b"]], {w: i for i, w in enumerate(words)})
    assert ids.tolist() == [1, 0, 2, 2] and starts.tolist() == [0, 2, 4]  # "c" is dropped, as in word2vec.c
    sentences = [["a", "c", "d"], ["c"], ["b", "b"], ["d", "d", "a", "d", "d", "b", "a"]]
    (words, counts), (ids, starts) = w2v.prepare(iter(sentences), min_count=3)  # one pass over a stream
    assert words == ["d", "a", "b"] and counts.tolist() == [5, 3, 3]
    assert ids.tolist() == [1, 0, 2, 2, 0, 0, 1, 0, 0, 2, 1] and starts.tolist() == [0, 2, 4, 11]
    with pytest.raises(ValueError, match="min_count"):
        w2v.train([["a"]], w2v.Word2VecSettings(min_count=2))
