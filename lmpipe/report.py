"""The evolution report: every generation of the pipeline on one held-out yardstick.

The ``report`` stage reads the results of all eight stages and gathers, in ``report.json``:

- **bits per byte on the test split** for each generation: the n-gram model of every fitted order
  (with the smoothing of the best n-gram), the NNLM and the recurrent LM, the pretrained GPT, the
  SFT model and the PPO model, plus word perplexity for the word-level models. The n-gram,
  embeddings and pretrain stages scored the test documents themselves; the SFT and PPO checkpoints
  are scored here on the tokenizer stage's test shard with the pretraining code's own evaluation, so
  every GPT-family number has the same denominator as the word models' (UTF-8 bytes of the test
  documents, one newline each). With ``report.max_test_tokens`` every model is scored here on the
  same first test documents instead.
- **continuations** of the same prompts by every generation, side by side;
- the alignment stages' **before/after** numbers (grounded score, reward accuracy against its
  baselines, reward and KL of PPO);
- the **contamination** check of the test documents against each stage's training data;
- **run metadata**: git commit, host, and each stage's MLflow run, wall time and tokens.

``report.md`` and a self-contained ``report.html`` (:mod:`lmpipe.report_html`) render that data;
``lmpipe report`` prints it and compares the reports of two pipeline runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmpipe.config import PipelineConfig, ReportConfig, to_dict
from lmpipe.stage import StageContext, StageOutput, StageResult
from lmpipe.workspace import Workspace, atomic_write_text

SCHEMA_VERSION = 1
STAGE_ORDER = ("ingest", "ngram", "embeddings", "tokenizer", "pretrain", "sft", "reward", "ppo")
ORDER_NAMES = {1: "unigram", 2: "bigram", 3: "trigram"}
GPT_STAGES = (("pretrain", "GPT (pretrained)"), ("sft", "SFT"), ("ppo", "PPO"))
HEADLINE = ("test_bpb_ngram_best", "test_bpb_nnlm", "test_bpb_pretrain", "test_bpb_sft", "test_bpb_ppo")


class ReportError(RuntimeError):
    """The workspace lacks what a report needs (a stage that never ran, shards that do not match)."""


def _finite(value: Any) -> float | None:
    """A float for JSON, or None for a missing or non-finite value (JSON has no infinity)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def order_name(order: int) -> str:
    return ORDER_NAMES.get(order, f"{order}-gram")


def _generation(key: str, name: str, stage: str, model: str, bpb: Any, perplexity: Any = None,
                unit: str = "word", perplexity_unk: Any = None, source: str = "", note: str = "") -> dict[str, Any]:
    return {"key": key, "generation": name, "stage": stage, "model": model, "bits_per_byte": _finite(bpb),
            "perplexity": _finite(perplexity), "perplexity_unit": unit, "perplexity_unk": _finite(perplexity_unk),
            "source": source, "note": note}


# ----------------------------------------------------------------------------------------------
# the test split: documents and the GPT token shard


def test_texts(ws: Workspace) -> list[str]:
    """The test documents in doc_id order (the order the tokenizer stage wrote them to its shard)."""
    from lmpipe import warehouse

    with warehouse.connect(ws) as con:
        rows = con.execute("SELECT text FROM documents WHERE split = 'test' ORDER BY doc_id").fetchall()
    return [r[0] for r in rows]


def shard_dir(ws: Workspace, results: Mapping[str, StageResult]) -> Path:
    return ws.abs(_result(results, "tokenizer").outputs["shards"])


def test_prefix(tokens: Any, eot_id: int, max_tokens: int) -> tuple[int, int]:
    """(documents, tokens) of the longest run of whole test documents within ``max_tokens`` (at least one)."""
    import numpy as np

    ends = np.flatnonzero(np.asarray(tokens) == eot_id)  # each document ends with its end-of-text
    if not len(ends):
        return 0, 0
    k = max(1, int(np.searchsorted(ends, max_tokens - 1, side="right")))
    return k, int(ends[k - 1]) + 1


