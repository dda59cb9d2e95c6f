"""Drawing the next token on the CPU: ``torch.multinomial`` against :func:`lmpipe.gpt.categorical`.

    python benchmarks/sampling_bench.py [THREADS]

First the draw alone, per call, at a few (rows, vocabulary) shapes. Then batched KV-cache generation with the
tiny preset's model shape (4 x 256, vocabulary 4,096, random weights) at 32 ragged prompts and 32 new tokens,
with each sampler in turn, alternating, five timed calls per round. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import torch

from lmpipe import gpt
from lmpipe.gpt import GPT, GPTConfig

SAMPLERS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "multinomial": lambda probs, generator=None: torch.multinomial(probs, 1, generator=generator).squeeze(-1),
    "categorical": gpt.categorical,
}


def per_call_ms(fn: Callable[[], object], n: int = 50) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def main(threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    out: dict = {"threads": threads, "draw_ms": {}, "generate_tokens_per_s": {k: [] for k in SAMPLERS}}
    for rows, vocab in [(32, 4096), (256, 4096), (64, 50304)]:
        probs = torch.softmax(torch.randn(rows, vocab, generator=g) * 3, -1)
        out["draw_ms"][f"{rows}x{vocab}"] = {k: round(per_call_ms(lambda f=f, p=probs: f(p, g)), 3)
                                             for k, f in SAMPLERS.items()}
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=256, dropout=0.0)).eval()
    prompts = [p[: 12 + i % 12] for i, p in enumerate(torch.randint(10, 4096, (32, 24), generator=g).tolist())]
    original = gpt.categorical
    try:
        for _ in range(2):
            for name, f in SAMPLERS.items():
                gpt.categorical = f
                model.generate(prompts, 32, temperature=1.0, eot_id=None, generator=g)  # warm-up
                for _ in range(5):
                    t0 = time.perf_counter()
                    res = model.generate(prompts, 32, temperature=1.0, eot_id=None, generator=g)
                    seconds = time.perf_counter() - t0
                    out["generate_tokens_per_s"][name].append(round(int(res.lengths.sum()) / seconds))
    finally:
        gpt.categorical = original
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2), indent=2))
