"""word2vec's Hogwild engine for GPUs, as a Triton kernel: each program trains its sentences one word at a time.

The batched PyTorch engine (:func:`lmpipe.word2vec._train_gpu`) computes a step's updates from the same weights and
sums them; on a GPU that takes tens of thousands of examples per step, which costs quality (WordSim353 and SimLex
below the CPU engine). Here every program does what one word2vec.c thread does: it walks its chunk of sentences
word by word and applies each example's update at once, reading the weights the previous example left. Thousands
of programs run side by side, each in its own part of the corpus (``streams`` parts, as the CPU engine's threads),
and update the shared matrices without locks (Hogwild, Recht et al. 2011).

Hogwild needs each read of a shared row to see the other programs' recent writes. A GPU's per-multiprocessor L1
cache is not coherent with the others, and plain global loads may be served from it, so a program could work on
its own stale copy of a frequent word's row for a whole launch and then overwrite everyone else's updates with it.
The rows of both matrices are therefore read through L2 only (``cache_modifier=".cg"``). On an H100 without it the
vectors reached 0.13-0.15 analogy accuracy instead of 0.26-0.27 (``benchmarks/RESULTS.md``). And with thousands
of programs at once, two often update the same frequent row together; a program adds its change to the row
(a relaxed atomic add, done in L2) instead of writing back the row it read plus its change, so neither update is
lost. That also ran faster on an H100 (26-30M words/s against 21-24M) with vectors as good.

The rules are the numba kernel's (:func:`lmpipe.word2vec._train_chunks`): the same random number generator and
draws (window, negatives), pair order, learning-rate schedule and losses; subsampling is done per epoch on the
device before the kernel runs. On a CPU tensor the kernel runs in Triton's interpreter: slow, but it makes the
kernel's logic testable without a GPU (with one program and no subsampling it reproduces the numba kernel).

Needs the ``triton`` package (bundled with PyTorch's CUDA builds).
"""

import time
from functools import cache

import numpy as np
import torch
import triton
import triton.language as tl

from lmpipe import word2vec

LCG_MUL = tl.constexpr(25214903917)  # word2vec.c's linear congruential generator, as in the numba kernel
LCG_ADD = tl.constexpr(11)
# programs per launch on a GPU: parts of the corpus trained side by side (on an H100, 2,048 trained fastest of
# 512 to 65,536, with vectors as good)...
DEFAULT_STREAMS = 2_048
MIN_PART_WORDS = 1_000  # ...but fewer on a small corpus, where thousands of programs would update the same rows
LAUNCHES_PER_EPOCH = 8  # each part is cut into chunks so that an epoch takes about this many launches