def scored_split(ws: Workspace, results: Mapping[str, StageResult], max_tokens: int
                 ) -> tuple[Any, dict[str, Any], list[str] | None]:
    """The test tokens to score, the split's description, and the test texts when only a prefix is scored."""
    from lmpipe import shards

    folder = shard_dir(ws, results)
    meta = shards.read_meta(folder)
    test = meta["splits"].get("test") or {"tokens": 0, "documents": 0, "bytes": 0}
    if not test["tokens"]:
        raise ReportError(f"the tokenizer stage's shards in {folder} hold no test split: the corpus has no test "
                          "documents (raise ingest.test_fraction)")
    tokens = shards.load_split(folder, "test")
    split = {"documents": int(test["documents"]), "bytes": int(test["bytes"]), "tokens": int(test["tokens"]),
             "documents_scored": int(test["documents"]), "bytes_scored": int(test["bytes"]),
             "tokens_scored": int(test["tokens"])}
    if not max_tokens or max_tokens >= len(tokens):
        return tokens, split, None
    from lmpipe.scoring import text_bytes

    texts = test_texts(ws)
    if len(texts) != test["documents"]:
        raise ReportError(f"the warehouse has {len(texts)} test documents but the shards in {folder} hold "
                          f"{test['documents']}: run the tokenizer stage again")
    k, n = test_prefix(tokens, int(meta.get("eot_id", shards.EOT_ID)), max_tokens)
    split |= {"documents_scored": k, "tokens_scored": n, "bytes_scored": text_bytes(texts[:k])}
    return tokens[:n], split, texts[:k]


def score_gpt(model_dir: Path, tokens: Any, n_bytes: int, batch_size: int, device: Any) -> dict[str, float]:
    """Bits per byte and per-token perplexity of a GPT model folder on ``tokens`` (as pretraining scores)."""
    from lmpipe.pretrain import bits_per_byte, load_lm, split_nats

    model, _, _ = load_lm(model_dir, device)
    nats, count = split_nats(model, tokens, batch_size)
    return {"bits_per_byte": bits_per_byte(nats, n_bytes),
            "perplexity": math.exp(min(nats / count, 700.0)) if count else math.nan}


# ----------------------------------------------------------------------------------------------
# (a) bits per byte of every generation


def _result(results: Mapping[str, StageResult], stage: str) -> StageResult:
    if stage not in results or results[stage] is None:
        raise ReportError(f"stage {stage} has no result: run it first (`lmpipe run --to {stage}`)")
    return results[stage]


def ngram_generations(ws: Workspace, result: StageResult, texts: Sequence[str] | None) -> list[dict[str, Any]]:
    """One row per fitted order, all with the smoothing of the best n-gram (the stage's choice on val)."""
    from lmpipe.scoring import score

    folder = ws.abs(result.outputs["models"])
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    if not index.get("best"):
        raise ReportError(f"{folder / 'index.json'} names no best model: the n-gram stage fitted no normalised model")
    best_method, best_order = index["best"].rsplit("-", 1)
    rows = sorted((r for r in index["models"] if r["method"] == best_method), key=lambda r: int(r["order"]))
    out = []
    for r in rows:
        order, model = int(r["order"]), f"{best_method}-{r['order']}"
        note = "best n-gram on val" if order == int(best_order) else ""
        if texts is None:
            bpb, ppl, unk = r["test_bits_per_byte"], r["test_perplexity"], r["test_perplexity_unk"]
            source = "ngram stage (models/index.json, test split)"
        else:
            s = score(ws, result, texts, {"method": best_method, "order": order})
            bpb, ppl, unk, source = s.bits_per_byte, s.perplexity, s.perplexity_unk, "scored by the report"
        out.append(_generation(order_name(order).replace("-", ""), order_name(order), "ngram", model, bpb, ppl,
                               "word", unk, source, note))
    return out


