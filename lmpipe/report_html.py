"""The evolution report as one self-contained HTML page: inline CSS, plots as base64 PNG, no scripts.

It renders the data of ``report.json`` (:mod:`lmpipe.report`), so any stored report can be rendered
again, anywhere, without the workspace.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from lmpipe.report import (
    ALIGNMENT_HEAD,
    INTERVAL_NOTE,
    STAGE_HEAD,
    alignment_rows,
    contamination_line,
    contamination_rows,
    generation_table,
    split_line,
    stage_rows,
)

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232a; max-width: 1100px;
       margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.7rem; margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #dde2e7; }
h3 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; width: 100%; }
th, td { border: 1px solid #dde2e7; padding: .3rem .55rem; text-align: left; vertical-align: top; }
th { background: #f3f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.best td { background: #fff8e1; } td.text { font-family: ui-monospace, monospace; font-size: 13px; }
.muted { color: #5c6670; } figure { margin: 1rem 0; } img { max-width: 100%; height: auto; }
blockquote { margin: .3rem 0 .3rem 1rem; color: #39424b; font-family: ui-monospace, monospace; font-size: 13px; }
"""


def _png(fig: Any) -> str:
    """A matplotlib figure as a data URI (the figure is closed)."""
    from lmpipe.plots import _pyplot

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def bpb_chart(report: Mapping[str, Any]) -> str | None:
    """Horizontal bars of test bits per byte, one per generation, oldest at the top."""
    from lmpipe.plots import _pyplot

    gens = [g for g in report["generations"] if g["bits_per_byte"] is not None]
    if not gens:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(gens) + 1.2), dpi=110)
    colours = {"ngram": "#8e9aaf", "embeddings": "#6c8ebf", "pretrain": "#d79b00", "sft": "#82b366", "ppo": "#b85450"}
    names = [g["generation"] for g in gens][::-1]
    values = [g["bits_per_byte"] for g in gens][::-1]
    bars = ax.barh(names, values, color=[colours.get(g["stage"], "#999999") for g in gens][::-1])
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=8)
    ax.set_xlabel("test bits per byte (lower is better)")
    ax.set_xlim(0, max(values) * 1.15)
    ax.set_title("Every generation on the same test documents")
    return _png(fig)


def alignment_chart(report: Mapping[str, Any]) -> str | None:
    """Paired bars of each alignment measure before and after its stage."""
    from lmpipe.plots import _pyplot

    rows = [r for r in report.get("alignment") or [] if r["before"] is not None and r["after"] is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(rows) + 1.2), dpi=110)
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["before"] for r in rows], height=0.4, label="before / baseline", color="#b0b8c1")
    ax.barh([i - 0.2 for i in y], [r["after"] for r in rows], height=0.4, label="after", color="#4a7fb0")
    ax.set_yticks(list(y), [f"{r['stage']}: {r['measure']}" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="#333333", linewidth=0.6)
    ax.legend(fontsize=8)
    ax.set_title("Alignment stages: before and after")
    return _png(fig)


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = (),
           text: Sequence[int] = (), row_class: Sequence[str] | None = None) -> str:
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in head) + "</tr></thead>", "<tbody>"]
    for i, row in enumerate(rows):
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        cells = []
        for j, cell in enumerate(row):
            kind = "num" if j in numeric else "text" if j in text else ""
            cells.append(f'<td class="{kind}">' if kind else "<td>")
            cells[-1] += escape(str(cell)) + "</td>"
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    return "\n".join([*out, "</tbody>", "</table>"])


def _figure(uri: str | None, alt: str) -> list[str]:
    return [f'<figure><img src="{uri}" alt="{escape(alt)}"></figure>'] if uri else []


def html(report: Mapping[str, Any]) -> str:
    """The report as a standalone HTML document."""
    head, rows = generation_table(report)
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["created_at"]))
    body = ["<h1>Evolution report</h1>",
            f'<p class="muted">Workspace <code>{escape(report["workspace"])}</code>, built {created}.</p>',
            "<h2>Bits per byte on the test split</h2>",
            "<p>Every generation scored on the same held-out documents: total negative log2-likelihood over their "
            "UTF-8 bytes. Lower is better; perplexities are per each model's own token and compare only within a "
            "tokenizer.</p>",
            f"<p>{escape(split_line(report))}</p>",
            _table(head, rows, numeric=(3,), row_class=["best" if g["note"] else "" for g in report["generations"]]),
            '<p class="muted">* best n-gram on val</p>',
            *_figure(bpb_chart(report), "test bits per byte of each generation")]
    cont = report.get("continuations")
    if cont and cont["rows"]:
        body += ["<h2>Continuations</h2>",
                 f"<p>Each generation continues the same prompts ({cont['tokens']} tokens at most, temperature "
                 f"{cont['temperature']:g}, top-k {cont['top_k']}, seed {cont['seed']}); the SFT and PPO models answer "
                 "them as a user turn of the chat template.</p>"]
        for row in cont["rows"]:
            body += [f"<h3>{escape(row['prompt'])}</h3>",
                     _table(["generation", "continuation"], list(row["continuations"].items()), text=(1,))]
    if report.get("alignment"):
        body += ["<h2>Alignment: before and after</h2>",
                 _table(ALIGNMENT_HEAD, alignment_rows(report), numeric=(2, 3, 4)), f"<p>{escape(INTERVAL_NOTE)}</p>",
                 *_figure(alignment_chart(report), "alignment measures before and after")]
    body += _contamination(report.get("contamination"))
    body += _run(report)
    return "\n".join(['<!DOCTYPE html>', '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      '<meta name="viewport" content="width=device-width, initial-scale=1">',
                      "<title>lmpipe evolution report</title>", f"<style>{CSS}</style>", "</head>", "<body>",
                      *body, "</body>", "</html>", ""])


def _contamination(c: Mapping[str, Any] | None) -> list[str]:
    out = ["<h2>Test-set contamination</h2>"]
    if not c:
        return out + ["<p>Not checked in this report.</p>"]
    out += [f"<p>{escape(contamination_line(c))}</p>",
            _table(["stage", "trained on", "contaminated documents", "share"],
                   contamination_rows({"contamination": c}), numeric=(2, 3))]
    for stage, s in c["stages"].items():
        for ex in s.get("examples", []):
            out.append(f"<p>{escape(stage)}, test document {escape(str(ex['document_id']))}:</p>"
                       f"<blockquote>{escape(ex['passage'])}</blockquote>")
    return out


def _run(report: Mapping[str, Any]) -> list[str]:
    run = report["run"]
    commit = escape(run["git_commit"] or "not a git checkout")
    dirty = " (uncommitted changes)" if run["git_dirty"] else ""
    host = escape(", ".join(f"{k} {v}" for k, v in run["host"].items()))
    return ["<h2>Run</h2>", f"<p>Code: commit <code>{commit}</code>{dirty}. Host: {host}.</p>",
            _table(STAGE_HEAD, stage_rows(report), numeric=(3, 4))]
