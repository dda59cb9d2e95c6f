"""A recurrent word-level language model (LSTM or GRU) trained with truncated backpropagation through time.

Mikolov et al. (2010, "Recurrent neural network based language model") replaced the NNLM's fixed window
with a hidden state h_t = f(x_t, h_{t-1}) that carries the whole history; the LSTM (Hochreiter &
Schmidhuber 1997) and GRU (Cho et al. 2014) cells keep it trainable over long spans. Training follows
Zaremba et al. (2014): the train split is one token stream cut into ``batch`` parallel streams, read
``bptt`` tokens at a time; the state passes from one window to the next but the gradient stops at the
window's start (truncated BPTT).

Each document is read as ``<s> w_1 .. w_n`` predicting ``w_1 .. w_n </s>``. Scoring starts every
document from a zero state, so a score depends on the document alone, and uses the NNLM's (and hence
the n-gram models') conventions for ``<unk>``, ``</s>`` and bits per byte.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from lmpipe import wordtok
from lmpipe.nnlm import LOG2_E, fit_epochs, mask_bos, sample_token
from lmpipe.wordtok import BOS_ID, EOS, Vocabulary


@dataclass(frozen=True)
class RNNLMSettings:
    """Shape of a recurrent LM."""

    vocab_size: int
    cell: str = "lstm"  # "lstm" or "gru"
    n_embd: int = 64
    n_hidden: int = 128
    n_layer: int = 1
    dropout: float = 0.0


class RNNLM(nn.Module):
    """Embedding → LSTM/GRU layers → linear softmax over the vocabulary."""

    def __init__(self, s: RNNLMSettings) -> None:
        super().__init__()
        if s.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', not {s.cell!r}")
        self.settings = s
        self.embed = nn.Embedding(s.vocab_size, s.n_embd)
        rnn = nn.LSTM if s.cell == "lstm" else nn.GRU
        self.rnn = rnn(s.n_embd, s.n_hidden, s.n_layer, batch_first=True, dropout=s.dropout if s.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(s.dropout)
        self.head = nn.Linear(s.n_hidden, s.vocab_size)

    def forward(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        """Logits (B, T, V) for inputs (B, T) and the state after them."""
        h, state = self.states(x, state)
        return self.logits(h), state

    def states(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        """The last layer's hidden states (B, T, H) for inputs (B, T), and the state after them."""
        return self.rnn(self.drop(self.embed(x)), state)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of hidden states (..., H); ``<s>`` gets none."""
        return mask_bos(self.head(self.drop(h)))


def detach(state: object) -> object:
    """Cut the graph at a window boundary (truncated BPTT); LSTM states are (h, c) pairs."""
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def streams(docs: Sequence[np.ndarray], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (batch, L): the documents as ``<s> w..`` → ``w.. </s>``, cut into ``batch`` streams."""
    x = np.concatenate([np.concatenate([[BOS_ID], d[:-1]]) for d in docs]) if docs else np.zeros(0, np.int64)
    y = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    batch = max(1, min(batch, len(y)))
    n = len(y) // batch * batch
    return (torch.from_numpy(x[:n].astype(np.int64)).view(batch, -1),
            torch.from_numpy(y[:n].astype(np.int64)).view(batch, -1))


