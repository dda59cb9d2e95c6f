"""Tokenizer benchmark: BPE training time and encoding throughput on a text file.

Usage::

    python benchmarks/tokenizer_bench.py CORPUS.txt [--vocab-size 32768] [--pattern gpt4] [--threads N]

Each non-empty line of the file is one document, as ``unit: line`` ingestion makes them. The tokenizer
is trained on the whole file (or its first ``--max-train-mb``), then the file is encoded the way the
shard writer encodes a split (batches of documents, all cores, ids flattened into a numpy array with
an end-of-text id after each document). Throughput counts the documents' UTF-8 bytes; CPU seconds
(all threads) are printed beside wall seconds because on a shared machine they vary less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", type=Path, help="UTF-8 text file, one document per line")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--pattern", choices=("gpt4", "gpt2"), default="gpt4")
    p.add_argument("--max-train-mb", type=float, default=0.0, help="train on the first N MB only (0: all)")
    p.add_argument("--batch-documents", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="encoder threads (0: all cores)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return p.parse_args()


def batches(docs: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(docs), size):
        yield docs[i : i + size]


def main() -> None:
    args = parse_args()
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # read when tokenizers first starts its pool
    import numpy as np

    from lmpipe.bpe import train_tokenizer
    from lmpipe.config import TokenizerConfig
    from lmpipe.shards import document_encoder, encode_documents, token_dtype

    docs = [line for line in args.file.read_text(encoding="utf-8").splitlines() if line.strip()]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    cfg = TokenizerConfig(vocab_size=args.vocab_size, split_pattern=args.pattern,
                          max_train_bytes=int(args.max_train_mb * 1e6), batch_documents=args.batch_documents)
    train_docs = docs
    if cfg.max_train_bytes:
        cum = np.cumsum([len(d.encode("utf-8")) for d in docs])
        train_docs = docs[: int(np.searchsorted(cum, cfg.max_train_bytes)) + 1]
    train_bytes = sum(len(d.encode("utf-8")) for d in train_docs)

    t0, c0 = time.perf_counter(), time.process_time()
    tok = train_tokenizer(batches(train_docs, cfg.batch_documents), cfg)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0

    enc = document_encoder(tok)
    dtype = token_dtype(tok.get_vocab_size())
    t0, c0 = time.perf_counter(), time.process_time()
    n_tokens = sum(len(encode_documents(enc, b, dtype)) for b in batches(docs, cfg.batch_documents))
    encode_s, encode_cpu = time.perf_counter() - t0, time.process_time() - c0

    results = {
        "file": str(args.file), "mb": n_bytes / 1e6, "documents": len(docs), "vocab_size": tok.get_vocab_size(),
        "pattern": cfg.split_pattern, "threads": args.threads or os.cpu_count(), "train_mb": train_bytes / 1e6,
        "train_s": train_s, "train_cpu_s": train_cpu, "train_mb_per_s": train_bytes / 1e6 / train_s,
        "encode_s": encode_s, "encode_cpu_s": encode_cpu, "encode_mb_per_s": n_bytes / 1e6 / encode_s,
        "encode_mb_per_cpu_s": n_bytes / 1e6 / encode_cpu, "tokens": n_tokens,
        "tokens_per_s": n_tokens / encode_s, "bytes_per_token": n_bytes / (n_tokens - len(docs)),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average_1m": os.getloadavg()[0],
    }
    print(f"{args.file.name}: {results['mb']:.1f} MB, {len(docs):,} documents, vocabulary {results['vocab_size']}")
    print(f"train  {train_s:8.1f} s ({train_cpu:6.1f} CPU s)  {results['train_mb_per_s']:6.2f} MB/s"
          f"  ({results['train_mb']:.1f} MB)")
    print(f"encode {encode_s:8.1f} s ({encode_cpu:6.1f} CPU s)  {results['encode_mb_per_s']:6.2f} MB/s"
          f"  {results['encode_mb_per_cpu_s']:.2f} MB per CPU s  {results['tokens_per_s'] / 1e6:.2f} M tokens/s"
          f"  {results['bytes_per_token']:.2f} bytes/token")
    print(f"1-minute load average at the end: {results['load_average_1m']:.1f} on {os.cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
