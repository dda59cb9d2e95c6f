"""Training throughput of the GPT-2-small shape on one CUDA GPU, compiled and eager.

Shape: 12 layers, 12 heads, 768 wide, context 1024, vocabulary 50304 (50257 padded to a multiple of 64),
bf16 autocast, fused AdamW. Each timed step is the pretrain stage's step (forward, backward, clipping,
AdamW) through :class:`lmpipe.trainer.Trainer`, queued without a host sync between steps as
``Trainer.fit`` queues them. Prints one line per variant: tokens/s, MFU against
the given peak (800 TFLOP/s, a measured H100 bf16 matmul peak, by default) and peak memory.

Two more choices can be compared, each a comma-separated list: ``--loss-chunk`` (0: all the logits, then the
cross-entropy; N: the fused LM head + cross-entropy in chunks of N tokens; Ns: the same over the targets that
are not ignored only, see ``--ignored`` and ``benchmarks/loss_paths.py``) and ``--sdpa`` (the attention
kernel: ``default`` lets PyTorch choose; ``cudnn``, ``flash`` or ``efficient`` allow only that one). Each line
names the attention kernel that PyTorch picks for the model's shape. ``--ignored 0.58 --variants eager
--loss-chunk 0,8192,8192s`` measures an instruction-tuning step (the kept-targets path is eager only).

    python benchmarks/gpt_gpu_bench.py [--batch 16,32] [--steps 30] [--rounds 1] [--variants compiled,eager] \
        [--loss-chunk 0,8192] [--sdpa default,cudnn]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time

import loss_paths
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmpipe.gpt import GPT, GPTConfig
from lmpipe.trainer import Trainer, TrainSettings

SDPA = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION}


def attention_kernel(batch: int, cfg: GPTConfig) -> str:
    """The backend PyTorch's dispatcher picks for the model's causal attention at this batch, in bf16."""
    q = torch.empty(batch, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head, device="cuda", dtype=torch.bfloat16)
    choice = torch._fused_sdp_choice(q, q, q, is_causal=True)
    return next((name for name, b in SDPBackend.__members__.items() if b.value == choice), str(choice)).lower()


def bench(compiled: bool, batch: int, chunk: str, sdpa: str, args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    torch._dynamo.reset()  # the attention kernel is chosen when a graph is traced: trace each variant afresh
    cfg = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    with sdpa_kernel([SDPA[sdpa]]) if SDPA[sdpa] else contextlib.nullcontext():
        kernel = attention_kernel(batch, cfg)
        return kernel_bench(compiled, batch, chunk, cfg, f"{sdpa} ({kernel})", args)


def kernel_bench(compiled: bool, batch: int, chunk: str, cfg: GPTConfig, attention: str,
                 args: argparse.Namespace) -> str:
    loss_fn = loss_paths.loss_fn(chunk, args.ignored, cfg.block_size)

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
            f"loss {loss_paths.describe(chunk, args.ignored)} | attention {attention} | "
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
    p.add_argument("--loss-chunk", default="0",
                   help="comma-separated: 0 (plain loss), N (fused loss in chunks of N), Ns (N over kept targets)")
    p.add_argument("--ignored", type=float, default=0.0,
                   help="share of ignored targets, as the first part of every 64 tokens (instruction tuning)")
    p.add_argument("--sdpa", default="default", help=f"comma-separated attention kernels: {', '.join(SDPA)}")
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
    variants, sdpas = args.variants.split(","), args.sdpa.split(",")
    for name, allowed, given in (("variant", ("compiled", "eager"), variants), ("sdpa", tuple(SDPA), sdpas)):
        if unknown := sorted(set(given) - set(allowed)):
            sys.exit(f"gpt_gpu_bench: unknown {name} {', '.join(unknown)} (known: {', '.join(allowed)})")
    chunks = loss_paths.parse(args.loss_chunk)
    batches = [int(b) for b in args.batch.split(",")]
    for variant, sdpa, chunk, batch in itertools.product(variants, sdpas, chunks, batches):
        try:
            print(bench(variant == "compiled", batch, chunk, sdpa, args), flush=True)
        except RuntimeError as e:  # e.g. an attention kernel that cannot serve this shape
            print(f"gpt gpu | {variant} | b{batch} | loss chunk {chunk} | attention {sdpa} | failed: "
                  f"{str(e).splitlines()[0]}", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