def _sgns_kernel(kids, kstarts, starts, first, end, before, table, syn0, syn1, codes, points, lengths, out,
                 table_size, alpha0, alpha_end, words_total, seed,
                 DIM: tl.constexpr, BLOCK: tl.constexpr, SG: tl.constexpr, HS: tl.constexpr, NEG: tl.constexpr,
                 CBOW_MEAN: tl.constexpr, WINDOW: tl.constexpr, MAX_CODE: tl.constexpr):
    """Program ``pid`` trains sentences ``first[pid]`` to ``end[pid] - 1`` (ids ``kids[kstarts[s]:kstarts[s+1]]``,
    already subsampled); ``before[pid]`` counts the words trained before them, which sets the learning rate.
    Writes (loss sum, examples, words) to ``out[pid]``."""
    # rows of syn0 and syn1 are read through L2 (.cg) and changed by atomic adds: see the module's docstring
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < DIM
    s0 = tl.load(first + pid)
    s1 = tl.load(end + pid)
    done0 = tl.load(before + pid)
    start0 = tl.load(starts + s0)
    # (no .to() on the scalar arguments: where one equals 1, a compiled kernel may receive it as a constexpr)
    state = (tl.full([], 0, tl.uint64) + seed) * 1_000_003 + s0.to(tl.uint64) * 7919 + 1
    window = tl.full([], WINDOW, tl.uint64)
    n_table = tl.full([], 0, tl.uint64) + table_size
    loss = tl.full([], 0.0, tl.float32)
    examples = tl.full([], 0, tl.int64)
    words = tl.full([], 0, tl.int64)
    for s in range(s0, s1):
        a = tl.load(kstarts + s)
        n = tl.load(kstarts + s + 1) - a
        progress = (done0 + tl.load(starts + s) - start0).to(tl.float32) / words_total
        alpha = tl.maximum(alpha0 - (alpha0 - alpha_end) * progress, alpha_end)
        for _ in range(0, n):  # the numba kernel draws once per word to subsample it
            state = state * LCG_MUL + LCG_ADD
        words += n
        for i in range(0, n):
            state = state * LCG_MUL + LCG_ADD
            b = ((state >> 16) % window).to(tl.int64)  # dynamic window: WINDOW - b words each side
            lo = tl.maximum(i - WINDOW + b, 0)
            hi = tl.minimum(i + WINDOW - b + 1, n)
            target = tl.load(kids + a + i).to(tl.int64)
            if SG:  # noqa: SIM108 (a constexpr branch reads better in a kernel)
                n_ex = hi - lo - 1  # one example per context word: its vector predicts the centre
            else:
                n_ex = tl.minimum(hi - lo - 1, 1)  # one example: the mean (or sum) of the window predicts the centre
            for e in range(0, n_ex):
                if SG:
                    c = lo + e
                    c = tl.where(c >= i, c + 1, c)
                    src = tl.load(kids + a + c).to(tl.int64)
                    h = tl.load(syn0 + src * DIM + offs, mask=mask, other=0.0, cache_modifier=".cg")
                    scale = 1.0
                else:
                    h = tl.full([BLOCK], 0.0, tl.float32)
                    for c in range(lo, hi):
                        if c != i:
                            row = tl.load(kids + a + c).to(tl.int64)
                            h += tl.load(syn0 + row * DIM + offs, mask=mask, other=0.0, cache_modifier=".cg")
                    scale = 1.0
                    if CBOW_MEAN:
                        scale = 1.0 / (hi - lo - 1).to(tl.float32)
                    h = h * scale
                grad = tl.full([BLOCK], 0.0, tl.float32)
                if HS:
                    for d in range(0, tl.load(lengths + target)):
                        node = tl.load(points + target * MAX_CODE + d).to(tl.int64)
                        label = 1.0 - tl.load(codes + target * MAX_CODE + d).to(tl.float32)
                        u = tl.load(syn1 + node * DIM + offs, mask=mask, other=0.0, cache_modifier=".cg")
                        f = tl.sum(h * u, axis=0)
                        ex = tl.exp(-tl.abs(f))
                        sig = tl.where(f >= 0, 1.0 / (1.0 + ex), ex / (1.0 + ex))
                        signed = tl.where(label == 1.0, f, -f)  # -log σ(x) = max(-x, 0) + log(1 + e^-|x|)
                        loss += tl.maximum(-signed, 0.0) + tl.log(1.0 + ex)
                        g = alpha * (label - sig)
                        grad += g * u
                        tl.atomic_add(syn1 + node * DIM + offs, g * h, mask=mask, sem="relaxed")
                else:
                    for d in range(0, NEG + 1):
                        word = target
                        if d > 0:  # a noise word (the positive example needs no table read)
                            state = state * LCG_MUL + LCG_ADD
                            word = tl.load(table + ((state >> 16) % n_table).to(tl.int64)).to(tl.int64)
                        label = tl.where(d > 0, 0.0, 1.0)
                        if (d == 0) | (word != target):  # a draw of the target itself is skipped
                            u = tl.load(syn1 + word * DIM + offs, mask=mask, other=0.0, cache_modifier=".cg")
                            f = tl.sum(h * u, axis=0)
                            ex = tl.exp(-tl.abs(f))
                            sig = tl.where(f >= 0, 1.0 / (1.0 + ex), ex / (1.0 + ex))
                            signed = tl.where(label == 1.0, f, -f)
                            loss += tl.maximum(-signed, 0.0) + tl.log(1.0 + ex)
                            g = alpha * (label - sig)
                            grad += g * u
                            tl.atomic_add(syn1 + word * DIM + offs, g * h, mask=mask, sem="relaxed")
                examples += 1
                if SG:
                    tl.atomic_add(syn0 + src * DIM + offs, grad, mask=mask, sem="relaxed")
                else:
                    for c in range(lo, hi):  # dLoss/d v_c = scale · dLoss/dh (gensim's cbow_mean rule)
                        if c != i:
                            row = tl.load(kids + a + c).to(tl.int64)
                            tl.atomic_add(syn0 + row * DIM + offs, scale * grad, mask=mask, sem="relaxed")
    tl.store(out + pid * 3, loss)
    tl.store(out + pid * 3 + 1, examples.to(tl.float32))
    tl.store(out + pid * 3 + 2, words.to(tl.float32))


@cache
def kernel(interpret: bool):
    """The kernel compiled for the GPU, or run by Triton's interpreter (``interpret``) on CPU tensors."""
    if interpret != bool(triton.knobs.runtime.interpret):
        raise RuntimeError("word2vec's triton engine: CPU tensors run in Triton's interpreter, which must be chosen "
                           "before triton is imported (TRITON_INTERPRET=1); CUDA tensors need it unset")
    # one compiled kernel for every seed and size (Triton would otherwise specialise an argument equal to 1)
    return triton.jit(_sgns_kernel, do_not_specialize=["table_size", "words_total", "seed"])


