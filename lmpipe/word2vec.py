"""word2vec (Mikolov et al. 2013): skip-gram and CBOW, negative sampling and hierarchical softmax.

- Skip-gram predicts each word of a centre's window from the centre; CBOW predicts the centre from the
  sum or mean of its window ("Efficient Estimation of Word Representations in Vector Space", 2013).
- Negative sampling: -log σ(u_o·v) - Σ_k log σ(-u_k·v) with k noise words drawn from the unigram
  distribution raised to 3/4 ("Distributed Representations of Words and Phrases", 2013, eq. 4).
- Hierarchical softmax: the output word is a leaf of a Huffman tree over the vocabulary; its
  probability is the product of σ(±u_n·v) along the path from the root (Morin & Bengio 2005).
- Subsampling keeps an occurrence of word w with probability (√(f/(t·T)) + 1)·(t·T)/f, capped at 1,
  where f is w's train count and T the train words (the formula word2vec.c uses; the paper's is
  1 - √(t/(f/T))). Each centre draws its window b from 1..window (the "dynamic window").
- The learning rate decays linearly from ``alpha`` to ``alpha * min_alpha_ratio`` over all epochs.

Engines that train the same model: numba kernels on the CPU, where threads update the shared matrices
without locks over chunks of sentences (Hogwild, Recht et al. 2011) as word2vec.c and gensim do (the
corpus is cut into ``streams`` parts that advance side by side, as those tools give each thread its own
part of the input file; on a 108 MB English corpus two parts gave better analogies than one), and
PyTorch on a GPU with batches of examples whose updates are summed, each row's capped (see
``_gpu_step``). A third engine, :mod:`lmpipe.word2vec_triton`, runs the numba kernel's rules as a Triton
kernel on the GPU, thousands of Hogwild programs each applying its examples in turn (``engine="triton"``, the
``auto`` choice on CUDA where triton is installed: on an H100 it trains 3-5x as fast as the batched engine, and on
a shuffled corpus its vectors score as gensim's on the benchmark's three sets).
The loss is reported through a callback during training and per epoch.
"""

from __future__ import annotations

import heapq
import importlib.util
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numba
import numpy as np
import torch
from numba import njit, prange

UNIGRAM_POWER = 0.75
TABLE_SIZE = 10_000_000  # noise table entries (word2vec.c uses 1e8; 1e7 is as exact for vocabularies < 1M)
MAX_SENTENCE = 10_000  # longer sentences are cut into pieces of this many words (word2vec.c: 1000)
CHUNK_WORDS = 10_000  # words per Hogwild work item
ENGINES = ("auto", "numba", "torch", "triton")


@dataclass(frozen=True)
class Word2VecSettings:
    """Hyper-parameters of one word2vec model (word2vec.c's flags by another name)."""

    sg: bool = True  # skip-gram (True) or CBOW
    hs: bool = False  # hierarchical softmax (True) or negative sampling
    dim: int = 100
    window: int = 5
    negative: int = 5
    cbow_mean: bool = True
    sample: float = 1e-3
    min_count: int = 5
    epochs: int = 5
    alpha: float = 0.0  # 0: 0.025 for skip-gram, 0.05 for CBOW
    min_alpha_ratio: float = 1e-4
    seed: int = 1
    streams: int = 0  # parts of the corpus trained side by side (0: one per CPU thread, as word2vec.c; triton: many)
    chunk_words: int = CHUNK_WORDS  # CPU: words per Hogwild work item (a part is a run of consecutive chunks)
    threads: int = 0  # 0: all cores
    device: str = "cpu"  # "cpu" or a torch device such as "cuda"
    engine: str = "auto"  # "numba" (CPU), "torch" (any device), "triton" (Hogwild kernel: CUDA, or CPU interpreted);
    # auto: numba on "cpu", triton on CUDA where the triton package is installed, torch elsewhere
    batch_pairs: int = 1 << 15  # GPU examples per step
    gpu_row_cap: int = 64  # GPU: a row touched more often in one step moves by this many examples' worth at most
    report_words: int = 1_000_000  # call the progress callback about every this many words

    @property
    def start_alpha(self) -> float:
        return self.alpha or (0.025 if self.sg else 0.05)

    @property
    def name(self) -> str:
        return f"{'sg' if self.sg else 'cbow'}-{'hs' if self.hs else 'ns'}"


@dataclass
class Word2VecModel:
    """Trained word2vec: the input vectors (the word vectors) and the output weights."""

    words: list[str]
    counts: np.ndarray  # (V,) train counts
    syn0: np.ndarray  # (V, dim) input vectors
    syn1: np.ndarray  # (V, dim) output vectors: noise-word weights (NS) or inner-node weights (HS)
    settings: Word2VecSettings
    history: list[dict[str, float]] = field(default_factory=list)  # one record per epoch


