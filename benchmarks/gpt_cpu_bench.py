"""Training-step throughput of the GPT on CPU: the tiny preset's shape in float32.

Shape: 4 layers, 4 heads, 256 wide, context 256, batch 16, vocabulary 4096 (the tiny preset's
tokenizer). One timed step is what the pretrain stage does per step: forward, backward, gradient
clipping and an AdamW update. Prints one line; run it on a quiet machine (the load average is printed).
On a busy machine the last figure, tokens per CPU-second of this process times the thread count,
estimates the quiet figure (a lower bound: contention also slows each thread's work).

    python benchmarks/gpt_cpu_bench.py [--steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=256, n_layer=4, n_head=4, n_embd=256)
    model = GPT(cfg)
    settings = TrainSettings(max_steps=args.warmup + args.steps, warmup_steps=0, device="cpu", dtype="float32",
                             compile=args.compile)
    trainer = Trainer(model, settings, "unused", progress=False)
    data = torch.randint(0, args.vocab, (args.warmup + args.steps, args.batch, cfg.block_size + 1))

    def loss(m, rows):
        _, value = m(rows[:, :-1], rows[:, 1:])
        return value, rows[:, :-1].numel()

    for step in range(args.warmup):
        trainer.train_step([data[step]], loss, step)
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(args.warmup, args.warmup + args.steps):
        trainer.train_step([data[step]], loss, step)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    tokens = args.steps * args.batch * cfg.block_size
    load = os.getloadavg()[0]
    print(f"gpt cpu | 4x256 h4 ctx256 b{args.batch} V{args.vocab} fp32{' compiled' if args.compile else ''} | "
          f"{model.num_params() / 1e6:.2f}M params | {tokens / seconds:,.0f} tokens/s | "
          f"{1000 * seconds / args.steps:.0f} ms/step | {args.threads} threads | load {load:.2f} | "
          f"{tokens / cpu_seconds * args.threads:,.0f} tokens/s if the threads had their cores to themselves | "
          f"{platform.processor() or platform.machine()} torch {torch.__version__}")


if __name__ == "__main__":
    main()
