"""Training-step throughput of the GPT on CPU: the tiny preset's shape in float32.

Shape: 4 layers, 4 heads, 256 wide, context 256, batch 16, vocabulary 4096 (the tiny preset's
tokenizer). One timed step is what the pretrain stage does per step: forward, backward, gradient
clipping and an AdamW update. Prints one line per loss path; run it on a quiet machine (the load average
is printed). On a busy machine the figure of tokens per CPU-second of this process times the thread count
estimates the quiet figure (a lower bound: contention also slows each thread's work).

``--loss-chunk 0,1024`` compares the plain loss (all the logits, then the cross-entropy) with the fused LM
head + cross-entropy in chunks of 1024 tokens, in alternating rounds on one model, so that drift in the
machine's speed falls on both. The peak memory printed is the process's: compare it across separate runs
with one value each.

``--ignored 0.58 --loss-chunk 0,1024,1024s`` measures an instruction-tuning step: in every 64 tokens the
first 58% of the targets are ignored (the share of prompt and padding in the tiny preset's packed SFT rows),
and a path written ``Ns`` runs the fused head over the kept targets only (``skip_ignored``).

    python benchmarks/gpt_cpu_bench.py [--steps 30] [--threads 2] [--loss-chunk 0,1024] [--rounds 3]
    python benchmarks/gpt_cpu_bench.py --ignored 0.58 --loss-chunk 1024,1024s --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import loss_paths
import torch

from lmpipe.gpt import GPT, GPTConfig
from lmpipe.trainer import Trainer, TrainSettings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--loss-chunk", default="1024",
                   help="comma-separated loss paths: 0 is the plain loss, N the fused head in chunks of N tokens, "
                        "Ns the same over the targets that are not ignored only")
    p.add_argument("--ignored", type=float, default=0.0,
                   help="share of ignored targets, as the first part of every 64 tokens (instruction tuning)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of --steps steps per loss path")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=256, n_layer=4, n_head=4, n_embd=256)
    model = GPT(cfg)
    chunks = loss_paths.parse(args.loss_chunk)
    settings = TrainSettings(max_steps=10**6, warmup_steps=0, device="cpu", dtype="float32", compile=args.compile)
    trainer = Trainer(model, settings, "unused", progress=False)
    data = torch.randint(0, args.vocab, (args.warmup + args.steps, args.batch, cfg.block_size + 1))

    def loss_with(path: str):
        return loss_paths.loss_fn(path, args.ignored, cfg.block_size)

    step = 0
    for chunk in chunks:
        for i in range(args.warmup):
            trainer.train_step([data[i]], loss_with(chunk), step)
            step += 1
    wall = dict.fromkeys(chunks, 0.0)
    cpu = dict.fromkeys(chunks, 0.0)
    for _ in range(args.rounds):
        for chunk in chunks:
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(args.warmup, args.warmup + args.steps):
                trainer.train_step([data[i]], loss_with(chunk), step)
                step += 1
            wall[chunk] += time.perf_counter() - t0
            cpu[chunk] += time.process_time() - c0
    tokens = args.rounds * args.steps * args.batch * cfg.block_size
    load = os.getloadavg()[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for chunk in chunks:
        path = "loss " + loss_paths.describe(chunk, args.ignored)
        print(f"gpt cpu | 4x256 h4 ctx256 b{args.batch} V{args.vocab} fp32{' compiled' if args.compile else ''} | "
              f"{path} | {model.num_params() / 1e6:.2f}M params | {tokens / wall[chunk]:,.0f} tokens/s | "
              f"{1000 * wall[chunk] / (args.rounds * args.steps):.0f} ms/step | {args.threads} threads | "
              f"load {load:.2f} | {tokens / cpu[chunk] * args.threads:,.0f} tokens/s if the threads had their cores "
              f"to themselves | process peak {peak:,.0f} MB | {platform.processor() or platform.machine()} "
              f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
