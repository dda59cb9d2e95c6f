"""The ``embeddings`` stage: the neural word-level generation on the n-gram stage's tokens.

It trains what ``embeddings.models`` names, with the n-gram stage's tokenizer settings and vocabulary:

- the NNLM (:mod:`lmpipe.nnlm`) and the recurrent LM (:mod:`lmpipe.rnnlm`), scored on val and test
  exactly as the n-gram models are and added to their comparison table; the NNLM's matrix C is
  exported as word vectors;
- each word2vec variant (:mod:`lmpipe.word2vec`), with its loss logged during training, the nearest
  neighbours of the probe words logged each epoch, the analogy and similarity files evaluated when
  the config names them, and the vectors exported (:mod:`lmpipe.vectors`).

``lmpipe score FILE --stage embeddings`` scores text with the NNLM (``--method rnnlm``: the recurrent LM).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmpipe import nnlm, rnnlm, vectors, warehouse, word2vec, wordtok
from lmpipe.config import EmbeddingsConfig
from lmpipe.scoring import TextScore
from lmpipe.stage import Logger, StageContext, StageOutput, StageResult
from lmpipe.trainer import resolve_device
from lmpipe.vectors import WordVectors
from lmpipe.wordtok import Vocabulary
from lmpipe.workspace import Workspace

LM_FILES = ("vocab.tsv", "spelling.safetensors", "spelling_vocab.tsv")  # taken from the n-gram stage


def _split_texts(split: str, ws: Workspace) -> list[str]:
    with warehouse.connect(ws) as con:
        rows = con.execute("SELECT text FROM documents WHERE split = ? ORDER BY doc_id", [split]).fetchall()
    return [r[0] for r in rows]


def _load_lm_inputs(folder: Path) -> tuple[Vocabulary, Any, bool]:
    """(vocabulary, spelling model, lowercase) of an n-gram stage model folder or of this stage's copy."""
    from lmpipe.ngram import load_model

    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    spelling = load_model(folder / "spelling.safetensors", Vocabulary.load(folder / "spelling_vocab.tsv"))
    return Vocabulary.load(folder / "vocab.tsv"), spelling, bool(index["lowercase"])


def _limit(docs: list[np.ndarray], max_tokens: int) -> list[np.ndarray]:
    """The first documents up to ``max_tokens`` tokens (0: all)."""
    if not max_tokens:
        return docs
    ends = np.cumsum([len(d) for d in docs])
    return docs[: max(1, int(np.searchsorted(ends, max_tokens, side="right")))]


def _score_row(name: str, order: int | str, fit_s: float, val: TextScore, test: TextScore) -> dict[str, float | str]:
    """A row of the same comparison table the n-gram stage writes."""
    return {"method": name, "order": order, "val_perplexity": val.perplexity, "val_perplexity_unk": val.perplexity_unk,
            "val_bits_per_byte": val.bits_per_byte, "val_zero_prob": 0, "test_perplexity": test.perplexity,
            "test_perplexity_unk": test.perplexity_unk, "test_bits_per_byte": test.bits_per_byte,
            "test_zero_prob": 0, "fit_seconds": fit_s}


def _samples(name: str, gen: Any, model: Any, vocab: Vocabulary, cfg: EmbeddingsConfig, lowercase: bool) -> str:
    lines = [f"## {name}", ""]
    for prompt in cfg.prompts:
        words = gen(model, vocab, prompt, cfg.sample_tokens, temperature=1.0, top_k=50, seed=cfg.seed,
                    lowercase=lowercase)
        lines.append(f"- **{prompt}** {' '.join(words)}")
    return "\n".join(lines + [""])


def _epoch_logger(log: Logger, prefix: str):
    def record(values: dict[str, float], step: int) -> None:
        log.metrics({k.replace(k.split(".")[0], prefix, 1): v for k, v in values.items()}, step=step)

    return record