def _rnn_cell(lm_dir: Path) -> str:
    settings = lm_dir / "rnnlm.json"
    return json.loads(settings.read_text(encoding="utf-8")).get("cell", "lstm") if settings.exists() else "lstm"


def neural_word_generations(ws: Workspace, result: StageResult, texts: Sequence[str] | None) -> list[dict[str, Any]]:
    """The NNLM and the recurrent LM, when the embeddings stage trained them."""
    from lmpipe.scoring import score

    lm_dir, m, out = ws.abs(result.outputs["lm"]), result.metrics, []
    for kind in ("nnlm", "rnnlm"):
        if f"{kind}_test_bits_per_byte" not in m:
            continue
        name = "NNLM" if kind == "nnlm" else f"{_rnn_cell(lm_dir).upper()} LM"
        if texts is None:
            bpb, ppl, unk = (m[f"{kind}_test_{k}"] for k in ("bits_per_byte", "perplexity", "perplexity_unk"))
            source = f"embeddings stage metrics ({kind}_test_bits_per_byte)"
        else:
            s = score(ws, result, texts, {"method": kind})
            bpb, ppl, unk, source = s.bits_per_byte, s.perplexity, s.perplexity_unk, "scored by the report"
        out.append(_generation(kind, name, "embeddings", kind, bpb, ppl, "word", unk, source))
    return out


def gpt_generations(ws: Workspace, cfg: ReportConfig, results: Mapping[str, StageResult], tokens: Any,
                    split: dict[str, Any], device: Any) -> list[dict[str, Any]]:
    """The pretrained, SFT and PPO GPTs on the same test tokens; pretraining's own number when it is the same."""
    out = []
    whole = split["tokens_scored"] == split["tokens"]
    for stage, name in GPT_STAGES:
        result = _result(results, stage)
        model = f"{stage} model"
        if stage == "pretrain" and whole and "test_bpb" in result.metrics:
            m = result.metrics
            out.append(_generation(stage, name, stage, model, m["test_bpb"], m.get("test_ppl"), "BPE token",
                                   source="pretrain stage metrics (test_bpb)"))
            continue
        s = score_gpt(ws.abs(result.outputs["model"]), tokens, split["bytes_scored"], cfg.batch_size, device)
        out.append(_generation(stage, name, stage, model, s["bits_per_byte"], s["perplexity"], "BPE token",
                               source="scored by the report on the tokenizer's test shard"))
    return out


def generations_from_metrics(results: Mapping[str, StageResult], ws: Workspace) -> list[dict[str, Any]]:
    """The yardstick as far as the stages' own metrics give it (no model is loaded): PPO has no test number."""
    rows = ngram_generations(ws, _result(results, "ngram"), None) if "ngram" in results else []
    if "embeddings" in results:
        rows += neural_word_generations(ws, results["embeddings"], None)
    for stage, name in GPT_STAGES:
        m = results[stage].metrics if stage in results else {}
        bpb = m.get("test_bpb")
        rows.append(_generation(stage, name, stage, f"{stage} model", bpb, m.get("test_ppl"), "BPE token",
                                source=f"{stage} stage metrics (test_bpb)" if bpb is not None else
                                "not measured: the report stage has not run"))
    return rows


# ----------------------------------------------------------------------------------------------
# (b) continuations


def _device(name: str) -> Any:
    from lmpipe.trainer import resolve_device

    return resolve_device(name)


def ngram_continuations(ws: Workspace, result: StageResult, cfg: ReportConfig) -> tuple[str, list[str]]:
    from lmpipe.ngram import load_stage_models

    model, _, _ = load_stage_models(ws.abs(result.outputs["models"]))
    greedy = cfg.temperature == 0  # top-1 sampling is greedy decoding
    texts = [" ".join(model.generate(p, cfg.continuation_tokens, 1.0 if greedy else cfg.temperature,
                                     1 if greedy else (cfg.top_k or None), cfg.seed)) for p in cfg.prompts]
    return f"n-gram ({model.method}-{model.order})", texts