def launch(ids: torch.Tensor, kstarts: torch.Tensor, starts: torch.Tensor, first: torch.Tensor, end: torch.Tensor,
           before: torch.Tensor, tables: dict[str, torch.Tensor], syn0: torch.Tensor, syn1: torch.Tensor,
           s: "word2vec.Word2VecSettings", words_total: int, seed: int) -> torch.Tensor:
    """Train chunks ``first[k]..end[k] - 1`` side by side, one program each; returns (programs, 3) sums."""
    out = torch.zeros((len(first), 3), dtype=torch.float32, device=syn0.device)
    alpha0 = s.start_alpha
    kernel(syn0.device.type == "cpu")[(len(first),)](
        ids, kstarts, starts, first, end, before, tables["table"], syn0, syn1, tables["codes"], tables["points"],
        tables["lengths"], out, tables["table"].shape[0], alpha0, alpha0 * s.min_alpha_ratio, words_total, seed,
        DIM=syn0.shape[1], BLOCK=triton.next_power_of_2(syn0.shape[1]), SG=s.sg, HS=s.hs, NEG=s.negative,
        CBOW_MEAN=s.cbow_mean, WINDOW=s.window, MAX_CODE=tables["codes"].shape[1], num_warps=1)
    return out


def device_tables(codes: np.ndarray, points: np.ndarray, lengths: np.ndarray, table: np.ndarray,
                  device: torch.device | str) -> dict[str, torch.Tensor]:
    """The output tables (:func:`lmpipe.word2vec.output_tables`) on ``device``, as :func:`launch` takes them."""
    arrays = {"codes": codes, "points": points, "lengths": lengths, "table": table}
    return {name: torch.from_numpy(a).to(device) for name, a in arrays.items()}


def subsample(ids: torch.Tensor, sent: torch.Tensor, keep: torch.Tensor, n_sentences: int,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's kept words (word2vec.c's subsampling) and the sentence starts in that list."""
    kept = torch.rand(ids.shape[0], device=ids.device, generator=gen) < keep[ids]
    counts = torch.bincount(sent[kept], minlength=n_sentences)
    kstarts = torch.zeros(n_sentences + 1, dtype=torch.int64, device=ids.device)
    kstarts[1:] = torch.cumsum(counts, 0)
    return ids[kept].contiguous(), kstarts


def train(model: "word2vec.Word2VecModel", ids: np.ndarray, starts: np.ndarray, tables: tuple,
          progress: "word2vec.Progress | None", epoch_done: "word2vec.EpochDone | None") -> None:
    """Train ``model`` in place on ``settings.device`` (a CUDA device, or the CPU through the interpreter)."""
    s = model.settings
    dev = torch.device(s.device)
    keep, table, codes, points, lengths = tables
    t = device_tables(codes, points, lengths, table, dev)
    syn0, syn1 = torch.from_numpy(model.syn0).to(dev), torch.from_numpy(model.syn1).to(dev)
    n_sent = len(starts) - 1
    ids_t = torch.from_numpy(ids).to(dev)
    starts_t = torch.from_numpy(starts).to(dev)
    sent_t = torch.repeat_interleave(torch.arange(n_sent, device=dev), torch.from_numpy(np.diff(starts)).to(dev))
    keep_t = torch.from_numpy(keep).to(dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(s.seed)
    n_parts = s.streams or (min(DEFAULT_STREAMS, max(1, int(starts[-1]) // MIN_PART_WORDS)) if dev.type == "cuda"
                            else 1)
    chunk_words = max(1, int(starts[-1]) // (n_parts * LAUNCHES_PER_EPOCH))
    schedule = word2vec.Schedule(starts, chunk_words, n_parts, s.epochs)
    # compile the kernel before the clock starts: a launch of no programs compiles it and runs nothing (Triton
    # skips an empty grid), so the words/s of a short run are not the compiler's
    none = torch.zeros(0, dtype=torch.int64, device=dev)
    launch(ids_t, starts_t, starts_t, none, none, none, t, syn0, syn1, s, schedule.total, s.seed)
    t0 = time.perf_counter()
    for epoch in range(s.epochs):
        sums, t_epoch = np.zeros(3), time.perf_counter()
        kids, kstarts = subsample(ids_t, sent_t, keep_t, n_sent, gen)
        for first, end, before in schedule.epoch(1):
            out = launch(kids, kstarts, starts_t, torch.from_numpy(first).to(dev), torch.from_numpy(end).to(dev),
                         torch.from_numpy(before).to(dev), t, syn0, syn1, s, schedule.total,
                         s.seed + epoch * 100_003).sum(0).double().cpu().numpy()
            sums += out
            if progress is not None:
                progress(word2vec._report(epoch, out, schedule.done, schedule.total, t0, s))
        record = word2vec._report(epoch, sums, schedule.done, schedule.total, t0, s)
        record["epoch_seconds"] = time.perf_counter() - t_epoch
        model.history.append(record)
        if epoch_done is not None:
            model.syn0[:], model.syn1[:] = syn0.cpu().numpy(), syn1.cpu().numpy()
            epoch_done(epoch, record, model)
    model.syn0[:], model.syn1[:] = syn0.cpu().numpy(), syn1.cpu().numpy()
