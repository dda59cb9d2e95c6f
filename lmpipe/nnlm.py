"""Bengio's neural probabilistic language model (Bengio et al. 2003, "A Neural Probabilistic Language Model").

    x = (C(w_{t-1}), ..., C(w_{t-n+1}))          the n-1 context word vectors, concatenated
    y = b + W·x + U·tanh(d + H·x)                eq. (1) of the paper; W·x are the optional direct connections
    p(w_t | context) = softmax(y)_{w_t}

C, the shared word-feature matrix, is the word vectors this module exports. The model predicts the same
tokens as the n-gram models (:mod:`lmpipe.wordtok`: ``</s>`` and ``<unk>`` predicted, ``<s>`` context
only, so its logit is masked) and is scored the same way (:func:`score_texts`: an out-of-vocabulary
word costs p(``<unk>``) times its spelling under the n-gram stage's character model), so perplexity and
bits per byte stand beside the n-gram models'. This module also holds the pieces the recurrent LM
shares: documents as token ids, the epoch loop with early stopping, scoring and sampling.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmpipe import wordtok
from lmpipe.scoring import TextScore, make_score
from lmpipe.wordtok import BOS_ID, EOS, EOS_ID, Vocabulary

LOG2_E = 1 / math.log(2)


@dataclass(frozen=True)
class NNLMSettings:
    """Shape of an NNLM."""

    vocab_size: int
    order: int = 4  # n: the model reads n-1 words
    n_embd: int = 64  # columns of C (m in the paper)
    n_hidden: int = 128  # h in the paper
    direct: bool = True  # direct connections W from x to the output
    dropout: float = 0.0


class NNLM(nn.Module):
    """p(w_t | w_{t-n+1..t-1}) = softmax(b + W·x + U·tanh(d + H·x)) with x the concatenated C rows."""

    def __init__(self, s: NNLMSettings) -> None:
        super().__init__()
        self.settings = s
        width = (s.order - 1) * s.n_embd
        self.C = nn.Embedding(s.vocab_size, s.n_embd)
        self.H = nn.Linear(width, s.n_hidden)  # bias d
        self.U = nn.Linear(s.n_hidden, s.vocab_size)  # bias b
        self.W = nn.Linear(width, s.vocab_size, bias=False) if s.direct else None
        self.drop = nn.Dropout(s.dropout)
        nn.init.normal_(self.C.weight, std=0.1)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the next word after ``context`` (B, n-1), oldest word first."""
        x = self.drop(self.C(context).flatten(1))  # (B, (n-1)·m)
        y = self.U(self.drop(torch.tanh(self.H(x))))  # (B, V)
        if self.W is not None:
            y = y + self.W(x)
        return mask_bos(y)


def mask_bos(logits: torch.Tensor) -> torch.Tensor:
    """``<s>`` is context only: no probability for it."""
    return logits.index_fill(-1, torch.tensor([BOS_ID], device=logits.device), float("-inf"))


# ----------------------------------------------------------------------------------------------
# documents as ids (shared with the recurrent LM)


def encode_documents(texts: Iterable[str], vocab: Vocabulary, lowercase: bool = False) -> list[np.ndarray]:
    """Each text's word ids followed by ``</s>`` (unknown words as ``<unk>``)."""
    return [np.array([*vocab.encode(wordtok.tokenize(t, lowercase)), EOS_ID], np.int64) for t in texts]


def nnlm_windows(docs: Sequence[np.ndarray], order: int) -> tuple[np.ndarray, np.ndarray]:
    """(contexts (N, n-1), targets (N,)) of every token, each document preceded by n-1 ``<s>``."""
    if not docs:
        return np.zeros((0, order - 1), np.int64), np.zeros(0, np.int64)
    pad = np.full(order - 1, BOS_ID, np.int64)
    stream = np.concatenate([x for d in docs for x in (pad, d)])
    is_target = np.concatenate([x for d in docs for x in (np.zeros(order - 1, bool), np.ones(len(d), bool))])
    windows = np.lib.stride_tricks.sliding_window_view(stream, order)  # (len - n + 1, n)
    rows = windows[is_target[order - 1 :]]
    return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, -1])


# ----------------------------------------------------------------------------------------------
# training: epochs with early stopping on val (shared with the recurrent LM)