def neural_word_continuations(ws: Workspace, result: StageResult, cfg: ReportConfig) -> list[tuple[str, list[str]]]:
    from lmpipe import nnlm, rnnlm
    from lmpipe.wordtok import Vocabulary

    lm_dir = ws.abs(result.outputs["lm"])
    vocab = Vocabulary.load(lm_dir / "vocab.tsv")
    lowercase = bool(json.loads((lm_dir / "index.json").read_text(encoding="utf-8"))["lowercase"])
    out = []
    for kind, load, generate in (("nnlm", nnlm.load_nnlm, nnlm.generate), ("rnnlm", rnnlm.load_rnnlm, rnnlm.generate)):
        if not (lm_dir / f"{kind}.safetensors").exists():
            continue
        model = load(lm_dir)
        texts = [" ".join(generate(model, vocab, p, cfg.continuation_tokens, cfg.temperature, cfg.top_k, cfg.seed,
                                   lowercase)) for p in cfg.prompts]
        out.append(("NNLM" if kind == "nnlm" else f"{_rnn_cell(lm_dir).upper()} LM", texts))
    return out


def gpt_continuations(model_dir: Path, cfg: ReportConfig, device: Any) -> list[str]:
    """A base model continues each prompt as the start of a document; a chat model answers it as a user turn."""
    import torch

    from lmpipe.pretrain import load_lm, sample_texts

    model, tokenizer, extra = load_lm(model_dir, device)
    n = min(cfg.continuation_tokens, model.config.block_size - 1)
    prompts = list(cfg.prompts)
    if extra.get("chat_template"):
        from lmpipe.chat import ChatTemplate
        from lmpipe.sft import answer

        generator = torch.Generator(device=model.wte.weight.device).manual_seed(cfg.seed)
        return answer(model, ChatTemplate(tokenizer), prompts, n, cfg.temperature, cfg.top_k or None,
                      generator=generator)
    texts = sample_texts(model, tokenizer, prompts, n, cfg.temperature, cfg.top_k, cfg.seed, extra.get("eot_id", 0))
    return [t[len(p):].strip() for p, t in zip(prompts, texts, strict=True)]


def continuations(ws: Workspace, cfg: ReportConfig, results: Mapping[str, StageResult], device: Any
                  ) -> dict[str, Any]:
    """Every generation's continuation of each prompt: ``{"prompts", "generations", "rows"}``."""
    columns: list[tuple[str, list[str]]] = []
    if cfg.prompts:
        columns.append(ngram_continuations(ws, _result(results, "ngram"), cfg))
        columns += neural_word_continuations(ws, _result(results, "embeddings"), cfg)
        for stage, name in GPT_STAGES:
            columns.append((name, gpt_continuations(ws.abs(_result(results, stage).outputs["model"]), cfg, device)))
    rows = [{"prompt": p, "continuations": {name: texts[i] for name, texts in columns}}
            for i, p in enumerate(cfg.prompts)]
    return {"prompts": list(cfg.prompts), "generations": [name for name, _ in columns], "rows": rows,
            "tokens": cfg.continuation_tokens, "temperature": cfg.temperature, "top_k": cfg.top_k, "seed": cfg.seed}


# ----------------------------------------------------------------------------------------------
# (c) alignment before/after, (e) run metadata


def _row(stage: str, measure: str, before: Any, after: Any, m: Mapping[str, Any] | None = None,
         change: str = "") -> dict[str, Any]:
    """One before/after row; ``change`` names the stage metrics ``<change>_low`` and ``<change>_high`` in ``m``, the
    95% interval of after - before, when the stage measured one."""
    row = {"stage": stage, "measure": measure, "before": _finite(before), "after": _finite(after)}
    if m is not None and f"{change}_low" in m and f"{change}_high" in m:
        row |= {"change_low": _finite(m[f"{change}_low"]), "change_high": _finite(m[f"{change}_high"])}
    return row


