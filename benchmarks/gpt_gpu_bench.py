"""Training throughput of the GPT-2-small shape on one CUDA GPU, compiled and eager.

Shape: 12 layers, 12 heads, 768 wide, context 1024, vocabulary 50304 (50257 padded to a multiple of 64),
bf16 autocast, fused AdamW. Each timed step is the pretrain stage's step (forward, backward, clipping,
AdamW) through :class:`lmpipe.trainer.Trainer`, queued without a host sync between steps as
``Trainer.fit`` queues them. Prints one line per variant: tokens/s, MFU against
the given peak (800 TFLOP/s, a measured H100 bf16 matmul peak, by default) and peak memory.

    python benchmarks/gpt_gpu_bench.py [--batch 16,32] [--steps 30] [--rounds 1] [--variants compiled,eager]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lmpipe.gpt import GPT, GPTConfig
from lmpipe.trainer import Trainer, TrainSettings


def loss_fn(model, rows):
    _, value = model(rows[:, :-1], rows[:, 1:])
    return value, rows[:, :-1].numel()


def bench(compiled: bool, batch: int, args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    model = GPT(cfg)
    settings = TrainSettings(max_steps=10**6, warmup_steps=0, device="cuda", dtype="bfloat16", compile=compiled,
                             compile_mode=args.compile_mode)
    trainer = Trainer(model, settings, "unused", progress=False)
    data = torch.randint(0, 50257, (8, batch, cfg.block_size + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    t_compile = time.perf_counter()
    for step in range(args.warmup):
        trainer._update([data[step % 8]], loss_fn, step)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t_compile
    rounds = []  # seconds per round of args.steps steps, the model warm: the spread says what the noise is
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for step in range(args.steps):
            trainer._update([data[step % 8]], loss_fn, args.warmup + r * args.steps + step)
        torch.cuda.synchronize()
        rounds.append(time.perf_counter() - t0)
    seconds = sorted(rounds)[len(rounds) // 2]  # the median round
    tok_s = args.steps * batch * cfg.block_size / seconds
    per_round = [args.steps * batch * cfg.block_size / t for t in rounds]
    mfu = model.flops_per_token() * tok_s / (args.peak_tflops * 1e12)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model, data
    torch.cuda.empty_cache()
    return (f"gpt gpu | {args.compile_mode if compiled else 'eager':8} | 12x768 h12 ctx1024 V50304 b{batch} bf16 | "
            f"{tok_s:,.0f} tokens/s | MFU {100 * mfu:.1f}% of {args.peak_tflops:g} TFLOP/s | "
            f"peak mem {peak_gib:.1f} GiB | {1000 * seconds / args.steps:.0f} ms/step | warmup {warmup_s:.0f} s | "
            + (f"rounds {', '.join(f'{x:,.0f}' for x in per_round)} (best {max(per_round):,.0f}) | "
               if len(rounds) > 1 else "") +
            f"{torch.cuda.get_device_name()} torch {torch.__version__}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="16", help="comma-separated sequences of 1024 tokens per step")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=1, help="timed rounds per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled variant")
    p.add_argument("--coordinate-descent", action="store_true",
                   help="let inductor tune its generated kernels' launch parameters (longer compile)")
    p.add_argument("--peak-tflops", type=float, default=800.0, help="bf16 peak for MFU")
    p.add_argument("--variants", default="compiled,eager", help="comma-separated: compiled, eager")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpt_gpu_bench: no CUDA device is available (this benchmark needs an NVIDIA GPU)")
    if not torch.cuda.is_bf16_supported():
        sys.exit(f"gpt_gpu_bench: {torch.cuda.get_device_name()} does not support bf16")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.coordinate_descent:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    for variant in args.variants.split(","):
        if variant not in ("compiled", "eager"):
            sys.exit(f"gpt_gpu_bench: unknown variant {variant!r} (compiled, eager)")
        for batch in (int(b) for b in args.batch.split(",")):
            print(bench(variant == "compiled", batch, args), flush=True)


if __name__ == "__main__":
    main()