def fit_epochs(model: nn.Module, epoch_batches: Callable[[int], Iterable], loss_fn: Callable[[object], torch.Tensor],
               val_loss: Callable[[], float], *, epochs: int, patience: int, lr: float, clip: float = 1.0,
               log: Callable[[dict[str, float], int], None] | None = None, name: str = "lm") -> list[dict[str, float]]:
    """Adam over ``epochs``; stop after ``patience`` epochs without a lower val loss; the best weights are kept."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)  # fused: several times faster than the default loop
    best, best_state, history, waited = math.inf, copy.deepcopy(model.state_dict()), [], 0
    for epoch in range(epochs):
        model.train()
        t0, total, n = time.perf_counter(), 0.0, 0
        for batch in epoch_batches(epoch):
            loss = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            total, n = total + float(loss.detach()), n + 1
        model.eval()
        with torch.no_grad():
            val = val_loss()
        record = {"epoch": float(epoch), "train_loss": total / max(n, 1), "val_loss": val,
                  "val_perplexity_unk": math.exp(val), "epoch_seconds": time.perf_counter() - t0}
        history.append(record)
        if log is not None:
            log({f"{name}.{k}": v for k, v in record.items() if k != "epoch"}, epoch)
        if val < best or math.isnan(val):  # no val documents: keep the latest weights
            best, best_state, waited = val, copy.deepcopy(model.state_dict()), 0
        else:
            waited += 1
            if waited > patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return history


def _nnlm_batches(ctx: torch.Tensor, tgt: torch.Tensor, batch_size: int, seed: int):
    def batches(epoch: int):
        order = torch.randperm(len(tgt), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield ctx[idx], tgt[idx]

    return batches


def train_nnlm(train_docs: Sequence[np.ndarray], val_docs: Sequence[np.ndarray], s: NNLMSettings, *,
               epochs: int = 10, patience: int = 2, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
               device: str | torch.device = "cpu", log: Callable[[dict[str, float], int], None] | None = None
               ) -> tuple[NNLM, list[dict[str, float]]]:
    """Train an NNLM on documents of ids; early stopping on the val documents' mean loss."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = NNLM(s).to(dev)
    ctx, tgt = (torch.from_numpy(a).to(dev) for a in nnlm_windows(train_docs, s.order))
    vctx, vtgt = (torch.from_numpy(a).to(dev) for a in nnlm_windows(val_docs, s.order))

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    def val_loss() -> float:
        if len(vtgt) == 0:
            return math.nan
        return sum(float(nn.functional.cross_entropy(model(vctx[i : i + 4096]), vtgt[i : i + 4096], reduction="sum"))
                   for i in range(0, len(vtgt), 4096)) / len(vtgt)

    history = fit_epochs(model, _nnlm_batches(ctx, tgt, batch_size, seed), loss_fn, val_loss, epochs=epochs,
                         patience=patience, lr=lr, log=log, name="nnlm")
    return model, history


# ----------------------------------------------------------------------------------------------
# scoring and generation


@torch.no_grad()
def nnlm_log2probs(model: NNLM, docs: Sequence[np.ndarray], batch: int = 4096) -> np.ndarray:
    """log2 p of every token of ``docs`` (each document's words and ``</s>``), in order."""
    dev = next(model.parameters()).device
    ctx, tgt = nnlm_windows(docs, model.settings.order)
    out = []
    for i in range(0, len(tgt), batch):
        logits = model(torch.from_numpy(ctx[i : i + batch]).to(dev))
        lp = torch.log_softmax(logits.float(), -1).gather(1, torch.from_numpy(tgt[i : i + batch]).to(dev)[:, None])
        out.append(lp[:, 0].cpu().numpy() * LOG2_E)
    return np.concatenate(out) if out else np.zeros(0)


def score_texts(log2probs: Callable[[Sequence[np.ndarray]], np.ndarray], vocab: Vocabulary, texts: Sequence[str],
                spelling: object | None, lowercase: bool, name: str) -> TextScore:
    """Perplexity and bits per byte exactly as the n-gram stage computes them (OOV words charged their spelling)."""
    from lmpipe.ngram import LOG2_10, spelling_log10

    docs = encode_documents(texts, vocab, lowercase)
    lp = log2probs(docs)
    oov_words = [w for t in texts for w in wordtok.tokenize(t, lowercase) if w not in vocab.index]
    nll_unk = float(-lp.sum())
    extra = float(-spelling_log10(spelling, oov_words).sum() * LOG2_10) if spelling is not None and oov_words else 0.0
    return make_score(name, texts, len(lp), len(oov_words), nll_unk + extra, nll_unk)


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    """Draw one id from logits (V,) with temperature (0: greedy) and top-k."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=gen))


@torch.no_grad()
def generate(model: NNLM, vocab: Vocabulary, prompt: str = "", max_tokens: int = 30, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0, lowercase: bool = False) -> list[str]:
    """Words continuing ``prompt`` (stops at ``</s>``, which is not returned)."""
    dev = next(model.parameters()).device
    n1 = model.settings.order - 1
    history = [BOS_ID] * n1 + vocab.encode(wordtok.tokenize(prompt, lowercase))
    gen, words = torch.Generator().manual_seed(seed), []
    for _ in range(max_tokens):
        logits = model(torch.tensor([history[-n1:]], device=dev))[0]
        nxt = sample_token(logits, temperature, top_k, gen)
        if vocab.words[nxt] == EOS:
            break
        words.append(vocab.words[nxt])
        history.append(nxt)
    return words


# ----------------------------------------------------------------------------------------------
# files


def save(model: nn.Module, settings: object, folder: Path, kind: str) -> Path:
    """``{kind}.safetensors`` (weights) and ``{kind}.json`` (shape) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, folder / f"{kind}.safetensors")
    (folder / f"{kind}.json").write_text(json.dumps(asdict(settings), indent=2), encoding="utf-8")
    return folder / f"{kind}.safetensors"


def load_nnlm(folder: Path, device: str | torch.device = "cpu") -> NNLM:
    s = NNLMSettings(**json.loads((folder / "nnlm.json").read_text(encoding="utf-8")))
    model = NNLM(s)
    model.load_state_dict(load_file(folder / "nnlm.safetensors"))
    return model.to(device).eval()