def alignment(results: Mapping[str, StageResult]) -> list[dict[str, Any]]:
    """The alignment stages' own before/after numbers (from their metrics), one row per measure."""
    rows = []
    if "sft" in results:
        m = results["sft"].metrics
        for key, label in (("heldout_token_f1", "held-out token F1"), ("heldout_rouge_l", "held-out ROUGE-L"),
                           ("test_response_loss", "test response loss (nats/token)")):
            if key in m:
                rows.append(_row("sft", f"{label}: pretrained → SFT", m.get(f"pretrained_{key}"), m[key], m,
                                 f"{key}_gain"))
    if "reward" in results:
        m = results["reward"].metrics
        for key, label in (("longer", "always longer"), ("bag_of_words", "bag of words")):
            if "heldout_accuracy" in m and f"{key}_accuracy" in m:
                rows.append(_row("reward", f"held-out pairwise accuracy: {label} → reward model", m[f"{key}_accuracy"],
                                 m["heldout_accuracy"], m, f"heldout_accuracy_gain_over_{key}"))
    if "ppo" in results:
        m = results["ppo"].metrics
        for key, label in (("heldout_reward", "held-out reward (normalised)"),
                           ("heldout_token_f1", "held-out token F1"), ("heldout_rouge_l", "held-out ROUGE-L")):
            if key in m:
                rows.append(_row("ppo", f"{label}: SFT → PPO", m.get(f"sft_{key}"), m[key], m, f"{key}_gain"))
        if "final_kl" in m:
            rows.append(_row("ppo", f"KL to SFT per response, k1 (target {m.get('target_kl', math.nan):g})", None,
                             m["final_kl"]))
        if "final_kl_k3" in m:
            rows.append(_row("ppo", "KL to SFT per response, k3", None, m["final_kl_k3"]))
    return rows


def run_metadata(results: Mapping[str, StageResult]) -> dict[str, Any]:
    """Git commit and dirty flag, host, and each stage's run, time and tokens (when its metrics carry them)."""
    from lmpipe.tracking import git_info, system_info

    git = git_info()
    host = {k.removeprefix("host."): v for k, v in system_info().items()}
    stages = []
    for name in STAGE_ORDER:
        r = results.get(name)
        if r is None:
            continue
        stages.append({"stage": name, "run_id": r.run_id, "finished_at": r.finished_at,
                       "wall_seconds": _finite(r.metrics.get("wall_seconds")),
                       "tokens_processed": _finite(r.metrics.get("tokens_processed")), "summary": r.summary})
    return {"git_commit": git.get("git.commit"), "git_dirty": git.get("git.dirty") == "true" if git else None,
            "host": host, "stages": stages}


# ----------------------------------------------------------------------------------------------
# (d) contamination


def contamination(ws: Workspace, cfg: PipelineConfig, results: Mapping[str, StageResult]) -> dict[str, Any]:
    """How many test documents share a ``report.contamination_n``-word sequence with each stage's training data."""
    from lmpipe.contamination import check_contamination

    return check_contamination(ws, cfg, dict(results), n=cfg.report.contamination_n,
                               max_examples=cfg.report.examples_per_stage)


# ----------------------------------------------------------------------------------------------
# building


def build_report(ws: Workspace, cfg: PipelineConfig, results: Mapping[str, StageResult], measure: bool = True
                 ) -> dict[str, Any]:
    """The report's data. ``measure=False`` uses only the stages' recorded metrics (loads no model)."""
    rc = cfg.report
    report: dict[str, Any] = {"schema": SCHEMA_VERSION, "created_at": time.time(), "workspace": str(ws.root),
                              "measured": measure, "config": to_dict(rc)}
    if measure:
        device = _device(rc.device)
        tokens, split, texts = scored_split(ws, results, rc.max_test_tokens)
        rows = ngram_generations(ws, _result(results, "ngram"), texts)
        rows += neural_word_generations(ws, _result(results, "embeddings"), texts)
        rows += gpt_generations(ws, rc, results, tokens, split, device)
        report |= {"test_split": split, "generations": rows, "continuations": continuations(ws, rc, results, device)}
    else:
        report |= {"test_split": _split_from_metrics(ws, results), "generations": generations_from_metrics(results, ws),
                   "continuations": None}
    report |= {"alignment": alignment(results),
               "contamination": contamination(ws, cfg, results) if measure else None,
               "run": run_metadata(results)}
    return report


