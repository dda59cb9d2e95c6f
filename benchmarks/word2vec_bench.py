"""word2vec benchmark: training throughput, wall time, peak memory and vector quality on a text file.

Usage::

    python benchmarks/word2vec_bench.py CORPUS.txt --eval-dir DIR [--variant sg-ns] [--epochs 5] [--threads 2]
        [--streams 0] [--chunk-words 10000] [--seed 1] [--device cpu]
        [--gensim-python /path/to/venv/bin/python] [--json out.json]

Each non-empty line is one sentence, tokenized by :mod:`lmpipe.wordtok` (lower-cased). Defaults follow
the reference setting: window 5, 5 negatives, dimension 100, min count 5, sample 1e-3, 5 epochs.
Words/s counts the in-vocabulary training words (before subsampling) times epochs over the training
wall time (tokenizing not included, printed apart); words per CPU-second (all threads) is printed
beside it because on a shared machine it varies much less than wall time. Quality: analogy accuracy on
``questions-words.txt`` among the 30,000 most frequent words (3CosAdd, case-insensitive), Spearman's ρ on
``wordsim353.tsv`` and ``simlex999.txt`` (when present in ``--eval-dir``, e.g. gensim's ``test/test_data`` folder).

With ``--gensim-python`` the same tokens are written to a temporary file and gensim (installed in that
interpreter, not in this project) trains on it with the same settings and worker count; its vectors are
scored by the same evaluation code, so the two rows differ only in the trainer. Both runs happen back to
back, so a shared machine's load affects them alike; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GENSIM_SCRIPT = """
import json, sys, time, resource
from gensim.models import Word2Vec
a = json.loads(sys.argv[1])
t0, c0 = time.perf_counter(), time.process_time()
m = Word2Vec(corpus_file=a["corpus"], sg=int(a["sg"]), hs=int(a["hs"]), negative=0 if a["hs"] else a["negative"],
             vector_size=a["dim"], window=a["window"], min_count=a["min_count"], sample=a["sample"],
             epochs=a["epochs"], workers=a["threads"], cbow_mean=1, seed=a["seed"])
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
m.wv.save_word2vec_format(a["out"], binary=True)
print(json.dumps({"seconds": wall, "cpu_seconds": cpu, "words": m.corpus_total_words, "vocab": len(m.wv),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", type=Path, help="UTF-8 text, one sentence per line")
    p.add_argument("--eval-dir", type=Path, help="folder with questions-words.txt, wordsim353.tsv, simlex999.txt")
    p.add_argument("--variant", choices=("sg-ns", "sg-hs", "cbow-ns", "cbow-hs"), default="sg-ns")
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--negative", type=int, default=5)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--sample", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1, help="random seed of both trainers (quality varies with it)")
    p.add_argument("--streams", type=int, default=0, help="CPU: corpus parts trained side by side (0: one per thread)")
    p.add_argument("--chunk-words", type=int, default=10_000,
                   help="CPU: words per Hogwild work item (171 with --streams 16384: the triton engine's order)")
    p.add_argument("--device", default="cpu", help="cpu (numba kernels) or a torch device such as cuda")
    p.add_argument("--batch-pairs", type=int, default=1 << 20, help="examples per step on the torch engine")
    p.add_argument("--max-lines", type=int, default=0, help="read only the first N lines (0: all)")
    p.add_argument("--gensim-python", help="an interpreter with gensim installed: also train gensim for reference")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return p.parse_args()


def read_sentences(path: Path, max_lines: int):
    from lmpipe import wordtok

    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if max_lines and i >= max_lines:
                break
            if line.strip():
                yield wordtok.tokenize(line, lowercase=True)


def evaluate(wv, eval_dir: Path | None) -> dict[str, float]:
    from lmpipe import vectors

    out: dict[str, float] = {}
    if eval_dir is None:
        return out
    if (eval_dir / "questions-words.txt").exists():
        res = vectors.analogy_accuracy(wv, eval_dir / "questions-words.txt", restrict=30000)
        out |= {"analogy_accuracy": res["accuracy"], "analogy_oov_share": res["oov_share"]}
    for name in ("wordsim353.tsv", "simlex999.txt"):
        if (eval_dir / name).exists():
            res = vectors.similarity_spearman(wv, eval_dir / name)
            stem = name.split(".")[0]
            out |= {f"{stem}_spearman": res["spearman"], f"{stem}_oov_share": res["oov_share"]}
    return out


def run_gensim(python: str, corpus_words: list[str], ids, starts, args: argparse.Namespace, tmp: Path) -> dict:
    """Train gensim on the same in-vocabulary tokens (one sentence per line) and score its vectors."""
    from lmpipe import vectors

    corpus = tmp / "tokens.txt"
    with open(corpus, "w", encoding="utf-8") as fh:
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            fh.write(" ".join(corpus_words[i] for i in ids[a:b]) + "\n")
    params = {"corpus": str(corpus), "out": str(tmp / "gensim.bin"), "sg": args.variant.startswith("sg"),
              "hs": args.variant.endswith("hs"), "negative": args.negative, "dim": args.dim, "window": args.window,
              "min_count": 1, "sample": args.sample, "epochs": args.epochs, "threads": args.threads,
              "seed": args.seed}
    # min_count 1: the file holds only words that already passed min_count here, so both see one vocabulary
    res = subprocess.run([python, "-c", GENSIM_SCRIPT, json.dumps(params)], capture_output=True, text=True, check=True)
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    stats["words_per_s"] = stats["words"] * args.epochs / stats["seconds"]
    stats["words_per_cpu_s"] = stats["words"] * args.epochs / stats["cpu_seconds"]
    return stats | evaluate(vectors.load_binary(tmp / "gensim.bin"), args.eval_dir)


def main() -> None:
    args = parse_args()
    from lmpipe import word2vec
    from lmpipe.vectors import WordVectors

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    (words, counts), (ids, starts) = word2vec.prepare(read_sentences(args.file, args.max_lines), args.min_count)
    prep_s = time.perf_counter() - t0
    n_words = int(starts[-1])
    print(f"tokenized {n_words:,} in-vocabulary words, {len(words):,} types in {prep_s:.1f}s", flush=True)
    s = word2vec.Word2VecSettings(sg=args.variant.startswith("sg"), hs=args.variant.endswith("hs"), dim=args.dim,
                                  window=args.window, negative=args.negative, sample=args.sample,
                                  min_count=args.min_count, epochs=args.epochs, threads=args.threads,
                                  streams=args.streams, chunk_words=args.chunk_words, seed=args.seed,
                                  device=args.device, batch_pairs=args.batch_pairs, report_words=2_000_000)

    def progress(r: dict[str, float]) -> None:
        print(f"epoch {int(r['epoch']) + 1}/{s.epochs} | {100 * r['progress']:5.1f}% | loss {r['loss']:.4f} | "
              f"alpha {r['alpha']:.5f} | {r['words_per_s']:,.0f} words/s", flush=True)

    # compile the kernels on a tiny corpus first, so that the timing below is training only
    word2vec.train([["a", "b", "c"]] * 50, word2vec.Word2VecSettings(**{**s.__dict__, "min_count": 1, "epochs": 1}))
    t0, c0 = time.perf_counter(), time.process_time()
    model = word2vec.train(settings=s, vocab=(words, counts), corpus=(ids, starts), progress=progress)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ours = {"seconds": wall, "cpu_seconds": cpu, "words": n_words, "vocab": len(words),
            "words_per_s": n_words * s.epochs / wall, "words_per_cpu_s": n_words * s.epochs / cpu,
            "epoch_loss": [h["loss"] for h in model.history],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    ours |= evaluate(WordVectors(model.words, model.syn0), args.eval_dir)
    result = {"corpus": str(args.file), "variant": args.variant, "threads": args.threads, "device": args.device,
              "epochs": args.epochs, "tokenize_seconds": prep_s, "cpus": os.cpu_count(), "load_before": load0,
              "lmpipe": ours}
    print(json.dumps({"lmpipe": ours}, indent=2), flush=True)
    if args.gensim_python:
        with tempfile.TemporaryDirectory() as tmp:
            result["gensim"] = run_gensim(args.gensim_python, words, ids, starts, args, Path(tmp))
        print(json.dumps({"gensim": result["gensim"]}, indent=2), flush=True)
    result["load_after"] = os.getloadavg()
    print(f"load average before {load0[0]:.2f}, after {result['load_after'][0]:.2f} on {os.cpu_count()} cpus")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
