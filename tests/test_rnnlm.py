"""The recurrent LM: streams, truncated BPTT, per-document scoring, gradients, training, generation."""

from collections import Counter

import numpy as np
import pytest
import torch

from lmpipe import ngram, nnlm, rnnlm
from lmpipe.wordtok import BOS_ID, EOS_ID, Vocabulary


def _planted(n, seed):
    """Sentences ``a<i> b<j> c<i>``: the third word repeats the first one's index, which a bigram cannot see."""
    rng = np.random.default_rng(seed)
    return [f"a{i} b{rng.integers(5)} c{i}" for i in rng.integers(5, size=n)]


def _vocab(texts):
    return Vocabulary.build(Counter(w for t in texts for w in t.split()))

torch.set_num_threads(1)


def test_streams_by_hand():
    x, y = rnnlm.streams([np.array([5, 6, EOS_ID]), np.array([7, EOS_ID]), np.array([8, EOS_ID])], batch=2)
    # inputs  <s> 5 6 <s> 7 <s> 8 -> targets 5 6 </s> 7 </s> 8 </s>: 7 tokens, 2 streams of 3 (one dropped)
    assert x.tolist() == [[BOS_ID, 5, 6], [BOS_ID, 7, BOS_ID]]
    assert y.tolist() == [[5, 6, EOS_ID], [7, EOS_ID, 8]]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_scoring_is_per_document_and_normalised(cell):
    torch.manual_seed(0)
    model = rnnlm.RNNLM(rnnlm.RNNLMSettings(vocab_size=9, cell=cell, n_embd=4, n_hidden=6)).eval()
    docs = [np.array([3, 4, 5, EOS_ID]), np.array([6, EOS_ID]), np.array([7, 8, 3, 4, 5, 6, EOS_ID])]
    together = rnnlm.rnnlm_log2probs(model, docs)
    alone = np.concatenate([rnnlm.rnnlm_log2probs(model, [d]) for d in docs])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)  # padding and batch-mates change nothing
    # batches of at most 8 positions (the longest document alone) and the softmax 3 positions at a time
    np.testing.assert_allclose(rnnlm.rnnlm_log2probs(model, docs, tokens=8, chunk=3), together, rtol=1e-5, atol=1e-6)
    logits, _ = model(torch.tensor([[BOS_ID, 3, 4]]))
    p = torch.softmax(logits, -1).detach()
    assert p.sum(-1).flatten().tolist() == pytest.approx([1.0] * 3) and float(p[..., BOS_ID].max()) == 0.0


def test_loss_gradcheck():
    torch.manual_seed(0)
    model = rnnlm.RNNLM(rnnlm.RNNLMSettings(vocab_size=5, cell="gru", n_embd=3, n_hidden=3)).double()
    x, y = torch.tensor([[1, 3, 4]]), torch.tensor([[3, 4, 2]])
    names = [n for n, _ in model.named_parameters()]

    def loss(*ps):
        logits, _ = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    assert torch.autograd.gradcheck(loss, tuple(p.detach().requires_grad_() for p in model.parameters()))


def test_truncated_bptt_stops_the_gradient_at_the_window():
    model = rnnlm.RNNLM(rnnlm.RNNLMSettings(vocab_size=6, n_embd=3, n_hidden=4))
    _, state = model(torch.tensor([[1, 3]]))
    logits, _ = model(torch.tensor([[4]]), rnnlm.detach(state))
    logits.sum().backward()
    grad = model.embed.weight.grad
    assert grad[4].abs().sum() > 0 and grad[3].abs().sum() == 0 and grad[1].abs().sum() == 0


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_trained_rnnlm_beats_add_one_bigram(cell):
    train, val, test = _planted(400, 1), _planted(40, 2), _planted(60, 3)
    vocab = _vocab(train)
    docs = {k: nnlm.encode_documents(v, vocab) for k, v in (("train", train), ("val", val), ("test", test))}
    s = rnnlm.RNNLMSettings(len(vocab), cell=cell, n_embd=8, n_hidden=32)
    model, history = rnnlm.train_rnnlm(docs["train"], docs["val"], s, epochs=12, patience=3, batch_size=8, bptt=8,
                                       lr=2e-2)
    assert min(h["val_loss"] for h in history) < history[0]["val_loss"]
    ppl = 2 ** -rnnlm.rnnlm_log2probs(model, docs["test"]).mean()
    addone = ngram.fit([t.split() for t in train], 2, "addk", k=1.0).perplexity([t.split() for t in test])
    assert ppl < addone and ppl < 2.8  # ideal: 25^(1/4) = 2.24


def test_generation_save_and_load(tmp_path):
    train = _planted(200, 4)
    vocab = _vocab(train)
    docs = nnlm.encode_documents(train, vocab)
    s = rnnlm.RNNLMSettings(len(vocab), cell="gru", n_embd=8, n_hidden=16)
    model, _ = rnnlm.train_rnnlm(docs, docs[:20], s, epochs=3, batch_size=8, bptt=8, lr=1e-2)
    words = rnnlm.generate(model, vocab, "a1", max_tokens=4, temperature=1.0, top_k=3, seed=5)
    assert len(words) <= 4 and all(w in vocab for w in words)
    assert words == rnnlm.generate(model, vocab, "a1", max_tokens=4, temperature=1.0, top_k=3, seed=5)
    nnlm.save(model, s, tmp_path, "rnnlm")
    back = rnnlm.load_rnnlm(tmp_path)
    np.testing.assert_allclose(rnnlm.rnnlm_log2probs(back, docs[:5]), rnnlm.rnnlm_log2probs(model, docs[:5]),
                               rtol=1e-6)