def _split_from_metrics(ws: Workspace, results: Mapping[str, StageResult]) -> dict[str, Any]:
    """The test split as the tokenizer stage's shard metadata describes it (all None before that stage ran)."""
    from lmpipe import shards

    test = {}
    if "tokenizer" in results and ws.abs(results["tokenizer"].outputs.get("shards", "-")).exists():
        test = shards.read_meta(shard_dir(ws, results))["splits"].get("test") or {}
    docs, n_bytes, tokens = test.get("documents"), test.get("bytes"), test.get("tokens")
    return {"documents": docs, "tokens": tokens, "bytes": n_bytes, "documents_scored": docs, "tokens_scored": tokens,
            "bytes_scored": n_bytes}


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Flat numbers for tracking: ``test_bpb_<generation>``, the best n-gram's, contamination counts."""
    out: dict[str, float] = {}
    for g in report["generations"]:
        if g["bits_per_byte"] is not None:
            out[f"test_bpb_{g['key']}"] = g["bits_per_byte"]
            if g["note"] == "best n-gram on val":
                out["test_bpb_ngram_best"] = g["bits_per_byte"]
    for stage, c in ((report.get("contamination") or {}).get("stages") or {}).items():
        out[f"contaminated_{stage}"] = float(c["contaminated"])
    out["test_documents_scored"] = float(report["test_split"]["documents_scored"] or 0)
    return out


def load_report(path: Path) -> dict[str, Any]:
    """A report.json, checked for the fields the renderers read."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not JSON ({exc})") from exc
    missing = [k for k in ("schema", "generations", "test_split", "alignment", "run") if k not in data]
    if missing:
        raise ReportError(f"{path}: not an lmpipe report (missing {', '.join(missing)})")
    return data


# ----------------------------------------------------------------------------------------------
# rendering: plain text and Markdown (HTML is in report_html)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def _perplexity(g: Mapping[str, Any]) -> str:
    return "n/a" if g["perplexity"] is None else f"{g['perplexity']:.1f} per {g['perplexity_unit']}"


def generation_table(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the yardstick table (shared by every renderer)."""
    head = ["generation", "stage", "model", "test bits/byte", "perplexity", "source"]
    rows = [[g["generation"] + (" *" if g["note"] else ""), g["stage"], g["model"], fmt(g["bits_per_byte"]),
             _perplexity(g), g["source"]] for g in report["generations"]]
    return head, rows


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def md_cell(value: Any) -> str:
    """Text safe inside a Markdown table cell: pipes escaped, line breaks flattened."""
    return " ".join(str(value).split()).replace("\\", "\\\\").replace("|", "\\|") or " "


def md_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def split_line(report: Mapping[str, Any]) -> str:
    s = report["test_split"]
    line = (f"Test split: {fmt(s['documents'])} documents, {fmt(s['bytes'])} bytes (each document counted with one "
            f"newline), {fmt(s['tokens'])} BPE tokens.")
    if s["documents_scored"] != s["documents"]:
        line += (f" Every model was scored on the first {fmt(s['documents_scored'])} documents "
                 f"({fmt(s['bytes_scored'])} bytes, {fmt(s['tokens_scored'])} tokens; report.max_test_tokens).")
    return line


def table(report: Mapping[str, Any]) -> str:
    """The yardstick as a plain-text table (``lmpipe report``)."""
    head, rows = generation_table(report)
    out = [split_line(report), "", text_table(head, rows), "", "* best n-gram on val"]
    if report.get("alignment"):
        out += ["", text_table(ALIGNMENT_HEAD, alignment_rows(report))]
    if not report.get("measured", True):
        out += ["", "The report stage has not run: numbers from the stages' metrics only (`lmpipe run` measures PPO "
                    "on the test split and adds continuations and the contamination check)."]
    return "\n".join(out)