def train_rnnlm(train_docs: Sequence[np.ndarray], val_docs: Sequence[np.ndarray], s: RNNLMSettings, *,
                epochs: int = 10, patience: int = 2, batch_size: int = 32, bptt: int = 32, lr: float = 2e-3,
                seed: int = 0, device: str | torch.device = "cpu",
                log: Callable[[dict[str, float], int], None] | None = None) -> tuple[RNNLM, list[dict[str, float]]]:
    """Train with truncated BPTT over ``batch_size`` streams; early stopping on the val streams' mean loss."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = RNNLM(s).to(dev)
    x, y = (t.to(dev) for t in streams(train_docs, batch_size))
    vx, vy = (t.to(dev) for t in streams(val_docs, batch_size))
    carry: dict[str, object] = {}

    def epoch_batches(epoch: int):
        carry["state"] = None  # each epoch starts from a zero state
        for i in range(0, x.shape[1], bptt):
            yield x[:, i : i + bptt], y[:, i : i + bptt]

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits, state = model(batch[0], carry["state"])
        carry["state"] = detach(state)
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch[1].flatten())

    def val_loss() -> float:
        if vy.numel() == 0:
            return math.nan
        total, state = 0.0, None
        for i in range(0, vx.shape[1], 256):  # windows keep the logits small; the state carries across
            logits, state = model(vx[:, i : i + 256], state)
            target = vy[:, i : i + 256].flatten()
            total += float(nn.functional.cross_entropy(logits.flatten(0, 1), target, reduction="sum"))
        return total / vy.numel()

    history = fit_epochs(model, epoch_batches, loss_fn, val_loss, epochs=epochs, patience=patience, lr=lr, log=log,
                         name="rnnlm")
    return model, history


@torch.no_grad()
def rnnlm_log2probs(model: RNNLM, docs: Sequence[np.ndarray], tokens: int = 16384, chunk: int = 2048) -> np.ndarray:
    """log2 p of every token of ``docs``, each document read from a zero state.

    Documents of similar length share a padded batch of at most ``tokens`` positions (a longer document goes
    alone). The softmax over the vocabulary is taken ``chunk`` real positions at a time, so memory stays
    bounded whatever the vocabulary size and the documents' lengths.
    """
    dev = next(model.parameters()).device
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    per_doc: list[np.ndarray] = [np.zeros(0)] * len(docs)
    b0 = 0
    while b0 < len(order):
        b1 = b0 + 1  # lengths ascend: the batch is as wide as its last document
        while b1 < len(order) and (b1 + 1 - b0) * len(docs[order[b1]]) <= tokens:
            b1 += 1
        idx, b0 = order[b0:b1], b1
        lengths = torch.tensor([len(docs[i]) for i in idx])
        width = int(lengths.max())
        x = torch.full((len(idx), width), BOS_ID, dtype=torch.long)
        y = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            d = torch.from_numpy(docs[i].astype(np.int64))
            x[r, 1 : len(d)], y[r, : len(d)] = d[:-1], d
        h, _ = model.states(x.to(dev))
        real = (torch.arange(width) < lengths[:, None]).to(dev)  # (B, W), row by row: each document's tokens
        hr, yr = h[real], y.to(dev)[real]
        lp = np.concatenate([torch.log_softmax(model.logits(hr[s : s + chunk]).float(), -1)
                             .gather(1, yr[s : s + chunk, None])[:, 0].cpu().numpy() * LOG2_E
                             for s in range(0, len(yr), chunk)])
        for i, part in zip(idx, np.split(lp, np.cumsum(lengths.numpy())[:-1]), strict=True):
            per_doc[i] = part
    return np.concatenate(per_doc) if docs else np.zeros(0)


@torch.no_grad()
def generate(model: RNNLM, vocab: Vocabulary, prompt: str = "", max_tokens: int = 30, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0, lowercase: bool = False) -> list[str]:
    """Words continuing ``prompt`` (stops at ``</s>``, which is not returned)."""
    dev = next(model.parameters()).device
    ids = [BOS_ID] + vocab.encode(wordtok.tokenize(prompt, lowercase))
    logits, state = model(torch.tensor([ids], device=dev))
    gen, words = torch.Generator().manual_seed(seed), []
    for _ in range(max_tokens):
        nxt = sample_token(logits[0, -1], temperature, top_k, gen)
        if vocab.words[nxt] == EOS:
            break
        words.append(vocab.words[nxt])
        logits, state = model(torch.tensor([[nxt]], device=dev), state)
    return words


def load_rnnlm(folder: Path, device: str | torch.device = "cpu") -> RNNLM:
    s = RNNLMSettings(**json.loads((folder / "rnnlm.json").read_text(encoding="utf-8")))
    model = RNNLM(s)
    model.load_state_dict(load_file(folder / "rnnlm.safetensors"))
    return model.to(device).eval()