Progress = Callable[[dict[str, float]], None]
EpochDone = Callable[[int, dict[str, float], "Word2VecModel"], None]


# ----------------------------------------------------------------------------------------------
# vocabulary-side tables: subsampling, noise distribution, Huffman tree


def keep_probabilities(counts: np.ndarray, sample: float) -> np.ndarray:
    """P(keep) per word: (√(f/(t·T)) + 1)·(t·T)/f capped at 1 (word2vec.c); all 1 when t = 0."""
    counts = np.asarray(counts, np.float64)
    if sample <= 0:
        return np.ones(len(counts), np.float32)
    threshold = sample * counts.sum()
    p = (np.sqrt(counts / threshold) + 1) * threshold / np.maximum(counts, 1)
    return np.minimum(p, 1.0).astype(np.float32)


def noise_table(counts: np.ndarray, size: int = 0, power: float = UNIGRAM_POWER) -> np.ndarray:
    """Word ids laid out so that a uniform draw from the table follows count^power (normalised).

    ``size`` 0 picks 100 entries per word, at least 1,000 and at most ``TABLE_SIZE``.
    """
    weights = np.asarray(counts, np.float64) ** power
    size = size or int(min(TABLE_SIZE, max(1000, 100 * len(counts))))
    cum = np.cumsum(weights / weights.sum())
    return np.minimum(np.searchsorted(cum, (np.arange(size) + 0.5) / size), len(counts) - 1).astype(np.int32)


def huffman_tree(counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Huffman codes and paths of every word: (codes (V, L) uint8, points (V, L) int32, lengths (V,)).

    Inner node j (0..V-2) has output vector syn1[j]; the root is V-2. ``points[w, :len]`` lists the inner
    nodes from the root to w's leaf and ``codes[w, :len]`` the branch taken at each (1: the branch of
    the larger subtree, as in word2vec.c). Ties between equal counts go to the lower id first.
    """
    v = len(counts)
    if v < 2:
        return np.zeros((v, 1), np.uint8), np.zeros((v, 1), np.int32), np.zeros(v, np.int32)
    heap = [(int(c), i, i) for i, c in enumerate(counts)]  # (count, tie-break order, node id)
    heapq.heapify(heap)
    parent = np.zeros(2 * v - 1, np.int64)
    branch = np.zeros(2 * v - 1, np.uint8)
    order = v
    for j in range(v - 1):
        c1, _, n1 = heapq.heappop(heap)
        c2, _, n2 = heapq.heappop(heap)
        node = v + j
        parent[n1], parent[n2], branch[n2] = node, node, 1
        heapq.heappush(heap, (c1 + c2, order, node))
        order += 1
    root = 2 * v - 2
    paths = []
    for w in range(v):
        nodes, bits, n = [], [], w
        while n != root:
            bits.append(branch[n])
            n = parent[n]
            nodes.append(n - v)
        paths.append((nodes[::-1], bits[::-1]))
    length = max(len(p) for p, _ in paths)
    codes = np.zeros((v, length), np.uint8)
    points = np.zeros((v, length), np.int32)
    lengths = np.array([len(p) for p, _ in paths], np.int32)
    for w, (nodes, bits) in enumerate(paths):
        points[w, : len(nodes)] = nodes
        codes[w, : len(bits)] = bits
    return codes, points, lengths


def output_tables(counts: np.ndarray, hs: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the output layer looks up: (codes, points, lengths) of the Huffman tree for hierarchical softmax,
    or the noise table for negative sampling; the side not used is a size-1 array the kernel never reads."""
    if hs:
        return (*huffman_tree(counts), np.zeros(1, np.int32))
    return np.zeros((1, 1), np.uint8), np.zeros((1, 1), np.int32), np.zeros(1, np.int32), noise_table(counts)


def build_vocab(counts: dict[str, int], min_count: int) -> tuple[list[str], np.ndarray]:
    """Words seen at least ``min_count`` times, by descending count (ties alphabetical), with their counts."""
    kept = sorted(((w, c) for w, c in counts.items() if c >= min_count), key=lambda wc: (-wc[1], wc[0]))
    return [w for w, _ in kept], np.array([c for _, c in kept], np.int64)


