"""Benchmark: full estimation of an interpolated modified Kneser-Ney model from a text file.

Measures, at two corpus sizes (a prefix of the file and the whole file), each in a fresh process so
that peak memory is per size, what KenLM's ``lmplz`` does: tokenize + vocabulary, counting with
continuation counts, discounts, probabilities and back-off weights, and the ARPA file, all under
DuckDB's memory limit (``--engine``: Kneser-Ney by sorted arrays where they fit the limit, else in SQL,
which spills). Then, like KenLM's ``query``, it loads the model into memory
(lookup tables) and scores held-out text. The reference point is ``lmplz`` on the same machine (about
590,000 tokens/s and 2.5 GB peak for a 5-gram on 18M tokens).

With ``--lmplz PATH`` (a KenLM build), each size is also estimated by ``lmplz`` itself, on the same
machine and in the same hour, from the same tokens (this tokenizer's output joined by spaces, so both
count the same n-grams), once per ``-S`` memory setting in ``--lmplz-memory``: machines differ, and only a
side-by-side run says whether the target (at least lmplz's tokens/s) is met.

    python benchmarks/ngram_bench.py ~/.cache/lmpipe-corpora/corpus_en_large.train.txt --order 5
    python benchmarks/ngram_bench.py CORPUS --lmplz ~/kenlm/build/bin/lmplz --lmplz-memory 80%,2G
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

import duckdb


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _prefix_file(src: Path, n_bytes: int, dst: Path) -> Path:
    """The first ``n_bytes`` of ``src``, cut at a line end."""
    with open(src, "rb") as fh:
        data = fh.read(n_bytes)
    dst.write_bytes(data[: data.rfind(b"\n") + 1] if len(data) == n_bytes else data)
    return dst


def write_tokens(corpus: Path, dst: Path) -> None:
    """``corpus`` tokenized as the n-gram stage does, one line per document, tokens joined by spaces."""
    from lmpipe import ngram_count

    con = duckdb.connect()
    tok = ngram_count.load_texts(con, "t", _source_sql(corpus), lowercase=False)
    con.execute(f"COPY (SELECT array_to_string(toks, ' ') FROM {tok}) TO '{dst}' "
                "(FORMAT csv, HEADER false, QUOTE '', ESCAPE '', DELIMITER '\x01')")
    con.close()


def run_lmplz(lmplz: Path, tokens: Path, order: int, memory: str, workdir: Path) -> dict:
    """KenLM's estimator on the same tokens: wall time, CPU time and the peak RSS of its process."""
    arpa = workdir / "lmplz.arpa"
    cmd = [str(lmplz), "-o", str(order), "-S", memory, "-T", str(workdir), "--skip_symbols",
           "--text", str(tokens), "--arpa", str(arpa)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    arpa.unlink()
    return {"memory": memory, "total_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def _source_sql(corpus: Path) -> str:
    return (f"SELECT column0 AS text FROM read_csv('{corpus}', header = false, delim = chr(1), quote = '', "
            "escape = '', columns = {'column0': 'VARCHAR'})")


def run_one(corpus: Path, order: int, memory_limit: str, heldout: Path, workdir: Path, engine: str) -> dict:
    """One measurement in this process (call it in a fresh one for a meaningful peak RSS)."""
    from lmpipe import ngram, ngram_count

    heldout_texts = heldout.read_text(encoding="utf-8").splitlines()
    con = duckdb.connect(str(workdir / "bench.duckdb"))
    con.execute(f"SET memory_limit = '{memory_limit}'; SET temp_directory = '{workdir / 'spill'}'; "
                "SET preserve_insertion_order = false")
    out: dict[str, float] = {"bytes": corpus.stat().st_size}
    t0, c0 = time.perf_counter(), time.process_time()
    tok = ngram_count.load_texts(con, "b", _source_sql(corpus), lowercase=False)
    vocab = ngram_count.build_vocabulary(con, "b", tok, min_count=1)
    ngram_count.encode_sentences(con, "b", tok)
    out["tokenize_s"] = time.perf_counter() - t0
    out["tokens"] = con.sql("SELECT sum(len(ids) - 1) FROM b_sents").fetchall()[0][0]
    t1 = time.perf_counter()
    ngrams = ngram_count.count_ngrams(con, "b", order, ngram_count.key_bits(len(vocab)))
    counts = ngram.Counts(con, "b", vocab, order, ngrams)
    con.execute(f"DROP TABLE b_sents; DROP TABLE {tok}")  # as the stage does once counted: only the counts stay
    out["count_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    arpa = workdir / "model.arpa"
    out["engine"] = "sorted" if ngram._sorted_engine(counts, order, "kn", engine) else "sql"
    ngram.estimate_arpa(counts, order, "kn", arpa, engine=engine)  # discounts, probabilities, back-off weights, ARPA
    out["estimate_arpa_s"] = time.perf_counter() - t2
    out["total_s"] = time.perf_counter() - t0
    out["cpu_s"] = time.process_time() - c0
    out["tokens_per_s"] = out["tokens"] / out["total_s"]
    out["peak_rss_mb"] = _peak_rss_mb()
    out["arpa_mb"] = arpa.stat().st_size / 1e6
    out["vocab"] = len(vocab)
    out.update({f"ngrams_{k}": n for k, n in counts.ngrams.items()})
    t3 = time.perf_counter()
    # the in-memory lookup tables used for scoring
    model = ngram.estimate(counts, order, "kn", keep_ngrams=False, engine=engine)
    out["load_model_s"] = time.perf_counter() - t3
    ids = [model.encode(ngram.wordtok.tokenize(t)) for t in heldout_texts]
    t4 = time.perf_counter()
    lp = model.token_log10(ids)
    out["score_tokens_per_s"] = len(lp) / (time.perf_counter() - t4)
    out["heldout_perplexity_unk"] = float(10 ** (-lp.sum() / len(lp)))
    out["peak_rss_with_model_mb"] = _peak_rss_mb()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, help="UTF-8 text, one document (sentence) per line")
    parser.add_argument("--order", type=int, default=5)
    parser.add_argument("--fractions", default="0.25,1.0", help="corpus sizes as fractions of the file")
    parser.add_argument("--memory-limit", default="1500MB", help="DuckDB memory limit (it spills beyond it)")
    parser.add_argument("--engine", default="auto", choices=["auto", "sql", "sorted"],
                        help="Kneser-Ney engine (auto: sorted where its arrays fit the memory limit)")
    parser.add_argument("--heldout", type=Path, help="text scored for throughput (default: the corpus's .valid.txt "
                        "sibling, else its last 5,000 lines)")
    parser.add_argument("--lmplz", type=Path, help="KenLM's lmplz binary: also run it on the same tokens")
    parser.add_argument("--lmplz-memory", default="80%", help="lmplz -S settings, comma-separated (80%% is its "
                        "default)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: measure in this process
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_one(args.corpus, args.order, args.memory_limit, args.heldout, Path(tmp),
                                     args.engine)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        heldout = args.heldout or args.corpus.with_name(args.corpus.name.replace(".train.txt", ".valid.txt"))
        if not heldout.exists() or heldout == args.corpus:
            heldout = Path(tmp) / "heldout.txt"
            heldout.write_text("\n".join(args.corpus.read_text(encoding="utf-8").splitlines()[-5000:]) + "\n",
                               encoding="utf-8")
        for fraction in (float(f) for f in args.fractions.split(",")):
            part = _prefix_file(args.corpus, int(args.corpus.stat().st_size * fraction), Path(tmp) / "part.txt")
            cmd = [sys.executable, __file__, str(part), "--one", "--order", str(args.order),
                   "--memory-limit", args.memory_limit, "--heldout", str(heldout), "--engine", args.engine]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
            row = {"fraction": fraction, **json.loads(proc.stdout.strip().splitlines()[-1])}
            results.append(row)
            print(f"{fraction:>5.2f} of file | {row['engine']:>6} | {row['bytes'] / 1e6:7.1f} MB | "
                  f"{row['tokens'] / 1e6:6.2f} M tokens | "
                  f"text to ARPA {row['total_s']:6.1f} s ({row['tokenize_s']:.1f} tokenize, {row['count_s']:.1f} "
                  f"count, {row['estimate_arpa_s']:.1f} KN + ARPA) | {row['tokens_per_s'] / 1e3:6.0f} k tok/s | "
                  f"peak {row['peak_rss_mb']:6.0f} MB | load {row['load_model_s']:.1f} s, score "
                  f"{row['score_tokens_per_s'] / 1e3:6.0f} k tok/s, peak {row['peak_rss_with_model_mb']:6.0f} MB",
                  flush=True)
            if args.lmplz:
                tokens = Path(tmp) / "tokens.txt"
                write_tokens(part, tokens)
                row["lmplz"] = [run_lmplz(args.lmplz, tokens, args.order, memory, Path(tmp))
                                for memory in args.lmplz_memory.split(",")]
                tokens.unlink()
                for ref in row["lmplz"]:
                    print(f"      lmplz -S {ref['memory']:>5} | {ref['total_s']:6.1f} s | "
                          f"{row['tokens'] / ref['total_s'] / 1e3:6.0f} k tok/s | CPU {ref['cpu_s']:5.1f} s "
                          f"(lmpipe {row['cpu_s']:5.1f} s) | peak {ref['peak_rss_mb']:6.0f} MB", flush=True)
    print(json.dumps({"order": args.order, "load_1min": os.getloadavg()[0], "results": results}, indent=2))


if __name__ == "__main__":
    main()
