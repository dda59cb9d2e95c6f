"""The evolution report: one yardstick for every generation, its files, the CLI, and the page in a real browser."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from lmpipe import report as rep
from lmpipe.cli import main
from lmpipe.report_html import html
from lmpipe.workspace import Workspace

GENERATIONS = ("unigram", "bigram", "trigram", "nnlm", "pretrain", "sft", "ppo")  # what the MICRO run trains
CONTAMINATION = {
    "n": 13, "test_documents": 14,
    "stages": {
        "ngram": {"trained_on": "162 train-split documents", "contaminated": 4, "share": 0.4,
                  "examples": [{"document_id": 77, "passage": "a | pipe and <b>markup</b> in a quoted passage"}]},
        "sft": {"trained_on": "489 train instructions", "contaminated": 0, "share": 0.0, "examples": []},
    },
}


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _report(ws: Workspace, out: dict) -> dict:
    return rep.load_report(ws.abs(out["report"]["outputs"]["json"]))


def _tables(markdown: str) -> list[list[str]]:
    """Blocks of consecutive Markdown table lines."""
    blocks, current = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return blocks


def _cells(line: str) -> int:
    return len(re.split(r"(?<!\\)\|", line.strip())) - 2  # unescaped pipes, minus the outer two


def _hand_made_report() -> dict:
    gen = [rep._generation("trigram", "trigram", "ngram", "kn-3", 1.5, 120.0, note="best n-gram on val"),
           rep._generation("ppo", "PPO", "ppo", "ppo model", 2.0, 30.0, "BPE token")]
    return {"schema": 1, "created_at": 0.0, "workspace": "/w", "measured": True,
            "test_split": {"documents": 3, "bytes": 90, "tokens": 40, "documents_scored": 3, "bytes_scored": 90,
                           "tokens_scored": 40},
            "generations": gen,
            "continuations": {"prompts": ["If | the"], "generations": ["PPO"], "tokens": 8, "temperature": 0.8,
                              "top_k": 50, "seed": 0, "rows": [{"prompt": "If | the",
                                                                "continuations": {"PPO": "a|b\nnext line"}}]},
            "alignment": [rep._row("ppo", "held-out reward: SFT → PPO", 0.1, 0.4)],
            "contamination": CONTAMINATION,
            "run": {"git_commit": None, "git_dirty": None, "host": {"cpu_count": "2"}, "stages": []}}


# ----------------------------------------------------------------------------------------------
# pure pieces


def test_test_prefix_keeps_whole_documents_within_the_cap():
    tokens = [5, 6, 0, 7, 0, 8, 9, 0]  # three documents, each ended by end-of-text (0)
    assert rep.test_prefix(tokens, 0, 5) == (2, 5)
    assert rep.test_prefix(tokens, 0, 8) == (3, 8)
    assert rep.test_prefix(tokens, 0, 2) == (1, 3)  # at least one document, even past the cap


def test_markdown_and_html_escape_what_they_render():
    report = _hand_made_report()
    md = rep.markdown(report)
    for block in _tables(md):
        assert {_cells(line) for line in block} == {_cells(block[0])}, block
        assert re.fullmatch(r"\|(---\|)+", block[1])
    assert "a\\|b next line" in md and "### If \\| the" in md
    assert "| ngram | 162 train-split documents | 4 | 40.0% |" in md
    page = html(report)
    assert "&lt;b&gt;markup&lt;/b&gt;" in page and "<b>markup" not in page
    assert page.count("<table>") == 5  # yardstick, one prompt, alignment, contamination, run


def test_compare_lines_up_generations_and_measures():
    a, b = _hand_made_report(), _hand_made_report()
    b["generations"][1] = {**b["generations"][1], "bits_per_byte": 1.75}
    b["generations"].append(rep._generation("nnlm", "NNLM", "embeddings", "nnlm", 2.5))
    head, rows = rep.compare(a, b, ("run-a", "run-b"))
    assert head == ["measure", "run-a", "run-b", "difference"]
    by_name = {r[0]: r[1:] for r in rows}
    assert by_name["test bits/byte: PPO"] == ["2.000", "1.750", "-0.250"]
    assert by_name["test bits/byte: NNLM"] == ["n/a", "2.500", "n/a"]
    assert by_name["contaminated test documents: ngram"] == ["4", "4", "+0.000"]


# ----------------------------------------------------------------------------------------------
# the stage on the session's MICRO run


def test_every_generation_has_a_test_bpb_matching_its_stage(micro_run):
    ws, out, _ = micro_run
    assert out["_statuses"]["report"] == "completed"
    report = _report(ws, out)
    rows = {g["key"]: g for g in report["generations"]}
    assert tuple(rows) == GENERATIONS
    assert all(g["bits_per_byte"] is not None and 0 < g["bits_per_byte"] < 20 for g in rows.values())

    index = json.loads((ws.abs(out["ngram"]["outputs"]["models"]) / "index.json").read_text(encoding="utf-8"))
    best = index["best"]
    for row in index["models"]:
        if row["method"] == best.split("-")[0]:
            g = rows[rep.order_name(row["order"])]
            assert g["bits_per_byte"] == row["test_bits_per_byte"] and g["perplexity"] == row["test_perplexity"]
    assert rows[rep.order_name(int(best.split("-")[1]))]["note"] == "best n-gram on val"
    assert rows["nnlm"]["bits_per_byte"] == out["embeddings"]["metrics"]["nnlm_test_bits_per_byte"]
    assert rows["pretrain"]["bits_per_byte"] == out["pretrain"]["metrics"]["test_bpb"]
    # the report scores SFT itself; the sft stage scored the same shard with the same function
    assert rows["sft"]["source"].startswith("scored by the report")
    assert rows["sft"]["bits_per_byte"] == pytest.approx(out["sft"]["metrics"]["test_bpb"], rel=1e-4)
    assert out["report"]["metrics"]["test_bpb_ppo"] == rows["ppo"]["bits_per_byte"]

    # one denominator: the GPT shard's bytes are the word models' bytes of the same documents
    from lmpipe.scoring import text_bytes

    split = report["test_split"]
    assert split["bytes"] == split["bytes_scored"] == text_bytes(rep.test_texts(ws))
    assert split["documents"] == out["ingest"]["metrics"]["documents_test"]


def test_every_generation_continues_every_prompt(micro_run):
    ws, out, _ = micro_run
    cont = _report(ws, out)["continuations"]
    assert cont["generations"][0].startswith("n-gram (")
    assert cont["generations"][1:] == ["NNLM", "GPT (pretrained)", "SFT", "PPO"]
    assert [r["prompt"] for r in cont["rows"]] == ["The", "Return the", "If the"]
    for name in cont["generations"]:
        texts = [r["continuations"][name] for r in cont["rows"]]
        assert all(isinstance(t, str) for t in texts) and any(t.strip() for t in texts), name


def test_change_cell_by_hand():
    row = rep._row("ppo", "held-out reward", 0.25, 0.5, {"x_low": 0.125, "x_high": 0.375}, "x")
    assert rep.change_cell(row) == "+0.250 (+0.125 to +0.375)"
    assert rep.change_cell(rep._row("sft", "token F1", 0.5, 0.25)) == "-0.250"  # no interval measured
    assert rep.change_cell(rep._row("ppo", "KL", None, 1.5)) == ""


def test_alignment_contamination_and_run_sections(micro_run):
    ws, out, _ = micro_run
    report = _report(ws, out)
    rows = {(r["stage"], r["measure"]): r for r in report["alignment"]}
    f1 = rows[("sft", "held-out token F1: pretrained → SFT")]
    assert (f1["before"], f1["after"]) == (out["sft"]["metrics"]["pretrained_heldout_token_f1"],
                                           out["sft"]["metrics"]["heldout_token_f1"])
    acc = rows[("reward", "held-out pairwise accuracy: always longer → reward model")]
    assert (acc["before"], acc["after"]) == (out["reward"]["metrics"]["longer_accuracy"],
                                             out["reward"]["metrics"]["heldout_accuracy"])
    reward = rows[("ppo", "held-out reward (normalised): SFT → PPO")]
    assert reward["after"] == out["ppo"]["metrics"]["heldout_reward"]
    # the changes' intervals come from the stages' metrics; SFT measured none
    rm = out["reward"]["metrics"]
    assert (acc["change_low"], acc["change_high"]) == (rm["heldout_accuracy_gain_over_longer_low"],
                                                      rm["heldout_accuracy_gain_over_longer_high"])
    pm = out["ppo"]["metrics"]
    assert (reward["change_low"], reward["change_high"]) == (pm["heldout_reward_gain_low"],
                                                            pm["heldout_reward_gain_high"])
    sm = out["sft"]["metrics"]
    assert (f1["change_low"], f1["change_high"]) == (sm["heldout_token_f1_gain_low"], sm["heldout_token_f1_gain_high"])
    assert "change_low" not in rows[("sft", "test response loss (nats/token): pretrained → SFT")]
    assert {"ngram", "embeddings", "pretrain", "sft", "reward", "ppo"} == set(report["contamination"]["stages"])
    assert report["contamination"]["n"] == 13
    stages = {s["stage"]: s for s in report["run"]["stages"]}
    assert list(stages) == list(rep.STAGE_ORDER)
    assert stages["pretrain"]["run_id"] == out["pretrain"]["run_id"]
    md = (ws.abs(out["report"]["outputs"]["markdown"])).read_text(encoding="utf-8")
    for block in _tables(md):
        assert {_cells(line) for line in block} == {_cells(block[0])}, block
    assert "| change (95% interval) |" in md and rep.INTERVAL_NOTE in md
    for heading in ("## Bits per byte on the test split", "## Continuations", "## Alignment: before and after",
                    "## Test-set contamination", "## Run"):
        assert heading in md


def test_report_files_are_logged_to_the_stage_and_the_pipeline_run(micro_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from lmpipe.tracking import Tracker

    ws, out, _ = micro_run
    client = Tracker(ws, "micro-session").client
    files = {"report.json", "report.md", "report.html"}
    assert files <= {a.path for a in client.list_artifacts(out["report"]["run_id"])}
    assert {f"report/{f}" for f in files} <= {a.path for a in client.list_artifacts(out["_run_id"], "report")}
    with get_client(sync_client=True) as prefect:
        only_reports = ArtifactFilter(key=ArtifactFilterKey(any_=["lmpipe-report"]))
        artifacts = prefect.read_artifacts(artifact_filter=only_reports)
    assert artifacts and "Bits per byte on the test split" in artifacts[0].data


# ----------------------------------------------------------------------------------------------
# the command line


def test_cli_prints_the_table_markdown_and_html(micro_run, tmp_path):
    ws, out, _ = micro_run
    report = _report(ws, out)
    table = _invoke("report", "--workspace", ws.root)
    assert table.exit_code == 0
    for g in report["generations"]:
        assert re.search(rf"^{re.escape(g['generation'])}.*{g['bits_per_byte']:.3f}", table.output, re.M), g
    md = _invoke("report", "--workspace", ws.root, "--format", "markdown")
    assert md.output.startswith("# Evolution report")
    page = tmp_path / "page.html"
    assert _invoke("report", "--workspace", ws.root, "--format", "html", "--output", page).exit_code == 0
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_cli_builds_the_table_from_stage_metrics_before_the_report_stage_ran(micro_run, tmp_path):
    ws, out, _ = micro_run
    copy = Workspace.resolve(tmp_path / "ws")
    shutil.copytree(ws.root, copy.root, dirs_exist_ok=True)
    (copy.state_dir / "stages" / "report.json").unlink()
    result = _invoke("report", "--workspace", copy.root)
    assert result.exit_code == 0, result.output
    assert re.search(r"^PPO .* n/a .*not measured", result.output, re.M)
    assert f"{out['pretrain']['metrics']['test_bpb']:.3f}" in result.output
    assert "The report stage has not run" in result.output


def test_compare_two_pipeline_runs(micro_run, tmp_path):
    """A second run on a copy scores only the first test documents: every number moves, and --compare shows it."""
    from flows.pipeline import run_pipeline

    ws, out, overrides = micro_run
    copy = Workspace.resolve(tmp_path / "ws")
    shutil.copytree(ws.root, copy.root, dirs_exist_ok=True)
    second = run_pipeline(str(copy.root), preset="tiny", overrides=[*overrides, "report.max_test_tokens=600"],
                          only=("report",))
    assert second["_statuses"] == {"report": "completed"}
    capped = _report(copy, second)
    split = capped["test_split"]
    assert split["documents_scored"] < split["documents"] and split["tokens_scored"] <= 600
    assert all(g["source"].startswith("scored by the report") for g in capped["generations"])

    result = _invoke("report", "--compare", out["_run_id"], second["_run_id"], "--workspace", copy.root)
    assert result.exit_code == 0, result.output
    assert out["_run_id"][:12] in result.output and second["_run_id"][:12] in result.output
    full = {g["key"]: g["bits_per_byte"] for g in _report(ws, out)["generations"]}
    part = {g["key"]: g["bits_per_byte"] for g in capped["generations"]}
    for key, name in (("unigram", "unigram"), ("ppo", "PPO")):
        line = next(x for x in result.output.splitlines() if x.startswith(f"test bits/byte: {name} "))
        assert f"{part[key] - full[key]:+.3f}" in line and not math.isclose(part[key], full[key])
    md = _invoke("report", "--workspace", copy.root, "--compare", out["_run_id"], second["_run_id"], "--format",
                 "markdown")
    assert md.exit_code == 0 and "| measure |" in md.output
    missing = _invoke("report", "--workspace", copy.root, "--compare", out["_run_id"], "0" * 32)
    assert missing.exit_code == 1 and "no MLflow run" in missing.output


# ----------------------------------------------------------------------------------------------
# the page in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = """<script>window.addEventListener("load", () => {
  const images = [...document.images];
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({tables: document.querySelectorAll("table").length, images: images.length,
    decoded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    rows: document.querySelectorAll("tbody tr").length});
  document.body.appendChild(out);
});</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_headless_chromium_renders_the_tables_and_plots(micro_run, tmp_path):
    ws, out, _ = micro_run
    page = ws.abs(out["report"]["outputs"]["html"]).read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # self-contained: nothing to fetch
    probe = tmp_path / "report.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    found = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom).group(1))
    report = _report(ws, out)
    assert found["tables"] == 1 + len(report["continuations"]["rows"]) + 3  # + alignment, contamination, run
    assert found["images"] == found["decoded"] == 2  # the bits-per-byte and alignment charts, decoded
    assert found["rows"] >= len(report["generations"])
    assert "Evolution report" in dom and "PPO" in dom