def encode_corpus(sentences: Sequence[Sequence[str]], index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, sentence starts int64 with a final end offset); unknown words are dropped, as in word2vec.c."""
    ids, starts, n = [], [0], 0
    for sent in sentences:
        enc = [index[w] for w in sent if w in index]
        for i in range(0, len(enc), MAX_SENTENCE):
            piece = enc[i : i + MAX_SENTENCE]
            ids.extend(piece)
            n += len(piece)
            starts.append(n)
    return np.array(ids, np.int32), np.array(starts, np.int64)


def prepare(sentences: Iterable[Sequence[str]], min_count: int) -> tuple[tuple[list[str], np.ndarray],
                                                                          tuple[np.ndarray, np.ndarray]]:
    """Vocabulary and encoded corpus in one pass over ``sentences`` (a stream: nothing but ids is kept).

    Words get provisional ids in order of appearance; once all are counted, a lookup array maps them to
    the final ids (by descending count) or drops them (below ``min_count``).
    """
    first: dict[str, int] = {}
    chunks, starts, n = [], [0], 0
    for sent in sentences:
        ids = [first.setdefault(w, len(first)) for w in sent]
        for i in range(0, len(ids), MAX_SENTENCE):
            piece = ids[i : i + MAX_SENTENCE]
            chunks.append(np.array(piece, np.int32))
            n += len(piece)
            starts.append(n)
    raw = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    counts = np.bincount(raw, minlength=len(first))
    words = list(first)
    order = sorted((i for i in range(len(words)) if counts[i] >= min_count), key=lambda i: (-counts[i], words[i]))
    lookup = np.full(len(words) + 1, -1, np.int64)
    lookup[order] = np.arange(len(order))
    mapped = lookup[raw]
    keep = mapped >= 0
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    new_starts = kept_before[np.array(starts, np.int64)]
    sentence_ok = np.diff(new_starts) > 0  # drop sentences left empty
    new_starts = np.concatenate([[0], new_starts[1:][sentence_ok]])
    vocab = ([words[i] for i in order], counts[order].astype(np.int64))
    return vocab, (mapped[keep].astype(np.int32), new_starts.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# the CPU engine: numba kernels


@njit(inline="always", cache=True)
def _rand(state: np.uint64) -> np.uint64:
    return state * np.uint64(25214903917) + np.uint64(11)  # word2vec.c's linear congruential generator


@njit(fastmath=True, inline="always", cache=True)
def _sigmoid_and_loss(f: float, label: float) -> tuple[float, float]:
    """(σ(f), -log σ(±f)) with one exp and no overflow; the sign is + for label 1, - for label 0."""
    e = math.exp(-abs(f))
    sig = 1.0 / (1.0 + e) if f >= 0 else e / (1.0 + e)
    signed = f if label == 1.0 else -f  # -log σ(x) = max(-x, 0) + log(1 + e^-|x|)
    return sig, max(-signed, 0.0) + math.log1p(e)


@njit(fastmath=True, cache=True)
def _output_step(h, target, syn1, syn1neg, codes, points, lengths, table, negative, hs, alpha, grad, state):
    """One prediction of ``target`` from hidden vector h: update output weights, add dLoss/dh·(-alpha) to grad.

    Returns (loss, rng state). Loss: hierarchical softmax -Σ log σ(±u_n·h) along the path, or negative
    sampling -log σ(u_o·h) - Σ_k log σ(-u_k·h).
    """
    dim = h.shape[0]
    loss = 0.0
    if hs:
        for d in range(lengths[target]):
            node = points[target, d]
            f = np.float32(0.0)  # float32 throughout lets the loops vectorise
            for j in range(dim):
                f += h[j] * syn1[node, j]
            label = 1.0 - codes[target, d]  # code 0: the path goes where σ(f) points, code 1: σ(-f)
            sig, step = _sigmoid_and_loss(f, label)
            loss += step
            g = np.float32(alpha * (label - sig))
            for j in range(dim):
                grad[j] += g * syn1[node, j]
                syn1[node, j] += g * h[j]
    else:
        for d in range(negative + 1):
            if d == 0:
                word, label = target, 1.0
            else:
                state = _rand(state)
                word, label = table[(state >> np.uint64(16)) % np.uint64(table.shape[0])], 0.0
                if word == target:
                    continue
            f = np.float32(0.0)  # float32 throughout lets the loops vectorise
            for j in range(dim):
                f += h[j] * syn1neg[word, j]
            sig, step = _sigmoid_and_loss(f, label)
            loss += step
            g = np.float32(alpha * (label - sig))
            for j in range(dim):
                grad[j] += g * syn1neg[word, j]
                syn1neg[word, j] += g * h[j]
    return loss, state


@njit(fastmath=True, cache=True)
def _train_sentence(sent, syn0, syn1, syn1neg, codes, points, lengths, table, sg, cbow_mean, window, negative, hs,
                    alpha, h, grad, state):
    """Train on one (subsampled) sentence; returns (loss sum, examples, rng state)."""
    dim = syn0.shape[1]
    n = sent.shape[0]
    loss, examples = 0.0, 0
    for i in range(n):
        state = _rand(state)
        b = int((state >> np.uint64(16)) % np.uint64(window))  # dynamic window: window - b words each side
        lo, hi = max(0, i - window + b), min(n, i + window - b + 1)
        if sg:
            for c in range(lo, hi):
                if c == i:
                    continue
                src = sent[c]  # word2vec.c's pair order: the context word's vector predicts the centre
                grad[:] = 0.0
                step, state = _output_step(syn0[src], sent[i], syn1, syn1neg, codes, points, lengths, table,
                                           negative, hs, alpha, grad, state)
                loss += step
                examples += 1
                for j in range(dim):
                    syn0[src, j] += grad[j]
        else:
            h[:] = 0.0
            cw = 0
            for c in range(lo, hi):
                if c != i:
                    cw += 1
                    for j in range(dim):
                        h[j] += syn0[sent[c], j]
            if cw == 0:
                continue
            scale = 1.0 / cw if cbow_mean else 1.0
            for j in range(dim):
                h[j] *= scale
            grad[:] = 0.0
            step, state = _output_step(h, sent[i], syn1, syn1neg, codes, points, lengths, table, negative, hs,
                                       alpha, grad, state)
            loss += step
            examples += 1
            for c in range(lo, hi):  # dLoss/d v_c = scale · dLoss/dh (gensim's cbow_mean rule)
                if c != i:
                    for j in range(dim):
                        syn0[sent[c], j] += scale * grad[j]
    return loss, examples, state


@njit(parallel=True, fastmath=True, cache=True)
def _train_chunks(ids, starts, chunk_first, chunk_end, chunk_done, keep, syn0, syn1, syn1neg, codes, points, lengths,
                  table, sg, cbow_mean, window, negative, hs, alpha0, alpha_end, words_total, seed):
    """Train on sentence chunks in parallel (Hogwild); returns per-chunk (loss sum, examples, kept words).

    Chunk k is sentences ``chunk_first[k]`` to ``chunk_end[k] - 1``; ``chunk_done[k]`` counts the words trained
    before it (over all epochs), which sets its learning rate. Its random stream is seeded by its first sentence.
    """
    n_chunks = chunk_first.shape[0]
    out = np.zeros((n_chunks, 3))
    dim = syn0.shape[1]
    for k in prange(n_chunks):
        s0, s1 = chunk_first[k], chunk_end[k]
        state = np.uint64(seed) * np.uint64(1_000_003) + np.uint64(s0) * np.uint64(7919) + np.uint64(1)
        buf = np.empty(MAX_SENTENCE, np.int32)
        h = np.zeros(dim, syn0.dtype)
        grad = np.zeros(dim, syn0.dtype)
        for s in range(s0, s1):
            # learning rate from global progress at this sentence (linear decay, word2vec.c)
            progress = (chunk_done[k] + starts[s] - starts[s0]) / words_total
            alpha = max(alpha0 - (alpha0 - alpha_end) * progress, alpha_end)
            m = 0
            for p in range(starts[s], starts[s + 1]):
                w = ids[p]
                state = _rand(state)
                # the high bits: an LCG's low 16 bits (word2vec.c's choice) cycle with period 2^16
                if keep[w] < 1.0 and keep[w] < ((state >> np.uint64(40)) / 16777216.0):
                    continue  # subsampled away
                buf[m] = w
                m += 1
            loss, ex, state = _train_sentence(buf[:m], syn0, syn1, syn1neg, codes, points, lengths, table, sg,
                                              cbow_mean, window, negative, hs, alpha, h, grad, state)
            out[k, 0] += loss
            out[k, 1] += ex
            out[k, 2] += m
    return out


def sg_pair_update(syn0: np.ndarray, syn1: np.ndarray, syn1neg: np.ndarray, src: int, target: int,
                   codes: np.ndarray, points: np.ndarray, lengths: np.ndarray, table: np.ndarray, negative: int,
                   hs: bool, alpha: float, seed: int = 1) -> float:
    """One skip-gram SGD step of the CPU kernel on (``src`` → ``target``), in place; returns the loss before it."""
    grad = np.zeros(syn0.shape[1], syn0.dtype)
    loss, _ = _output_step(syn0[src], target, syn1, syn1neg, codes, points, lengths, table, negative, hs, alpha,
                           grad, np.uint64(seed))
    syn0[src] += grad
    return float(loss)


def cbow_update(syn0: np.ndarray, syn1: np.ndarray, syn1neg: np.ndarray, sentence: np.ndarray, codes: np.ndarray,
                points: np.ndarray, lengths: np.ndarray, table: np.ndarray, negative: int, hs: bool, cbow_mean: bool,
                window: int, alpha: float, seed: int = 1) -> float:
    """CBOW SGD steps of the CPU kernel over ``sentence`` (no subsampling), in place; returns the loss sum."""
    h = np.zeros(syn0.shape[1], syn0.dtype)
    grad = np.zeros(syn0.shape[1], syn0.dtype)
    loss, _, _ = _train_sentence(np.asarray(sentence, np.int32), syn0, syn1, syn1neg, codes, points, lengths, table,
                                 False, cbow_mean, window, negative, hs, alpha, h, grad, np.uint64(seed))
    return float(loss)


def _chunk_bounds(starts: np.ndarray, chunk_words: int) -> np.ndarray:
    """Sentence indices cutting the corpus into chunks of about ``chunk_words`` words."""
    targets = np.arange(0, starts[-1], chunk_words)
    cuts = np.unique(np.searchsorted(starts, targets, side="left"))
    return np.unique(np.concatenate([cuts, [len(starts) - 1]])).astype(np.int64)


def _words_before(starts: np.ndarray, bounds: np.ndarray, chunks: np.ndarray) -> np.ndarray:
    """Words in the preceding ``chunks`` for each of ``chunks`` (consecutive chunk ids)."""
    words = starts[bounds[chunks + 1]] - starts[bounds[chunks]]
    return np.cumsum(words) - words


class Schedule:
    """How Hogwild workers take the corpus: cut into chunks of about ``chunk_words`` words (whole sentences),
    grouped into ``n_parts`` parts of consecutive chunks that advance side by side, as word2vec.c gives each
    thread its own part of the file. :meth:`epoch` yields, per kernel call, ``per_part`` chunks of every part:
    (first sentence, end sentence, words trained before it) per chunk. A chunk's words start after ``done``
    plus ``n_parts`` times the words before it in its own part's piece (this sets its learning rate)."""

    def __init__(self, starts: np.ndarray, chunk_words: int, n_parts: int, epochs: int) -> None:
        self.starts = starts
        self.bounds = _chunk_bounds(starts, chunk_words)
        self.total = max(int(starts[-1]) * epochs, 1)
        self.n_parts = max(1, min(n_parts, len(self.bounds) - 1))
        self.parts = np.array_split(np.arange(len(self.bounds) - 1), self.n_parts)
        self.done = 0  # words trained so far (before subsampling), over all epochs

    def epoch(self, per_part: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        starts, bounds = self.starts, self.bounds
        for i in range(0, len(self.parts[0]), per_part):
            pieces = [p[i : i + per_part] for p in self.parts]
            first = np.concatenate([bounds[p] for p in pieces])
            end = np.concatenate([bounds[p + 1] for p in pieces])
            before = np.concatenate([self.done + self.n_parts * _words_before(starts, bounds, p) for p in pieces])
            self.done += int((starts[end] - starts[first]).sum())
            yield first, end, before


def _train_cpu(model: Word2VecModel, ids: np.ndarray, starts: np.ndarray, tables: tuple, progress: Progress | None,
               epoch_done: EpochDone | None) -> None:
    s = model.settings
    threads = s.threads or os.cpu_count() or 1
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    keep, table, codes, points, lengths = tables
    schedule = Schedule(starts, s.chunk_words, s.streams or threads, s.epochs)
    per_part = max(1, s.report_words // s.chunk_words * threads // schedule.n_parts)  # chunks of each part per call
    args = (keep, model.syn0, model.syn1, model.syn1, codes, points, lengths, table, s.sg, s.cbow_mean, s.window,
            s.negative, s.hs, s.start_alpha, s.start_alpha * s.min_alpha_ratio, schedule.total)
    none = np.zeros(0, np.int64)
    _train_chunks(ids, starts, none, none, none, *args, s.seed)  # load the compiled kernel and start its threads
    t0 = time.perf_counter()
    for epoch in range(s.epochs):
        sums, t_epoch = np.zeros(3), time.perf_counter()
        for first, end, before in schedule.epoch(per_part):
            out = _train_chunks(ids, starts, first, end, before, *args, s.seed + epoch * 100_003)
            sums += out.sum(axis=0)
            if progress is not None:
                progress(_report(epoch, out.sum(axis=0), schedule.done, schedule.total, t0, s))
        record = _report(epoch, sums, schedule.done, schedule.total, t0, s)
        record["epoch_seconds"] = time.perf_counter() - t_epoch
        model.history.append(record)
        if epoch_done is not None:
            epoch_done(epoch, record, model)


def _report(epoch: int, sums: np.ndarray, done: int, total: int, t0: float, s: Word2VecSettings) -> dict[str, float]:
    elapsed = time.perf_counter() - t0
    alpha = s.start_alpha - (s.start_alpha - s.start_alpha * s.min_alpha_ratio) * min(done / total, 1.0)
    return {"epoch": float(epoch), "loss": float(sums[0] / max(sums[1], 1)), "examples": float(sums[1]),
            "words_done": float(done), "progress": done / total, "alpha": alpha,
            "words_per_s": done / elapsed if elapsed > 0 else 0.0}


# ----------------------------------------------------------------------------------------------
# the GPU engine: PyTorch, batches of examples. The losses as tensor functions define what the
# step's hand-written update must equal (tests check it against their autograd gradient).


def ns_loss(v_in: torch.Tensor, u_out: torch.Tensor, u_neg: torch.Tensor, neg_mask: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Negative-sampling loss per example: -log σ(u_o·v) - Σ_k log σ(-u_k·v). Shapes (B, D), (B, D), (B, K, D)."""
    pos = torch.nn.functional.logsigmoid((v_in * u_out).sum(-1))  # (B,)
    neg = torch.nn.functional.logsigmoid(-torch.einsum("bd,bkd->bk", v_in, u_neg))  # (B, K)
    if neg_mask is not None:
        neg = neg * neg_mask
    return -(pos + neg.sum(-1))


def hs_loss(v_in: torch.Tensor, u_nodes: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hierarchical-softmax loss per example: -Σ_n log σ((1 - 2·code_n)·u_n·v) over the path (mask: real nodes)."""
    f = torch.einsum("bd,bld->bl", v_in, u_nodes)  # (B, L)
    return -(torch.nn.functional.logsigmoid((1 - 2 * codes) * f) * mask).sum(-1)


def _gpu_batches(ids: torch.Tensor, sent: torch.Tensor, keep: torch.Tensor, window: int, gen: torch.Generator,
                 batch: int):
    """Yield (centre ids, context matrix (B, 2W) with -1 padding, kept tokens) of subsampled tokens, shuffled."""
    kept = torch.rand(ids.shape[0], device=ids.device, generator=gen) < keep[ids]
    tok, snt = ids[kept], sent[kept]
    n = tok.shape[0]
    offsets = torch.cat([torch.arange(-window, 0), torch.arange(1, window + 1)]).to(ids.device)  # (2W,)
    order = torch.randperm(n, device=ids.device, generator=gen)
    for b0 in range(0, n, batch):
        pos = order[b0 : b0 + batch]
        b = torch.randint(0, window, (pos.shape[0], 1), device=ids.device, generator=gen)
        ctx = pos[:, None] + offsets[None, :]  # (B, 2W)
        ok = (ctx >= 0) & (ctx < n) & (offsets.abs()[None, :] <= window - b)
        ctx = ctx.clamp(0, n - 1)
        ok &= snt[ctx] == snt[pos][:, None]
        yield tok[pos], torch.where(ok, tok[ctx], torch.full_like(ctx, -1)), n


def _row_scale(rows: torch.Tensor, weight: torch.Tensor, n_rows: int, cap: float) -> torch.Tensor:
    """Per entry of ``rows``: min(1, cap / uses of its row in the step), uses counted with ``weight`` (0 or 1)."""
    uses = torch.zeros(n_rows, device=rows.device, dtype=weight.dtype).index_add_(0, rows, weight)
    return (cap / uses.clamp(min=cap))[rows]


def _gpu_step(model_t: dict[str, torch.Tensor], centre: torch.Tensor, ctx: torch.Tensor, s: Word2VecSettings,
              alpha: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batched SGD step; returns (loss sum, examples) as device tensors, so the host never waits.

    Every example's update is word2vec.c's: g = α·(label − σ(u·h)) on each output row u, g·h added to u,
    Σ g·u added to the input side. Shapes stay fixed (absent context slots weigh 0) so no step syncs. The
    updates of one step are computed from the same weights and summed, as Hogwild threads would apply
    them; a row that many examples of the step touch (a frequent word in a large batch) would get the
    sum of hundreds of stale updates and diverge, so a row touched more than ``gpu_row_cap`` times moves
    by at most ``gpu_row_cap`` examples' worth (its summed update scaled by cap / uses).
    """
    syn0, syn1 = model_t["syn0"], model_t["syn1"]
    valid = ctx >= 0  # (B, 2W)
    ctx0 = ctx.clamp(min=0)
    cap = float(s.gpu_row_cap)
    if s.sg:  # every (context -> centre) slot is an example; absent slots weigh 0
        src, w = ctx0.reshape(-1), valid.reshape(-1).to(syn0.dtype)
        tgt = centre[:, None].expand_as(ctx).reshape(-1)
        h = syn0[src]  # (N, D)
    else:
        cw = valid.sum(1)
        w = (cw > 0).to(syn0.dtype)
        scale = 1.0 / cw.clamp(min=1).to(syn0.dtype) if s.cbow_mean else torch.ones_like(w)
        h = (syn0[ctx0] * valid[..., None]).sum(1) * scale[:, None]  # (B, D)
        tgt = centre
    if s.hs:
        nodes = model_t["points"][tgt].long()  # (N, L)
        labels = 1 - model_t["codes"][tgt].to(h.dtype)
        mask = model_t["pmask"][tgt].to(h.dtype) * w[:, None]
    else:
        table = model_t["table"]
        neg = table[torch.randint(0, table.shape[0], (tgt.shape[0], s.negative), device=h.device, generator=gen)]
        nodes = torch.cat([tgt[:, None], neg.long()], 1)  # (N, 1 + K)
        labels = torch.zeros(nodes.shape, dtype=h.dtype, device=h.device)
        labels[:, 0] = 1
        mask = torch.cat([w[:, None], (neg != tgt[:, None]).to(h.dtype) * w[:, None]], 1)
    u = syn1[nodes]  # (N, L, D)
    f = torch.einsum("nd,nld->nl", h, u)
    loss = -(torch.nn.functional.logsigmoid(torch.where(labels > 0, f, -f)) * mask).sum()
    g = (labels - torch.sigmoid(f)) * mask * alpha  # (N, L)
    dh = torch.einsum("nl,nld->nd", g, u)
    flat = nodes.reshape(-1)
    du = (g * _row_scale(flat, mask.reshape(-1), syn1.shape[0], cap).view_as(g))[..., None] * h[:, None, :]
    syn1.index_add_(0, flat, du.reshape(-1, h.shape[1]))
    if s.sg:
        syn0.index_add_(0, src, dh * _row_scale(src, w, syn0.shape[0], cap)[:, None])
    else:
        rows, slot_w = ctx0.reshape(-1), (valid.to(h.dtype) * w[:, None]).reshape(-1)
        per_slot = (dh * scale[:, None])[:, None, :].expand(-1, ctx.shape[1], -1).reshape(-1, h.shape[1])
        syn0.index_add_(0, rows, per_slot * (slot_w * _row_scale(rows, slot_w, syn0.shape[0], cap))[:, None])
    return loss, w.sum()


def _train_gpu(model: Word2VecModel, ids: np.ndarray, starts: np.ndarray, tables: tuple, progress: Progress | None,
               epoch_done: EpochDone | None) -> None:
    s = model.settings
    dev = torch.device(s.device)
    keep, table, codes, points, lengths = tables
    gen = torch.Generator(device=dev)
    gen.manual_seed(s.seed)
    t = {"syn0": torch.from_numpy(model.syn0).to(dev), "syn1": torch.from_numpy(model.syn1).to(dev),
         "table": torch.from_numpy(table).to(dev), "codes": torch.from_numpy(codes.astype(np.int64)).to(dev),
         "points": torch.from_numpy(points).to(dev),
         "pmask": torch.arange(codes.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]}
    t["pmask"] = t["pmask"].to(dev)
    ids_t = torch.from_numpy(ids.astype(np.int64)).to(dev)
    sent_t = torch.repeat_interleave(torch.arange(len(starts) - 1), torch.from_numpy(np.diff(starts))).to(dev)
    keep_t = torch.from_numpy(keep).to(dev)
    n_words, total = int(starts[-1]), max(int(starts[-1]) * s.epochs, 1)
    centres = max(1, s.batch_pairs // (s.window if s.sg else 1))  # centres per step
    # load the step's kernels (and the BLAS library's handle) before the clock starts: one centre with no context
    # weighs 0, so the step adds zeros; its own generator leaves the training's random stream as it was
    if n_words:
        _gpu_step(t, ids_t[:1], torch.full((1, 2 * s.window), -1, device=dev), s, 0.0, torch.Generator(device=dev))
    t0 = time.perf_counter()
    for epoch in range(s.epochs):
        sums, t_epoch, seen = torch.zeros(3, dtype=torch.float64, device=dev), time.perf_counter(), 0
        for centre, ctx, kept in _gpu_batches(ids_t, sent_t, keep_t, s.window, gen, centres):
            done = epoch * n_words + int(seen / max(kept, 1) * n_words)
            alpha = max(s.start_alpha * (1 - (1 - s.min_alpha_ratio) * done / total), s.start_alpha * s.min_alpha_ratio)
            loss, ex = _gpu_step(t, centre, ctx, s, alpha, gen)
            seen += len(centre)
            sums[0] += loss
            sums[1] += ex
            if progress is not None and (seen // centres) % max(1, s.report_words // centres) == 0:
                progress(_report(epoch, sums.cpu().numpy(), epoch * n_words + int(seen / max(kept, 1) * n_words),
                                 total, t0, s))
        record = _report(epoch, sums.cpu().numpy(), (epoch + 1) * n_words, total, t0, s)
        record["epoch_seconds"] = time.perf_counter() - t_epoch
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(
                f"word2vec on {s.device}: training diverged in epoch {epoch + 1} (loss {record['loss']}); lower "
                f"batch_pairs ({s.batch_pairs}) or gpu_row_cap ({s.gpu_row_cap})")
        model.history.append(record)
        if epoch_done is not None:
            model.syn0[:], model.syn1[:] = t["syn0"].cpu().numpy(), t["syn1"].cpu().numpy()
            epoch_done(epoch, record, model)
    model.syn0[:], model.syn1[:] = t["syn0"].cpu().numpy(), t["syn1"].cpu().numpy()


# ----------------------------------------------------------------------------------------------
# training


def train(sentences: Sequence[Sequence[str]] | None = None, settings: Word2VecSettings = Word2VecSettings(), *,
          vocab: tuple[list[str], np.ndarray] | None = None, corpus: tuple[np.ndarray, np.ndarray] | None = None,
          progress: Progress | None = None, epoch_done: EpochDone | None = None,
          ) -> Word2VecModel:
    """Train word2vec on tokenized ``sentences`` (or a prepared ``vocab`` and encoded ``corpus``).

    ``progress`` receives a record (loss per example so far in the block, words/s, alpha, progress) about
    every ``settings.report_words`` words; ``epoch_done(epoch, record, model)`` is called after each epoch with the
    model's vectors current, e.g. to log nearest neighbours.
    """
    if settings.engine not in ENGINES:
        raise ValueError(f"word2vec: unknown engine {settings.engine!r}; engines: {', '.join(ENGINES)}")
    if settings.chunk_words < 1:
        raise ValueError(f"word2vec: chunk_words must be >= 1, got {settings.chunk_words}")
    if vocab is None:
        counts: dict[str, int] = {}
        for sent in sentences or ():
            for w in sent:
                counts[w] = counts.get(w, 0) + 1
        vocab = build_vocab(counts, settings.min_count)
    words, freq = vocab
    if not words:
        raise ValueError("word2vec: no word reaches min_count; lower it or give more text")
    if corpus is None:
        corpus = encode_corpus(sentences or (), {w: i for i, w in enumerate(words)})
    ids, starts = corpus
    rng = np.random.default_rng(settings.seed)
    # word2vec.c's initialisation: input vectors uniform in ±0.5/dim, output weights zero
    syn0 = ((rng.random((len(words), settings.dim), dtype=np.float32) - 0.5) / settings.dim).astype(np.float32)
    syn1 = np.zeros((max(len(words) - 1, 1) if settings.hs else len(words), settings.dim), np.float32)
    model = Word2VecModel(list(words), np.asarray(freq), syn0, syn1, settings)
    codes, points, lengths, table = output_tables(freq, settings.hs)
    tables = (keep_probabilities(freq, settings.sample), table, codes, points, lengths)
    engine = resolve_engine(settings)
    if engine == "triton":
        try:
            from lmpipe import word2vec_triton
        except ImportError as exc:
            raise RuntimeError(f"word2vec engine 'triton' needs the triton package ({exc}); PyTorch's CUDA builds "
                               "bring it, or pip install 'lmpipe[gpu]'") from exc
        word2vec_triton.train(model, ids, starts, tables, progress, epoch_done)
    else:
        (_train_cpu if engine == "numba" else _train_gpu)(model, ids, starts, tables, progress, epoch_done)
    return model


def resolve_engine(settings: Word2VecSettings) -> str:
    """The engine that ``settings.engine`` names; ``auto`` is numba on the CPU, the triton kernel on a CUDA device
    where the triton package is installed (faster than the batched engine and closer to the CPU's vectors:
    ``benchmarks/RESULTS.md``), and the batched torch engine elsewhere."""
    if settings.engine != "auto":
        return settings.engine
    if settings.device == "cpu":
        return "numba"
    if str(settings.device).startswith("cuda") and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"
