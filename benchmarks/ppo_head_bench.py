"""PPO's LM head: the full (rows x tokens x vocabulary) logits against the fused, chunked head.

    python benchmarks/ppo_head_bench.py                       # tiny preset's shapes on CPU, both paths
    python benchmarks/ppo_head_bench.py --shape gpt2-vocab    # 4 x 256 body, GPT-2's padded vocabulary
    python benchmarks/ppo_head_bench.py --shape gpt2 --device cuda   # the gpu preset's policy, bf16

Each path (``--chunks``, the ``ppo.loss_chunk`` values; 0 is the full logits) runs in its own process, so
the peak memory is that path's alone: the rollout's annotation (policy and reference log-probs, values,
no gradients) of ``--rows`` rollouts, then ``--steps`` micro-batches of the PPO loss's forward and backward.
The paths alternate over ``--rounds`` rounds. Reported per path: annotation and update milliseconds (the
median over rounds), update tokens/s (prompt and response tokens), and peak memory above what the models
take (CPU: the process's peak RSS; CUDA: the allocator's peak). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from lmpipe import ppo, rl
from lmpipe.bpe import END_ID, PAD_ID
from lmpipe.config import PpoConfig
from lmpipe.gpt import GPT, GPTConfig

SHAPES = {  # name: (n_layer, n_head, n_embd, vocabulary, prompt tokens, response tokens, micro-batch rows)
    "tiny": (4, 4, 256, 4096, 24, 32, 16),  # the tiny preset's policy and PPO batch
    "gpt2-vocab": (4, 4, 256, 50304, 64, 128, 32),  # a small body under GPT-2's head, the gpu preset's batch
    "gpt2": (12, 12, 768, 50304, 64, 128, 32),  # the gpu preset
}


def rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch_of(rows: int, prompt: int, new: int, vocab: int, device: torch.device, seed: int = 0) -> ppo.Batch:
    """Random prompts and responses of random lengths (at least a quarter of ``new``), as PPO lays them out."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, new // 4), new + 1, (rows,), generator=g)
    response = torch.randint(10, vocab, (rows, new), generator=g)
    mask = torch.arange(new)[None] < lengths[:, None]
    response = torch.where(mask, response, PAD_ID)
    response[torch.arange(rows), lengths - 1] = END_ID
    prompts = torch.randint(10, vocab, (rows, prompt), generator=g).tolist()
    return ppo.layout(prompts, response.to(device), mask.long().to(device),
                      torch.ones(rows, dtype=torch.bool, device=device))


def one_path(args: argparse.Namespace, chunk: int) -> dict[str, float]:
    """Time and peak memory of one ``loss_chunk`` in this process."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    n_layer, n_head, n_embd, vocab, prompt, new, rows = SHAPES[args.shape]
    shape = GPTConfig(vocab_size=vocab, block_size=prompt + new, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      dropout=0.0)
    torch.manual_seed(0)
    ac = ppo.ActorCritic(GPT(shape)).to(device)
    ref = GPT(shape).to(device).eval().requires_grad_(False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = PpoConfig(loss_chunk=chunk, entropy_coef=args.entropy_coef, micro_batch_size=rows, mini_batch_size=rows,
                    batch_size=rows)
    batch = batch_of(rows, prompt, new, vocab, device)
    loss_fn = ppo.ppo_loss(cfg, ppo.UpdateStats())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mb()
    annotate_ms, update_ms = [], []
    for _ in range(args.steps + 1):  # the first is a warm-up
        sync()
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            ppo.annotate(ac, ref, batch, cfg.temperature, chunk)
        sync()
        t1 = time.perf_counter()
        adv = torch.randn_like(batch.data["logp"]) * batch.mask
        batch.data.update(advantages=rl.masked_whiten(adv, batch.mask), returns=adv)
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            loss, _ = loss_fn(ac, batch)
        loss.backward()
        ac.zero_grad(set_to_none=True)
        sync()
        annotate_ms.append((t1 - t0) * 1e3)
        update_ms.append((time.perf_counter() - t1) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mb()
    update = statistics.median(update_ms[1:])
    return {"annotate_ms": statistics.median(annotate_ms[1:]), "update_ms": update,
            "update_tokens_per_s": batch.idx.numel() / update * 1e3, "peak_above_models_mb": peak - base,
            "response_tokens": int(batch.mask.sum()), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", default="0,1024", help="ppo.loss_chunk values, comma-separated (0: full logits)")
    ap.add_argument("--steps", type=int, default=3, help="timed annotation + update passes per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--entropy-coef", type=float, default=0.0)
    ap.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only is not None:
        print(json.dumps(one_path(args, args.only)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("ppo_head_bench: no CUDA device")
    chunks = [int(c) for c in args.chunks.split(",")]
    runs: dict[int, list[dict[str, float]]] = {c: [] for c in chunks}
    for _ in range(args.rounds):
        for c in chunks:
            cmd = [sys.executable, __file__, "--only", str(c), *sys.argv[1:]]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[c].append(json.loads(out.strip().splitlines()[-1]))
    result = {"shape": args.shape, "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
              "threads": args.threads, "entropy_coef": args.entropy_coef}
    for c, rs in runs.items():
        name = "full_logits" if c == 0 else f"fused_{c}"
        result[name] = {k: [round(r[k], 1) for r in rs] for k in ("annotate_ms", "update_ms", "update_tokens_per_s",
                                                                  "peak_above_models_mb")}
        result["response_tokens"], result["rows"] = rs[0]["response_tokens"], rs[0]["rows"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
