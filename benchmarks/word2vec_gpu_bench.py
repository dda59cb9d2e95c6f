"""word2vec on a CUDA GPU: the GPU engines' throughput and quality, unattended, against the CPU engine.

Usage (on a machine with a CUDA GPU; prints JSON and writes it to ``--json``)::

    python benchmarks/word2vec_gpu_bench.py CORPUS.txt --eval-dir DIR [--epochs 5] [--engines triton torch]
        [--streams 4096 16384] [--batch-pairs 32768 ...]

It tokenizes once, then trains skip-gram with negative sampling (window 5, 5 negatives, dimension 100,
min count 5) on the GPU: with the triton engine (Hogwild kernel) once per ``--streams`` value, with the
torch engine (batched steps) for each ``--batch-pairs`` and ``--row-caps`` value, and, unless ``--no-cpu``,
with the numba kernels on all CPU cores for the same epochs, so the rows differ only in the engine. Each row reports
words/s (in-vocabulary words × epochs / training wall time, with the GPU synchronised), peak GPU
memory and the evaluation of :mod:`benchmarks.word2vec_bench`. Without a GPU it exits with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from word2vec_bench import evaluate, read_sentences  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", type=Path)
    p.add_argument("--eval-dir", type=Path)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--variant", choices=("sg-ns", "sg-hs", "cbow-ns", "cbow-hs"), default="sg-ns")
    p.add_argument("--engines", nargs="+", choices=("triton", "torch"), default=["triton", "torch"])
    p.add_argument("--streams", type=int, nargs="+", default=[2_048], help="triton: programs side by side")
    p.add_argument("--batch-pairs", type=int, nargs="+", default=[1 << 15], help="torch: examples per step")
    p.add_argument("--row-caps", type=int, nargs="+", default=[64], help="torch: gpu_row_cap values (each with "
                   "every batch)")
    p.add_argument("--max-lines", type=int, default=0)
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU-engine row")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes that tokenize the corpus")
    p.add_argument("--json", type=Path, default=Path("word2vec_gpu_bench.json"))
    return p.parse_args()


def _tokenize_lines(lines: list[str]) -> list[list[str]]:
    from lmpipe import wordtok

    return [wordtok.tokenize(line, lowercase=True) for line in lines]


def tokenized(path: Path, max_lines: int, workers: int):
    """The sentences of ``read_sentences``, tokenized in order by ``workers`` processes."""
    if workers <= 1:
        yield from read_sentences(path, max_lines)
        return
    import multiprocessing

    with open(path, encoding="utf-8") as fh:
        lines = [line for i, line in enumerate(fh) if (not max_lines or i < max_lines) and line.strip()]
    chunks = (lines[i : i + 20_000] for i in range(0, len(lines), 20_000))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for sentences in pool.imap(_tokenize_lines, chunks):
            yield from sentences


def run(settings, vocab, corpus, eval_dir: Path | None) -> dict:
    import torch

    from lmpipe import word2vec
    from lmpipe.vectors import WordVectors

    cuda = settings.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model = word2vec.train(settings=settings, vocab=vocab, corpus=corpus,
                           progress=lambda r: print(f"  {r['progress']:6.1%} loss {r['loss']:.4f} "
                                                    f"{r['words_per_s']:,.0f} words/s", flush=True))
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    n_words = int(corpus[1][-1])
    row = {"device": settings.device, "engine": settings.engine, "streams": settings.streams,
           "batch_pairs": settings.batch_pairs, "row_cap": settings.gpu_row_cap,
           "seconds": wall, "words_per_s": n_words * settings.epochs / wall,
           "epoch_loss": [h["loss"] for h in model.history]}
    if cuda:
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row | evaluate(WordVectors(model.words, model.syn0), eval_dir)


def main() -> int:
    args = parse_args()
    import dataclasses

    import torch

    from lmpipe import word2vec

    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (benchmarks/word2vec_bench.py measures the CPU engine)")
        return 1
    t0 = time.perf_counter()
    vocab, corpus = word2vec.prepare(tokenized(args.file, args.max_lines, args.workers), 5)
    print(f"tokenized {int(corpus[1][-1]):,} words, {len(vocab[0]):,} types in {time.perf_counter() - t0:.0f}s")
    base = word2vec.Word2VecSettings(sg=args.variant.startswith("sg"), hs=args.variant.endswith("hs"),
                                     epochs=args.epochs, device="cuda", report_words=5_000_000)
    rows = []
    for engine in args.engines:
        tiny = dataclasses.replace(base, engine=engine, min_count=1, epochs=1)
        word2vec.train([["a", "b", "c"]] * 50, tiny)  # warm-up: kernels compiled before the timing
        if engine == "triton":
            for streams in args.streams:
                print(f"GPU, triton engine, {streams:,} streams", flush=True)
                rows.append(run(dataclasses.replace(base, engine=engine, streams=streams), vocab, corpus,
                                args.eval_dir))
                print(json.dumps(rows[-1]), flush=True)
            continue
        for bp in args.batch_pairs:
            for cap in args.row_caps:
                print(f"GPU, torch engine, {bp:,} examples per step, row cap {cap}", flush=True)
                rows.append(run(dataclasses.replace(base, engine=engine, batch_pairs=bp, gpu_row_cap=cap), vocab,
                                corpus, args.eval_dir))
                print(json.dumps(rows[-1]), flush=True)
    if not args.no_cpu:
        threads = os.cpu_count() or 1
        print(f"CPU engine, {threads} threads", flush=True)
        word2vec.train([["a", "b", "c"]] * 50, dataclasses.replace(base, device="cpu", min_count=1, epochs=1))
        rows.append(run(dataclasses.replace(base, device="cpu", threads=threads), vocab, corpus, args.eval_dir))
        print(json.dumps(rows[-1]), flush=True)
    result = {"corpus": str(args.file), "variant": args.variant, "epochs": args.epochs,
              "gpu": torch.cuda.get_device_name(), "rows": rows}
    args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
