"""PPO throughput: rollout generation and update tokens/s.

    python benchmarks/ppo_rollout_bench.py cpu [THREADS]  # the tiny preset's shapes on CPU (random weights)
    python benchmarks/ppo_rollout_bench.py cuda  # a GPT-2-small-shaped policy on a CUDA GPU, bf16

``cpu``: the tiny preset's PPO shapes (policy 4 x 256, vocabulary 4096; the value function where the preset
puts it; its rollout batch and new tokens; 24-token prompts), random weights: rollout tokens/s (KV-cache
sampling, every row runs to the token limit), then update tokens/s (forward and backward of the PPO loss
over the rollout batch, the trainer's AdamW steps).

``cuda``: GPT-2 small (12 x 768, vocabulary 50304), bf16 weights, 64-token prompts, 128 new tokens, top-k 50
sampling, batch 64 and 256: the eager KV-cache generator (:meth:`lmpipe.gpt.GPT.generate`) against the static
cache with a CUDA-graphed decode step (:mod:`lmpipe.decode`), after checking that both give the same
next-token logits within bf16 tolerance. Exits with an error when CUDA is missing. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmpipe import decode, ppo, rl
from lmpipe.bpe import PAD_ID
from lmpipe.config import PpoConfig, load_config
from lmpipe.gpt import GPT, GPTConfig
from lmpipe.pretrain import model_config
from lmpipe.trainer import Trainer, TrainSettings

# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.004); a dozen layers of rounding in a different
# order stay within a few steps of it
BF16_TOLERANCE = 2e-2


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, length), generator=g).tolist()


def timed(fn, device: torch.device) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def cpu_bench(threads: int = 2) -> dict[str, float]:
    """Rollout and update tokens/s of the tiny preset's PPO shapes on CPU."""
    torch.set_num_threads(threads)
    preset = load_config("tiny")
    cfg: PpoConfig = preset.ppo
    shape = model_config(preset.pretrain, preset.tokenizer.vocab_size)
    torch.manual_seed(0)
    value = ppo.ValueModel(GPT(shape)) if cfg.value_model == "reward" else None
    ac, ref = ppo.ActorCritic(GPT(shape), value), GPT(shape).eval().requires_grad_(False)
    device = torch.device("cpu")
    settings = TrainSettings.from_section(cfg, max_steps=100, device="cpu")
    trainer = Trainer(ac, settings, Path(tempfile.gettempdir()) / "ppo-bench", progress=False)
    rows = prompts(cfg.batch_size, 24, shape.vocab_size)
    gen = torch.Generator().manual_seed(0)
    ac.eval()
    batch, t_gen = timed(lambda: ppo.sample(ac, rows, cfg, gen), device)
    ppo.annotate(ac, ref, batch, cfg.temperature, cfg.loss_chunk)
    adv = torch.randn_like(batch.data["logp"]) * batch.mask
    batch.data.update(advantages=rl.masked_whiten(adv, batch.mask), returns=torch.randn_like(adv) * batch.mask)
    loss_fn = ppo.ppo_loss(cfg, ppo.UpdateStats())
    micro = ppo.minibatches(cfg.batch_size, cfg.mini_batch_size, cfg.micro_batch_size, torch.Generator())
    _, t_upd = timed(lambda: [trainer.train_step([batch.rows(ix) for ix in mb], loss_fn) for mb in micro], device)
    return {"device": "cpu", "threads": threads, "batch": cfg.batch_size, "new_tokens": int(batch.mask.sum()),
            "rollout_tokens_per_s": float(batch.mask.sum()) / t_gen,
            "update_tokens_per_s": batch.idx.numel() / t_upd, "sequence_length": batch.idx.size(1)}


@torch.no_grad()
def max_logit_error(model: GPT, rows: list[list[int]], steps: int = 8) -> float:
    """Largest |static - eager| next-token logit over a few greedy steps, relative to the logits' scale."""
    full = torch.tensor(rows, device=model.wte.weight.device)
    dec = decode.StaticDecoder(model, len(rows), full.size(1) + steps, cuda_graph=True)
    logits = dec.prefill(full, torch.ones_like(full, dtype=torch.bool))
    worst = 0.0
    for _ in range(steps):
        eager = model(full)[0][:, -1].float()
        worst = max(worst, float((logits - eager).abs().max() / eager.abs().max()))
        nxt = eager.argmax(-1)
        full = torch.cat([full, nxt[:, None]], 1)
        logits = dec.step(nxt, torch.full_like(nxt, full.size(1) - 1), full.size(1) - 1).clone()
    return worst


def cuda_bench(batches: tuple[int, ...] = (64, 256), prompt_len: int = 64, new_tokens: int = 128) -> dict:
    """Eager vs static-cache + CUDA graph sampling for a GPT-2-small-shaped policy in bf16."""
    if not torch.cuda.is_available():
        sys.exit("ppo_rollout_bench cuda: no CUDA device; run `ppo_rollout_bench.py cpu` on this machine")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    model = model.to("cuda", torch.bfloat16).eval()
    device = torch.device("cuda")
    error = max_logit_error(model, prompts(8, prompt_len, 50257))
    if error > BF16_TOLERANCE:
        sys.exit(f"static-cache logits differ from the eager path by {error:.3g} (relative), above {BF16_TOLERANCE}")
    out: dict = {"device": torch.cuda.get_device_name(), "prompt_len": prompt_len, "new_tokens": new_tokens,
                 "relative_logit_error": error}
    for B in batches:
        rows = prompts(B, prompt_len, 50257, seed=B)
        dec = decode.StaticDecoder(model, B, prompt_len + new_tokens, cuda_graph=True)
        runs = {"eager": lambda rows=rows: model.generate(rows, new_tokens, 1.0, 50, eot_id=None, pad_id=PAD_ID),
                "static_graph": lambda rows=rows, dec=dec: decode.generate(model, rows, new_tokens, 1.0, 50,
                                                                           eot_id=None, pad_id=PAD_ID, decoder=dec)}
        for name, fn in runs.items():
            fn()  # warm-up (and graph capture)
            gen, seconds = timed(fn, device)
            out[f"b{B}_{name}_tokens_per_s"] = float(gen.lengths.sum()) / seconds
        out[f"b{B}_speedup"] = out[f"b{B}_static_graph_tokens_per_s"] / out[f"b{B}_eager_tokens_per_s"]
    return out


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    print(json.dumps(cuda_bench() if which == "cuda" else cpu_bench(threads), indent=2))