def _train_lms(cfg: EmbeddingsConfig, texts: dict[str, list[str]], lm_dir: Path, ctx: StageContext
               ) -> tuple[list[dict], list[str], dict[str, float]]:
    """Train and score the NNLM and the recurrent LM; returns comparison rows, samples and metrics."""
    vocab, spelling, lowercase = _load_lm_inputs(lm_dir)
    dev = resolve_device(cfg.device)
    docs = {s: nnlm.encode_documents(texts[s], vocab, lowercase) for s in ("train", "val")}
    train_docs = _limit(docs["train"], cfg.lm_max_tokens)
    common = dict(epochs=cfg.lm_epochs, patience=cfg.lm_patience, lr=cfg.lm_lr, seed=cfg.seed, device=dev)
    rows, samples, metrics = [], [], {}
    for kind in ("nnlm", "rnnlm"):
        if kind not in cfg.models:
            continue
        t0 = time.perf_counter()
        if kind == "nnlm":
            s = nnlm.NNLMSettings(len(vocab), cfg.nnlm_order, cfg.nnlm_embd, cfg.nnlm_hidden, cfg.nnlm_direct,
                                  cfg.lm_dropout)
            model, history = nnlm.train_nnlm(train_docs, docs["val"], s, batch_size=cfg.lm_batch_size,
                                             log=_epoch_logger(ctx.log, kind), **common)
            log2p, gen, order = (lambda d, m=model: nnlm.nnlm_log2probs(m, d)), nnlm.generate, cfg.nnlm_order
        else:
            s = rnnlm.RNNLMSettings(len(vocab), cfg.rnn_cell, cfg.rnn_embd, cfg.rnn_hidden, cfg.rnn_layers,
                                    cfg.lm_dropout)
            model, history = rnnlm.train_rnnlm(train_docs, docs["val"], s, bptt=cfg.bptt, batch_size=cfg.rnn_streams,
                                               log=_epoch_logger(ctx.log, kind), **common)
            log2p, gen, order = (lambda d, m=model: rnnlm.rnnlm_log2probs(m, d)), rnnlm.generate, cfg.rnn_cell
        fit_s = time.perf_counter() - t0
        nnlm.save(model, s, lm_dir, kind)
        scores = {sp: nnlm.score_texts(log2p, vocab, texts[sp], spelling, lowercase, kind) for sp in ("val", "test")}
        rows.append(_score_row(kind, order, fit_s, scores["val"], scores["test"]))
        samples.append(_samples(kind, gen, model, vocab, cfg, lowercase))
        metrics |= {f"{kind}_{sp}_{k}": float(getattr(scores[sp], k)) for sp in ("val", "test")
                    for k in ("perplexity", "perplexity_unk", "bits_per_byte")}
        metrics |= {f"{kind}_epochs": float(len(history)), f"{kind}_fit_seconds": fit_s,
                    f"{kind}_tokens_trained": float(sum(len(d) for d in train_docs) * len(history)),
                    f"{kind}_params": float(sum(p.numel() for p in model.parameters()))}
        if kind == "nnlm":  # C is word vectors too
            c = WordVectors(vocab.words, model.C.weight.detach().cpu().numpy())
            vectors.save_text(c, lm_dir.parent / "nnlm_vectors.txt")
    return rows, samples, metrics


# ----------------------------------------------------------------------------------------------
# word2vec


def _w2v_settings(cfg: EmbeddingsConfig, variant: str) -> word2vec.Word2VecSettings:
    dev = cfg.w2v_device if cfg.w2v_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return word2vec.Word2VecSettings(
        sg=variant.startswith("sg"), hs=variant.endswith("hs"), dim=cfg.w2v_dim, window=cfg.w2v_window,
        negative=cfg.w2v_negative, cbow_mean=cfg.w2v_cbow_mean, sample=cfg.w2v_sample, min_count=cfg.w2v_min_count,
        epochs=cfg.w2v_epochs, alpha=cfg.w2v_alpha, seed=cfg.seed + 1, threads=cfg.w2v_threads or (os.cpu_count() or 1),
        streams=cfg.w2v_streams, device=dev, engine=cfg.w2v_gpu_engine if dev == "cuda" else "auto",
        batch_pairs=cfg.w2v_batch_pairs, gpu_row_cap=cfg.w2v_gpu_row_cap,
        report_words=200_000,
    )


def neighbours_markdown(wv: WordVectors, probes: Sequence[str], k: int, title: str) -> str:
    """The nearest neighbours of each probe word present in ``wv``, as Markdown."""
    lines = [f"# {title}", ""]
    for w in probes:
        if w in wv:
            lines.append(f"- **{w}**: " + ", ".join(f"{n} ({s:.2f})" for n, s in wv.nearest(w, k)))
    return "\n".join(lines + [""])


