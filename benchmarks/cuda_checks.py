"""Correctness checks of the CUDA code paths, for a machine with an NVIDIA GPU (the test suite runs on CPU).

    python benchmarks/cuda_checks.py [GROUP ...]    # groups: gpt, loss, ppo, trainer, word2vec (default: all)

Each check prints one line, ``ok`` or ``FAIL`` with the numbers it compared; the exit status is the count
of failures. What is checked:

- GPT forward on the GPU in float32 against the CPU, and under bf16 autocast against float32 (relative
  error of the logits), for learned and rotary positions; causality under bf16 with the flash kernel;
- KV-cache greedy generation on the GPU against full recomputation;
- the fused LM head + cross-entropy under bf16 autocast, eager and compiled, against the plain loss;
- PPO's fused head (response log-probs and entropies) under bf16 autocast against the full logits;
- the trainer on the GPU (bf16 autocast, fused AdamW, the fused loss): the loss falls on a learnable task, a killed and
  resumed run follows the uninterrupted run's loss curve, and the compiled model's first losses match eager;
- the word2vec torch engine on the GPU learns planted structure (skip-gram and CBOW, negative sampling and
  hierarchical softmax); so does the triton engine, whose kernel, run as one program, must also reproduce
  the numba kernel's updates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lmpipe import word2vec as w2v
from lmpipe.gpt import GPT, GPTConfig
from lmpipe.trainer import Objective, Trainer, TrainSettings
from lmpipe.vectors import WordVectors

FAILURES: list[str] = []
DEV = "cuda"  # --cpu runs the same checks on the CPU, to check the checks


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def small_gpt(positions: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=128, positions=positions))


def gpt_checks() -> None:
    for positions in ("learned", "rope"):
        cpu = small_gpt(positions).eval()
        gpu = small_gpt(positions).to(DEV).eval()
        x = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref, _ = cpu(x)
            torch.backends.cuda.matmul.allow_tf32 = False
            f32, _ = gpu(x.to(DEV))
            with torch.autocast(DEV, torch.bfloat16):
                b16, _ = gpu(x.to(DEV))
        e32, e16 = rel_err(f32, ref), rel_err(b16.float(), ref)
        check(f"gpt {positions} fp32 cuda = cpu", e32 < 1e-4, f"rel err {e32:.2e} (< 1e-4)")
        check(f"gpt {positions} bf16 autocast ~ fp32", e16 < 3e-2, f"rel err {e16:.2e} (< 3e-2)")

        y = x.clone()
        y[:, 64:] = (y[:, 64:] + 1) % 512  # change the future only
        with torch.no_grad(), torch.autocast(DEV, torch.bfloat16):
            a, _ = gpu(x.to(DEV))
            b, _ = gpu(y.to(DEV))
        check(f"gpt {positions} causal under bf16", torch.equal(a[:, :64], b[:, :64]),
              f"max |diff| before the change {float((a[:, :64] - b[:, :64]).abs().max()):.1e}")

        prompt = torch.randint(2, 512, (3, 7), generator=torch.Generator().manual_seed(2)).to(DEV)
        gen = gpu.generate(prompt, 16, temperature=0, eot_id=None)
        seq = prompt
        with torch.no_grad():
            for _ in range(16):
                logits, _ = gpu(seq)
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        same = float((gen.tokens == seq[:, 7:]).float().mean())
        check(f"gpt {positions} cached greedy = recomputation", same == 1.0, f"{same:.0%} of tokens equal")
        torch.backends.cuda.matmul.allow_tf32 = True


def loss_checks() -> None:
    """The fused LM head + cross-entropy on the GPU under bf16 autocast, eager and compiled, against the plain
    path (all the logits, then a float32 cross-entropy): the same loss and gradients up to bf16 rounding."""
    x = torch.randint(0, 512, (8, 129), generator=torch.Generator().manual_seed(2)).to(DEV)
    results = {}
    for name, chunk, compiled in (("plain", 0, False), ("fused", 256, False), ("fused compiled", 256, True)):
        model = small_gpt("learned").to(DEV)
        run = torch.compile(model) if compiled else model
        with torch.autocast(DEV, torch.bfloat16):
            _, loss = run(x[:, :-1], x[:, 1:], loss_chunk=chunk)
        loss.backward()
        results[name] = (loss.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    ref_loss, ref_grad = results["plain"]
    for name in ("fused", "fused compiled"):
        loss, grad = results[name]
        dl, dg = abs(float(loss - ref_loss)) / float(ref_loss), rel_err(grad, ref_grad)
        check(f"gpt {name} loss = plain loss (bf16)", dl < 1e-3 and dg < 2e-2,
              f"loss rel diff {dl:.2e} (< 1e-3), gradient rel err {dg:.2e} (< 2e-2)")


def ppo_checks() -> None:
    """PPO's fused LM head (log-probs and entropies, chunk by chunk, logits made again in backward) on the GPU
    under bf16 autocast, against the full logits: the same numbers and gradients up to bf16 rounding."""
    from lmpipe import ppo
    from lmpipe.bpe import END_ID, PAD_ID

    g = torch.Generator().manual_seed(4)
    response = torch.randint(10, 512, (6, 24), generator=g)
    lengths = torch.randint(4, 25, (6,), generator=g)
    mask = (torch.arange(24)[None] < lengths[:, None]).long()
    response = torch.where(mask.bool(), response, PAD_ID)
    response[torch.arange(6), lengths - 1] = END_ID
    prompts = [torch.randint(10, 512, (int(n),), generator=g).tolist() for n in torch.randint(3, 20, (6,), generator=g)]
    batch = ppo.layout(prompts, response.to(DEV), mask.to(DEV), torch.ones(6, dtype=torch.bool, device=DEV))
    results = {}
    for chunk in (0, 32):
        model = ppo.ActorCritic(small_gpt("learned")).to(DEV).eval()
        torch.nn.init.normal_(model.value_head.weight, std=0.02)
        with torch.autocast(DEV, torch.bfloat16):
            logp, entropy, values = model(batch.idx, batch.positions, batch.attn_mask, batch.prompt_len - 1,
                                          batch.response, batch.mask, 0.8, chunk)
        (logp.sum() + 0.1 * entropy.sum() + values.float().sum()).backward()
        results[chunk] = (logp.detach(), entropy.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                                                      if p.grad is not None]))
    (lp0, h0, g0), (lp1, h1, g1) = results[0], results[32]
    dl, dh, dg = float((lp1 - lp0).abs().max()), float((h1 - h0).abs().max()), rel_err(g1, g0)
    check("ppo fused head = full logits (bf16)", dl < 3e-2 and dh < 3e-2 and dg < 2e-2,
          f"max |log-prob diff| {dl:.1e}, max |entropy diff| {dh:.1e} (< 3e-2), gradient rel err {dg:.2e} (< 2e-2)")


class Pattern(Objective):
    """Rows of a fixed random sequence at random offsets: learnable, so the loss must fall well below log V."""

    def __init__(self, batch: int = 16, fail_at: int | None = None) -> None:
        self.seq = torch.randint(0, 512, (640,), generator=torch.Generator().manual_seed(5))
        self.batch, self.fail_at = batch, fail_at

    def batches(self, step: int):
        if step == self.fail_at:
            raise KeyboardInterrupt("killed")
        g = torch.Generator().manual_seed(100 + step)
        starts = torch.randint(0, 640 - 129, (self.batch,), generator=g)
        return [torch.stack([self.seq[s : s + 129] for s in starts.tolist()]).to(DEV)]

    def loss(self, model, rows):
        _, loss = model(rows[:, :-1], rows[:, 1:], loss_chunk=512)  # the fused head, as the pretrain stage's
        return loss, rows[:, :-1].numel()

    def evaluate(self, model, step, last):
        return {}


def trainer_checks() -> None:
    base = TrainSettings(max_steps=60, warmup_steps=5, lr=3e-3, min_lr=3e-4, save_every=20, eval_every=0,
                         log_every=1000, device=DEV, dtype="bfloat16", deterministic=True)
    with tempfile.TemporaryDirectory() as tmp:
        full = Trainer(small_gpt("rope"), base, Path(tmp) / "a", progress=False)
        full.fit(Pattern())
        first, last = full.losses[0], full.losses[-1]
        check("trainer bf16 loss falls", last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}")

        killed = Trainer(small_gpt("rope"), base, Path(tmp) / "b", progress=False)
        with contextlib.suppress(KeyboardInterrupt):
            killed.fit(Pattern(fail_at=45))
        resumed = Trainer(small_gpt("rope", seed=9), base, Path(tmp) / "b", progress=False)
        resumed.fit(Pattern())
        diff = max(abs(a - b) for a, b in zip(resumed.losses, full.losses, strict=True))
        check("trainer killed at 45 and resumed = uninterrupted", diff < 1e-3,
              f"max |loss diff| over 60 steps {diff:.2e}" + (" (bit-identical)" if diff == 0 else ""))

        short = dataclasses.replace(base, max_steps=10, save_every=0)
        eager = Trainer(small_gpt("learned"), short, Path(tmp) / "c", progress=False)
        eager.fit(Pattern())
        compiled = Trainer(small_gpt("learned"), dataclasses.replace(short, compile=True), Path(tmp) / "d",
                           progress=False)
        compiled.fit(Pattern())
        diff = max(abs(a - b) / a for a, b in zip(compiled.losses, eager.losses, strict=True))
        check("trainer compiled ~ eager (10 steps, bf16)", diff < 2e-2, f"max relative loss diff {diff:.2e}")


def planted_topics(sentences: list[list[str]], topics: list[list[str]], s: w2v.Word2VecSettings, name: str) -> None:
    """Train on sentences drawn from one topic each: every word's nearest neighbour must share its topic."""
    model = w2v.train(sentences, s)
    wv = WordVectors(model.words, model.syn0)
    words = [w for t in topics for w in t]
    hits = sum(wv.nearest(w, 1)[0][0][:2] == w[:2] for w in words) / len(words)
    losses = [h["loss"] for h in model.history]
    check(f"word2vec {name} {s.name} planted topics", hits >= 0.9 and losses[-1] < losses[0],
          f"nearest neighbour in topic {hits:.0%}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def word2vec_checks() -> None:
    rng = np.random.default_rng(0)
    topics = [[f"t{t}w{i}" for i in range(4)] for t in range(6)]
    sentences = [list(rng.choice(topics[rng.integers(6)], 8)) for _ in range(3000)]
    for variant in ("sg-ns", "sg-hs", "cbow-ns", "cbow-hs"):
        s = w2v.Word2VecSettings(sg=variant.startswith("sg"), hs=variant.endswith("hs"), dim=12, window=3,
                                 epochs=5, min_count=1, sample=0.0, seed=3, device=DEV, batch_pairs=2048,
                                 engine="torch")  # the batched engine (auto picks the triton one on CUDA)
        planted_topics(sentences, topics, s, f"torch on {DEV}")
    if DEV != "cuda":
        return
    try:
        from lmpipe import word2vec_triton as wt
    except ImportError as exc:
        check("word2vec triton engine", False, f"triton is not importable: {exc}")
        return
    for variant in ("sg-ns", "sg-hs", "cbow-ns", "cbow-hs"):
        s = w2v.Word2VecSettings(sg=variant.startswith("sg"), hs=variant.endswith("hs"), dim=12, window=3,
                                 epochs=5, min_count=1, sample=1e-3, seed=3, device=DEV, engine="triton")
        planted_topics(sentences, topics, s, "triton")
        # one program trains the first 200 sentences in order: the numba kernel's updates, to rounding
        words_, freq = w2v.build_vocab({w: 1 for sent in sentences for w in sent}, 1)
        ids, starts = w2v.encode_corpus(sentences[:200], {w: i for i, w in enumerate(words_)})
        codes, points, lengths, table = w2v.output_tables(freq, s.hs)
        syn0 = ((np.random.default_rng(1).random((len(words_), 12), dtype=np.float32) - 0.5) / 12)
        syn1 = np.zeros((len(words_), 12), np.float32)
        a0, a1 = syn0.copy(), syn1.copy()
        first, end, before = np.array([0]), np.array([len(starts) - 1]), np.array([0])
        w2v._train_chunks(ids, starts, first, end, before, np.ones(len(words_), np.float32), a0, a1, a1, codes,
                          points, lengths, table, s.sg, True, 3, s.negative, s.hs, s.start_alpha,
                          s.start_alpha * s.min_alpha_ratio, 10_000, 5)
        t = wt.device_tables(codes, points, lengths, table, DEV)
        b0, b1 = torch.from_numpy(syn0.copy()).to(DEV), torch.from_numpy(syn1.copy()).to(DEV)
        st = torch.from_numpy(starts).to(DEV)
        wt.launch(torch.from_numpy(ids).to(DEV), st, st, *(torch.from_numpy(x).to(DEV) for x in (first, end, before)),
                  t, b0, b1, s, 10_000, 5)
        diff = max(float(np.abs(a0 - b0.cpu().numpy()).max()), float(np.abs(a1 - b1.cpu().numpy()).max()))
        moved = float(np.abs(a0 - syn0).max())
        check(f"word2vec triton {variant} kernel = numba kernel", diff < 1e-4 and moved > 1e-3,
              f"max |difference| {diff:.2e} after moving the vectors by up to {moved:.2e}")


def main() -> int:
    global DEV
    if "--cpu" in sys.argv[1:]:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("cuda_checks: no CUDA device is available")
        return 1
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    print(f"{name} | torch {torch.__version__} | bf16 {torch.cuda.is_bf16_supported()} | "
          f"flash sdp {torch.backends.cuda.flash_sdp_enabled()}", flush=True)
    groups: list[Callable[[], None]] = [gpt_checks, loss_checks, ppo_checks, trainer_checks, word2vec_checks]
    if chosen := [a for a in sys.argv[1:] if not a.startswith("--")]:  # e.g. `cuda_checks.py word2vec ppo`
        known = {g.__name__.removesuffix("_checks"): g for g in groups}
        if unknown := sorted(set(chosen) - set(known)):
            print(f"cuda_checks: unknown group {', '.join(unknown)} (groups: {', '.join(known)})")
            return 1
        groups = [known[name] for name in chosen]
    for group in groups:
        try:
            group()
        except Exception as exc:  # report and go on: one broken path must not hide the others
            import traceback

            traceback.print_exc()
            check(group.__name__, False, f"raised {type(exc).__name__}: {exc}")
    print(f"{len(FAILURES)} failed" + (f": {', '.join(FAILURES)}" if FAILURES else ""))
    return len(FAILURES)


if __name__ == "__main__":
    sys.exit(main())
