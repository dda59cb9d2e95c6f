"""Ingestion throughput: MB/s into a fresh warehouse, with exact dedup only and with MinHash near dedup.

    .venv/bin/python benchmarks/ingest_bench.py ~/.cache/lmpipe-corpora/corpus_en_large.txt [--near-dedup]

Prints one line per run: input MB, seconds, MB/s, documents read/kept, drops by reason, peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from lmpipe.config import IngestConfig
from lmpipe.corpus import ingest
from lmpipe.workspace import Workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--near-dedup", action="store_true", help="also run MinHash LSH near-duplicate removal")
    ap.add_argument("--threshold", type=float, default=0.8)
    args = ap.parse_args()
    mb = sum(p.stat().st_size for p in args.paths) / 1e6
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        ws = Workspace.resolve(tmp)
        cfg = IngestConfig(sources=tuple(str(p) for p in args.paths), near_dedup=args.near_dedup,
                           near_dedup_threshold=args.threshold)
        t0 = time.perf_counter()
        report = ingest(ws, cfg, progress=False)
        dt = time.perf_counter() - t0
    totals = report.totals()
    drops = {k.removeprefix("dropped_"): int(v) for k, v in totals.items() if k.startswith("dropped_")}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mode = "exact+minhash" if args.near_dedup else "exact"
    print(f"{mode}: {mb:.1f} MB in {dt:.1f} s = {mb / dt:.1f} MB/s | read {int(totals['documents_read'])} "
          f"kept {int(totals['documents_added'])} | drops {drops} | peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