def evaluate(wv: WordVectors, cfg: EmbeddingsConfig) -> dict[str, float]:
    """Analogy accuracy and similarity correlations for the files the config names."""
    out: dict[str, float] = {}
    if cfg.analogy_file:
        out |= {f"analogy_{k}": v for k, v in vectors.analogy_accuracy(wv, Path(cfg.analogy_file),
                                                                       cfg.eval_top_words).items()
                if not k.startswith("section.")}
    for path in cfg.similarity_files:
        name = Path(path).stem
        out |= {f"{name}_{k}": v for k, v in vectors.similarity_spearman(wv, Path(path)).items()}
    return out


def _train_word2vec(cfg: EmbeddingsConfig, sentences: list[list[str]], out: Path, ctx: StageContext
                    ) -> tuple[dict[str, float], list[Path]]:
    """Train every configured variant; log loss, neighbours, evaluation; export the vectors."""
    metrics, files = {}, []
    for variant in cfg.w2v_variants:
        s = _w2v_settings(cfg, variant)
        folder = out / f"w2v_{variant}"
        folder.mkdir(parents=True, exist_ok=True)

        def progress(r: dict[str, float], v: str = variant, s: word2vec.Word2VecSettings = s) -> None:
            ctx.log.metrics({f"w2v_{v}.loss": r["loss"], f"w2v_{v}.alpha": r["alpha"],
                             f"w2v_{v}.words_per_s": r["words_per_s"]}, step=int(r["words_done"]))
            if ctx.progress:
                print(f"w2v {v} | epoch {int(r['epoch']) + 1}/{s.epochs} | {100 * r['progress']:5.1f}% | "
                      f"loss {r['loss']:.4f} | alpha {r['alpha']:.5f} | {r['words_per_s']:,.0f} words/s", flush=True)

        def epoch_done(epoch: int, r: dict[str, float], model: word2vec.Word2VecModel, v: str = variant) -> None:
            ctx.log.metrics({f"w2v_{v}.epoch_loss": r["loss"]}, step=epoch)
            wv = WordVectors(model.words, model.syn0)
            ctx.log.text(neighbours_markdown(wv, cfg.probe_words, cfg.neighbours, f"{v} epoch {epoch + 1}"),
                         f"w2v_{v}_neighbours_epoch{epoch + 1}.md")

        vocab, corpus = word2vec.prepare(sentences, s.min_count)
        if not vocab[0]:
            continue
        t0 = time.perf_counter()
        model = word2vec.train(settings=s, vocab=vocab, corpus=corpus, progress=progress, epoch_done=epoch_done)
        wall = time.perf_counter() - t0
        wv = WordVectors(model.words, model.syn0)
        ev = evaluate(wv, cfg)
        metrics |= {f"w2v_{variant}_{k}": v for k, v in ev.items()}
        # words/s as the engine times it, from its first training call on (setup counts in the seconds only)
        metrics |= {f"w2v_{variant}_words_per_s": model.history[-1]["words_per_s"], f"w2v_{variant}_seconds": wall,
                    f"w2v_{variant}_tokens_trained": float(corpus[1][-1] * s.epochs),
                    f"w2v_{variant}_final_loss": model.history[-1]["loss"], f"w2v_{variant}_vocab": float(len(wv))}
        files += _export(wv, folder, cfg, variant)
    return metrics, files


def _export(wv: WordVectors, folder: Path, cfg: EmbeddingsConfig, title: str) -> list[Path]:
    text = vectors.save_text(wv, folder / "vectors.txt")
    binary = vectors.save_binary(wv, folder / "vectors.bin")
    tsv, meta = vectors.save_projector(wv, folder / "projector", limit=10_000)
    plot = vectors.plot_pca(wv, folder / "pca.png", cfg.plot_words, f"word2vec {title}: PCA of frequent words")
    (folder / "neighbours.md").write_text(neighbours_markdown(wv, cfg.probe_words, cfg.neighbours, title),
                                          encoding="utf-8")
    return [text, binary, tsv, meta, plot, folder / "neighbours.md"]


# ----------------------------------------------------------------------------------------------
# the stage


def comparison_markdown(rows: list[dict[str, float | str]]) -> str:
    """The n-gram stage's comparison table with the neural models' rows added, as Markdown."""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    note = ("Same tokens, same `<unk>`/`</s>` conventions, out-of-vocabulary words charged for their spelling; "
            "bits per byte over each document's UTF-8 bytes plus one. Stupid back-off's perplexity only ranks.")
    return "\n".join(["# Word-level language models", "", note, "", *lines, ""])


