"""Training-step throughput of the GPT on CPU: the tiny preset's shape, in float32 or bf16 autocast.

Shape: 4 layers, 4 heads, 256 wide, context 256, batch 16, vocabulary 4096 (the tiny preset's
tokenizer). One timed step is what the pretrain stage does per step: forward, backward, gradient
clipping and an AdamW update. Prints one line per loss path; run it on a quiet machine (the load average
is printed). On a busy machine the figure of tokens per CPU-second of this process times the thread count
estimates the quiet figure (a lower bound: contention also slows each thread's work).

``--loss-chunk 0,1024`` compares the plain loss (all the logits, then the cross-entropy) with the fused LM
head + cross-entropy in chunks of 1024 tokens, in alternating rounds on one model, so that drift in the
machine's speed falls on both. The peak memory printed is the process's: compare it across separate runs
with one value each.

``--dtype float32,bfloat16`` compares the precisions the same way, one model per precision from the same
initialisation. bf16 autocast pays on CPUs with AVX512-BF16 or AMX (the pretrain stage's ``dtype: auto`` picks
it there); elsewhere bf16 is emulated and slower than float32.

``--ignored 0.58 --loss-chunk 0,1024,1024s`` measures an instruction-tuning step: in every 64 tokens the
first 58% of the targets are ignored (the share of prompt and padding in the tiny preset's packed SFT rows),
and a path written ``Ns`` runs the fused head over the kept targets only (``skip_ignored``).

    python benchmarks/gpt_cpu_bench.py [--steps 30] [--threads 2] [--loss-chunk 0,1024] [--rounds 3]
    python benchmarks/gpt_cpu_bench.py --vocab 65 --dtype float32,bfloat16 --rounds 3 --steps 10
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
    p.add_argument("--dtype", default="float32",
                   help="comma-separated autocast precisions, float32 and/or bfloat16 (bf16 pays on CPUs with "
                        "AVX512-BF16 or AMX; elsewhere it is emulated)")
    p.add_argument("--loss-chunk", default="1024",
                   help="comma-separated loss paths: 0 is the plain loss, N the fused head in chunks of N tokens, "
                        "Ns the same over the targets that are not ignored only")
    p.add_argument("--ignored", type=float, default=0.0,
                   help="share of ignored targets, as the first part of every 64 tokens (instruction tuning)")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternating rounds of --steps steps per precision and loss path")
    args = p.parse_args()
    dtypes = [d.strip() for d in args.dtype.split(",")]
    if unknown := set(dtypes) - {"float32", "bfloat16"}:
        raise SystemExit(f"unknown --dtype {sorted(unknown)}: write float32 and/or bfloat16")
    torch.set_num_threads(args.threads)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=256, n_layer=4, n_head=4, n_embd=256)
    trainers = {}
    for dtype in dtypes:  # one model and optimizer per precision, from the same initialisation
        torch.manual_seed(0)
        settings = TrainSettings(max_steps=10**6, warmup_steps=0, device="cpu", dtype=dtype, compile=args.compile)
        trainers[dtype] = Trainer(GPT(cfg), settings, "unused", progress=False)
    paths = [(dtype, chunk) for dtype in dtypes for chunk in loss_paths.parse(args.loss_chunk)]
    data = torch.randint(0, args.vocab, (args.warmup + args.steps, args.batch, cfg.block_size + 1))
    steps = dict.fromkeys(dtypes, 0)

    def run(path: tuple[str, str], rows: range) -> None:
        dtype, chunk = path
        loss = loss_paths.loss_fn(chunk, args.ignored, cfg.block_size)
        for i in rows:
            trainers[dtype].train_step([data[i]], loss, steps[dtype])
            steps[dtype] += 1

    for path in paths:
        run(path, range(args.warmup))
    wall = dict.fromkeys(paths, 0.0)
    cpu = dict.fromkeys(paths, 0.0)
    for _ in range(args.rounds):
        for path in paths:
            t0, c0 = time.perf_counter(), time.process_time()
            run(path, range(args.warmup, args.warmup + args.steps))
            wall[path] += time.perf_counter() - t0
            cpu[path] += time.process_time() - c0
    tokens = args.rounds * args.steps * args.batch * cfg.block_size
    load = os.getloadavg()[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = trainers[dtypes[0]].raw_model.num_params()
    for path in paths:
        dtype, chunk = path
        mode = dtype + (" compiled" if args.compile else "")
        print(f"gpt cpu | 4x256 h4 ctx256 b{args.batch} V{args.vocab} {mode} | "
              f"loss {loss_paths.describe(chunk, args.ignored)} | {params / 1e6:.2f}M params | "
              f"{tokens / wall[path]:,.0f} tokens/s | "
              f"{1000 * wall[path] / (args.rounds * args.steps):.0f} ms/step | {args.threads} threads | "
              f"load {load:.2f} | {tokens / cpu[path] * args.threads:,.0f} tokens/s if the threads had their cores "
              f"to themselves | process peak {peak:,.0f} MB | {platform.processor() or platform.machine()} "
              f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