ALIGNMENT_HEAD = ["stage", "measure", "before", "after", "change (95% interval)"]
INTERVAL_NOTE = ("The intervals are 95% bootstrap intervals over the held-out prompts, paired (both sides answer "
                 "the same prompts): how far another draw of prompts alone could move the change.")


def alignment_rows(report: Mapping[str, Any]) -> list[list[str]]:
    return [[r["stage"], r["measure"], fmt(r["before"]), fmt(r["after"]), change_cell(r)] for r in report["alignment"]]


def change_cell(row: Mapping[str, Any]) -> str:
    """``+0.238 (+0.124 to +0.362)``: after - before and, where the stage measured it, its 95% bootstrap interval
    over the held-out prompts."""
    before, after = row.get("before"), row.get("after")
    if before is None or after is None:
        return ""
    low, high = row.get("change_low"), row.get("change_high")
    interval = f" ({low:+.3f} to {high:+.3f})" if low is not None and high is not None else ""
    return f"{after - before:+.3f}{interval}"


def contamination_rows(report: Mapping[str, Any]) -> list[list[str]]:
    c = report.get("contamination") or {}
    return [[stage, s["trained_on"], fmt(s["contaminated"]), f"{100 * s['share']:.1f}%"]
            for stage, s in (c.get("stages") or {}).items()]


def stage_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for s in report["run"]["stages"]:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["finished_at"])) if s["finished_at"] else "n/a"
        rows.append([s["stage"], (s["run_id"] or "n/a")[:12], at,
                     "n/a" if s["wall_seconds"] is None else f"{s['wall_seconds']:.1f}",
                     "n/a" if s["tokens_processed"] is None else f"{s['tokens_processed']:,.0f}", s["summary"]])
    return rows


STAGE_HEAD = ["stage", "MLflow run", "finished", "wall s", "tokens processed", "summary"]


def markdown(report: Mapping[str, Any]) -> str:
    """The whole report as Markdown."""
    head, rows = generation_table(report)
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["created_at"]))
    out = ["# Evolution report", "", f"Workspace `{report['workspace']}`, built {created}.", "",
           "## Bits per byte on the test split", "",
           "Every generation scored on the same held-out documents: total negative log2-likelihood over their "
           "UTF-8 bytes. Lower is better; perplexities are per each model's own token and compare only within "
           "a tokenizer.", "", split_line(report), "", md_table(head, rows), "", "\\* best n-gram on val", ""]
    cont = report.get("continuations")
    if cont and cont["rows"]:
        out += ["## Continuations", "",
                f"Each generation continues the same prompts ({cont['tokens']} tokens at most, temperature "
                f"{cont['temperature']:g}, top-k {cont['top_k']}, seed {cont['seed']}); the SFT and PPO models "
                "answer them as a user turn of the chat template.", ""]
        for row in cont["rows"]:
            out += [f"### {md_cell(row['prompt'])}", "",
                    md_table(["generation", "continuation"], list(row["continuations"].items())), ""]
    if report.get("alignment"):
        out += ["## Alignment: before and after", "",
                md_table(ALIGNMENT_HEAD, alignment_rows(report)), "", INTERVAL_NOTE, ""]
    out += contamination_markdown(report.get("contamination"))
    out += run_markdown(report)
    return "\n".join(out)


def contamination_line(c: Mapping[str, Any]) -> str:
    line = (f"Test documents that share a sequence of {c['n']} words with what each stage trained on, out of "
            f"{fmt(c['test_documents'])} test documents")
    if c.get("checked") is not None and c["checked"] != c["test_documents"]:
        line += f" ({fmt(c['checked'])} of them long enough to check; the share is of those)"
    return line + "."