def _fingerprint(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def run_stage(ctx: StageContext) -> StageOutput:
    """Train the configured NNLM, recurrent LM and word2vec variants on the n-gram stage's tokens."""
    cfg: EmbeddingsConfig = ctx.section("embeddings")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(ctx, cfg)
    finally:
        torch.set_num_threads(threads)  # the setting is process-wide: leave it as later stages expect


def _run(ctx: StageContext, cfg: EmbeddingsConfig) -> StageOutput:
    ws, out = ctx.workspace, ctx.out_dir
    ngram_models = ws.abs(ctx.inputs["ngram"].outputs["models"])
    lm_dir = out / "lm"
    lm_dir.mkdir(parents=True, exist_ok=True)
    for name in (*LM_FILES, "index.json"):  # a copy, so that scoring needs only this stage's folder
        shutil.copy2(ngram_models / name, lm_dir / name)
    index = json.loads((ngram_models / "index.json").read_text(encoding="utf-8"))
    texts = {s: _split_texts(s, ws) for s in ("train", "val", "test")}
    rows, samples, metrics = _train_lms(cfg, texts, lm_dir, ctx)
    files = [p for p in lm_dir.iterdir() if p.is_file()]
    if (out / "nnlm_vectors.txt").exists():
        files.append(out / "nnlm_vectors.txt")
    if "word2vec" in cfg.models:
        sentences = [wordtok.tokenize(t, bool(index["lowercase"])) for t in texts["train"]]
        w2v_metrics, w2v_files = _train_word2vec(cfg, sentences, out, ctx)
        metrics |= w2v_metrics
        files += w2v_files
    metrics["tokens_processed"] = sum(v for k, v in metrics.items() if k.endswith("_tokens_trained"))
    outputs = {"lm": ws.rel(lm_dir)}
    if rows:
        table = out / "comparison.md"
        table.write_text(comparison_markdown([*index["models"], *rows]), encoding="utf-8")
        ctx.log.text("\n".join(["# Samples", "", *samples]), "embeddings_samples.md")
        files.append(table)
        outputs["comparison"] = ws.rel(table)
    for path in files:
        if path.suffix in (".md", ".png", ".txt") and "projector" not in path.parts:
            ctx.log.artifact(path, subdir=path.parent.name if path.parent != out else None)
    for variant in cfg.w2v_variants:
        if (out / f"w2v_{variant}").exists():
            outputs[f"w2v_{variant}"] = ws.rel(out / f"w2v_{variant}")
    ctx.log.metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    summary = ", ".join(f"{r['method']} val ppl {float(r['val_perplexity']):.1f} "
                        f"({float(r['val_bits_per_byte']):.3f} bits/byte)" for r in rows)
    summary += "".join(f"; word2vec {v} {metrics[f'w2v_{v}_words_per_s']:,.0f} words/s" for v in cfg.w2v_variants
                       if f"w2v_{v}_words_per_s" in metrics)
    return StageOutput(_fingerprint(files), outputs, metrics, summary.strip("; "))


# ----------------------------------------------------------------------------------------------
# the scorer behind ``lmpipe score --stage embeddings``


def score_stage(ws: Workspace, result: StageResult, texts: Sequence[str], options: Mapping[str, Any]) -> TextScore:
    """Scorer registered in :mod:`lmpipe.scoring`: the NNLM, or the recurrent LM with ``method="rnnlm"``."""
    lm_dir = ws.abs(result.outputs["lm"])
    kind = options.get("method") or "nnlm"
    if kind not in ("nnlm", "rnnlm") or not (lm_dir / f"{kind}.safetensors").exists():
        raise KeyError(f"no {kind} model in this stage's result (models: nnlm, rnnlm, when configured)")
    vocab, spelling, lowercase = _load_lm_inputs(lm_dir)
    if kind == "nnlm":
        model = nnlm.load_nnlm(lm_dir)
        return nnlm.score_texts(lambda d: nnlm.nnlm_log2probs(model, d), vocab, texts, spelling, lowercase, "nnlm")
    rmodel = rnnlm.load_rnnlm(lm_dir)
    return nnlm.score_texts(lambda d: rnnlm.rnnlm_log2probs(rmodel, d), vocab, texts, spelling, lowercase, "rnnlm")
