"""Bengio's NNLM: windows, the softmax, gradients, scoring on the n-gram yardstick, training, generation, files."""

import math

import numpy as np
import pytest
import torch

from lmpipe import ngram, nnlm
from lmpipe.wordtok import BOS_ID, EOS_ID, Vocabulary

torch.set_num_threads(1)


def _planted(n, seed):
    """Sentences ``a<i> b<j> c<i>``: the third word repeats the first one's index, which a bigram cannot see."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        i, j = rng.integers(5), rng.integers(5)
        out.append(f"a{i} b{j} c{i}")
    return out


def _vocab(texts):
    from collections import Counter

    return Vocabulary.build(Counter(w for t in texts for w in t.split()))


def test_windows_pad_each_document_with_bos():
    ctx, tgt = nnlm.nnlm_windows([np.array([5, 6, EOS_ID]), np.array([7, EOS_ID])], order=3)
    assert tgt.tolist() == [5, 6, EOS_ID, 7, EOS_ID]
    assert ctx.tolist() == [[BOS_ID, BOS_ID], [BOS_ID, 5], [5, 6], [BOS_ID, BOS_ID], [BOS_ID, 7]]


def test_softmax_is_a_distribution_without_bos():
    model = nnlm.NNLM(nnlm.NNLMSettings(vocab_size=9, order=3, n_embd=4, n_hidden=5))
    p = torch.softmax(model(torch.tensor([[1, 4], [3, 3]])), -1)
    assert p.shape == (2, 9)
    assert p.sum(-1).tolist() == pytest.approx([1.0, 1.0]) and p[:, BOS_ID].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("direct", [True, False])
def test_loss_gradcheck(direct):
    torch.manual_seed(0)
    model = nnlm.NNLM(nnlm.NNLMSettings(vocab_size=6, order=3, n_embd=3, n_hidden=4, direct=direct)).double()
    ctx, tgt = torch.tensor([[1, 3], [4, 5], [2, 2]]), torch.tensor([3, 2, 5])
    names = [n for n, _ in model.named_parameters()]

    def loss(*ps):
        out = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (ctx,))
        return torch.nn.functional.cross_entropy(out, tgt)

    assert torch.autograd.gradcheck(loss, tuple(p.detach().requires_grad_() for p in model.parameters()))


def test_uniform_model_scores_exactly_like_a_uniform_distribution():
    texts = ["a b c", "b c"]
    vocab = _vocab(texts)  # <unk> <s> </s> a b c: 5 predictable types
    model = nnlm.NNLM(nnlm.NNLMSettings(len(vocab), order=2, n_embd=2, n_hidden=2))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    score = nnlm.score_texts(lambda d: nnlm.nnlm_log2probs(model, d), vocab, ["a b z", "c"], None, False, "nnlm")
    assert score.tokens == 6 and score.oov == 1  # a b z </s> c </s>
    assert score.perplexity_unk == pytest.approx(5.0)
    assert score.bytes == len("a b z") + 1 + len("c") + 1
    assert score.bits_per_byte == pytest.approx(6 * math.log2(5) / 8)


def test_scores_share_the_ngram_conventions():
    train = _planted(60, 0)
    tokens = [t.split() for t in train]
    bigram = ngram.fit(tokens, 2, "addk", k=1.0)
    spelling = ngram.fit_spelling(sorted({w for t in tokens for w in t}))
    texts = ["a1 b2 c3", "a9 b0 c0"]  # a9 is out of vocabulary
    ref = ngram.score_texts(bigram, texts, spelling)
    model = nnlm.NNLM(nnlm.NNLMSettings(len(bigram.vocab), order=3, n_embd=4, n_hidden=4))
    ours = nnlm.score_texts(lambda d: nnlm.nnlm_log2probs(model, d), bigram.vocab, texts, spelling, False, "nnlm")
    assert (ours.tokens, ours.oov, ours.bytes) == (ref.tokens, ref.oov, ref.bytes)
    # the OOV word costs the same spelling bits under both models
    spell_bits = -ngram.spelling_log10(spelling, ["a9"]).sum() * ngram.LOG2_10
    assert ours.nll_bits - math.log2(ours.perplexity_unk) * ours.tokens == pytest.approx(spell_bits)
    assert ref.nll_bits - math.log2(ref.perplexity_unk) * ref.tokens == pytest.approx(spell_bits)


def test_trained_nnlm_beats_add_one_bigram():
    train, val, test = _planted(400, 1), _planted(40, 2), _planted(60, 3)
    vocab = _vocab(train)
    docs = {k: nnlm.encode_documents(v, vocab) for k, v in (("train", train), ("val", val), ("test", test))}
    s = nnlm.NNLMSettings(len(vocab), order=3, n_embd=8, n_hidden=32)
    model, history = nnlm.train_nnlm(docs["train"], docs["val"], s, epochs=6, patience=2, batch_size=32, lr=1e-2)
    assert min(h["val_loss"] for h in history) < history[0]["val_loss"]
    nnlm_ppl = 2 ** -nnlm.nnlm_log2probs(model, docs["test"]).mean()
    addone_ppl = ngram.fit([t.split() for t in train], 2, "addk", k=1.0).perplexity([t.split() for t in test])
    # the ideal model: a and b uniform over 5 (the third word and </s> certain): ppl = 25^(1/4) = 2.24
    assert nnlm_ppl < addone_ppl and nnlm_ppl < 2.6
    assert addone_ppl > 3.0


def test_early_stopping_keeps_the_best_weights():
    vals = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    model = torch.nn.Linear(1, 1)
    seen = []

    def val_loss():
        v = next(vals)
        seen.append(model.weight.item())
        return v

    history = nnlm.fit_epochs(model, lambda e: [torch.ones(1, 1)], lambda b: model(b).sum(), val_loss, epochs=5,
                              patience=1, lr=0.1)
    assert len(history) == 4  # best at epoch 2, then two epochs without improvement (> patience)
    assert model.weight.item() == pytest.approx(seen[1])


def test_generation_save_and_load(tmp_path):
    train = _planted(200, 4)
    vocab = _vocab(train)
    docs = nnlm.encode_documents(train, vocab)
    s = nnlm.NNLMSettings(len(vocab), order=3, n_embd=8, n_hidden=16)
    model, _ = nnlm.train_nnlm(docs, docs[:20], s, epochs=10, batch_size=32, lr=1e-2)
    words = nnlm.generate(model, vocab, "a2 b1", max_tokens=5, temperature=0)
    assert words == ["c2"]  # greedy: the first word's index, then </s>
    assert nnlm.generate(model, vocab, "a0", 5, 1.0, 3, seed=7) == nnlm.generate(model, vocab, "a0", 5, 1.0, 3, seed=7)
    nnlm.save(model, s, tmp_path, "nnlm")
    back = nnlm.load_nnlm(tmp_path)
    np.testing.assert_allclose(nnlm.nnlm_log2probs(back, docs[:5]), nnlm.nnlm_log2probs(model, docs[:5]), rtol=1e-6)