def contamination_markdown(c: Mapping[str, Any] | None) -> list[str]:
    out = ["## Test-set contamination", ""]
    if not c:
        return out + ["Not checked in this report.", ""]
    out += [contamination_line(c), "", md_table(["stage", "trained on", "contaminated documents", "share"],
                                                  contamination_rows({"contamination": c})), ""]
    for stage, s in c["stages"].items():
        for ex in s.get("examples", []):
            out.append(f"- {stage}, test document {ex['document_id']}: “{md_cell(ex['passage'])}”")
    return out + [""]


def run_markdown(report: Mapping[str, Any]) -> list[str]:
    run = report["run"]
    commit = run["git_commit"] or "not a git checkout"
    dirty = " (uncommitted changes)" if run["git_dirty"] else ""
    host = ", ".join(f"{k} {v}" for k, v in run["host"].items())
    return ["## Run", "", f"Code: commit `{commit}`{dirty}. Host: {host}.", "",
            md_table(STAGE_HEAD, stage_rows(report)), ""]


# ----------------------------------------------------------------------------------------------
# comparing two reports


def compare(a: Mapping[str, Any], b: Mapping[str, Any], labels: tuple[str, str] = ("A", "B")
            ) -> tuple[list[str], list[list[str]]]:
    """Rows of the two reports' numbers side by side, matched by generation and by alignment measure."""
    head = ["measure", labels[0], labels[1], "difference"]
    rows = []

    def add(name: str, x: Any, y: Any) -> None:
        diff = f"{y - x:+.3f}" if x is not None and y is not None else "n/a"
        rows.append([name, fmt(x), fmt(y), diff])

    ga = {g["key"]: g for g in a["generations"]}
    gb = {g["key"]: g for g in b["generations"]}
    for key in [*ga, *(k for k in gb if k not in ga)]:
        g = ga.get(key) or gb[key]
        add(f"test bits/byte: {g['generation']}", ga.get(key, {}).get("bits_per_byte"),
            gb.get(key, {}).get("bits_per_byte"))
    aa = {(r["stage"], r["measure"]): r for r in a["alignment"]}
    ab = {(r["stage"], r["measure"]): r for r in b["alignment"]}
    for key in [*aa, *(k for k in ab if k not in aa)]:
        add(f"{key[0]}: {key[1]} (after)", aa.get(key, {}).get("after"), ab.get(key, {}).get("after"))
    ca = ((a.get("contamination") or {}).get("stages")) or {}
    cb = ((b.get("contamination") or {}).get("stages")) or {}
    for stage in [*ca, *(s for s in cb if s not in ca)]:
        x, y = ca.get(stage, {}).get("contaminated"), cb.get(stage, {}).get("contaminated")
        add(f"contaminated test documents: {stage}", x, y)
    return head, rows


# ----------------------------------------------------------------------------------------------
# files and the stage


def write_report(report: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """report.json, report.md and the self-contained report.html in ``out_dir``."""
    from lmpipe.report_html import html

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    atomic_write_text(files["json"], json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(files["markdown"], markdown(report))
    atomic_write_text(files["html"], html(report))
    return files


def _fingerprint(report: Mapping[str, Any]) -> str:
    """Of the report's numbers and texts, not of when or where it was built."""
    stable = {k: v for k, v in report.items() if k not in ("created_at", "run", "workspace")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:32]


def run_stage(ctx: StageContext) -> StageOutput:
    """The ``report`` stage: measure what the stages left unmeasured, gather the rest, write the report."""
    ws = ctx.workspace
    report = build_report(ws, ctx.config, ctx.inputs)
    files = write_report(report, ctx.out_dir)
    for path in files.values():
        ctx.log.artifact(path)
    metrics = report_metrics(report)
    ctx.log.metrics(metrics)
    shown = [g for g in report["generations"] if g["stage"] != "ngram" or g["note"]]  # the best n-gram only
    summary = "test bits/byte: " + ", ".join(f"{g['generation']} {fmt(g['bits_per_byte'])}" for g in shown)
    outputs = {name: ws.rel(path) for name, path in files.items()}
    return StageOutput(_fingerprint(report), outputs, metrics, summary)
