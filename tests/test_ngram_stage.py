"""The ``ngram`` stage end to end on a small built-in corpus; the scorer and ``lmpipe score``."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from lmpipe import ngram, scoring, warehouse, wordtok
from lmpipe.arpa import read_arpa
from lmpipe.config import IngestConfig, load_config
from lmpipe.corpus import ingest
from lmpipe.stage import RecordingLogger, StageContext, StageResult
from lmpipe.state import save_stage_state
from lmpipe.workspace import Workspace


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    ws = Workspace.resolve(tmp_path_factory.mktemp("ngram") / "ws")
    ingest(ws, IngestConfig(builtin_modules=("json", "collections")), progress=False)
    cfg = load_config("tiny", overrides=["ngram.orders=[1, 2]", "ngram.sample_tokens=5"])
    log = RecordingLogger()
    ctx = StageContext(ws, cfg, {}, ws.stage_dir("ngram", "0123456789abcdef0123"), log, progress=False)
    out = ngram.run_stage(ctx)
    result = StageResult("ngram", "0123456789abcdef0123", out.fingerprint, out.outputs, out.metrics, out.summary)
    save_stage_state(ws, "ngram", "completed", result, None, None)
    return ws, cfg, out, log, result


def _texts(ws, split):
    with warehouse.connect(ws, read_only=True) as con:
        return [r[0] for r in con.execute("SELECT text FROM documents WHERE split = ? ORDER BY doc_id",
                                          [split]).fetchall()]


def test_stage_outputs_and_metrics(stage_run):
    ws, cfg, out, log, _ = stage_run
    for name in ("models", "arpa", "table", "table_csv", "plot"):
        assert ws.abs(out.outputs[name]).exists(), name
    for method in cfg.ngram.methods:
        for order in (1, 2):
            assert f"{method}-{order}.val_bits_per_byte" in log.latest or method == "mle"
            assert (ws.abs(out.outputs["models"]) / f"{method}-{order}.safetensors").exists()
    assert out.metrics["ngrams_order1"] > 0 and out.metrics["ngrams_order2"] > out.metrics["ngrams_order1"]
    assert 0 < out.metrics["oov_rate_val"] < 1
    assert math.isfinite(out.metrics["best_val_bits_per_byte"])
    assert "kn order 2" in log.texts["ngram_samples.md"]
    table = ws.abs(out.outputs["table"]).read_text(encoding="utf-8")
    assert table.count("\n| kn |") == 2


def test_stage_counts_stay_in_the_warehouse_under_the_cache_key(stage_run):
    ws = stage_run[0]
    with warehouse.connect(ws, read_only=True) as con:
        names = {r[0] for r in con.sql("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {"ngram_0123456789abcdef_vocab", "ngram_0123456789abcdef_g2", "ngram_0123456789abcdef_c1"} <= names


def test_bulk_path_matches_small_corpus_fit(stage_run):
    ws, cfg, out, _, _ = stage_run
    train = [wordtok.tokenize(t) for t in _texts(ws, "train")]
    val = [wordtok.tokenize(t) for t in _texts(ws, "val")]
    small = ngram.fit(train, 2, "kn", min_count=cfg.ngram.min_count)
    bulk, _, _ = ngram.load_stage_models(ws.abs(out.outputs["models"]), "kn", 2)
    assert bulk.vocab.words == small.vocab.words
    lp_small = small.token_log10([small.encode(s) for s in val])
    lp_bulk = bulk.token_log10([bulk.encode(s) for s in val])
    np.testing.assert_allclose(lp_bulk, lp_small, rtol=1e-6)  # saved tables hold float32


def test_arpa_of_best_model_scores_like_the_stage(stage_run):
    ws, _, out, _, _ = stage_run
    arpa = read_arpa(ws.abs(out.outputs["arpa"]))
    method, order = ws.abs(out.outputs["arpa"]).stem.split("-")
    saved, _, _ = ngram.load_stage_models(ws.abs(out.outputs["models"]), method, int(order))
    val = [wordtok.tokenize(t) for t in _texts(ws, "val")]
    np.testing.assert_allclose(arpa.perplexity(val), saved.perplexity(val), rtol=1e-5)


def test_scorer_reproduces_stage_metrics(stage_run):
    ws, _, out, log, result = stage_run
    val = _texts(ws, "val")
    s = scoring.score(ws, result, val, {"method": "kn", "order": 2})
    assert s.bits_per_byte == pytest.approx(log.latest["kn-2.val_bits_per_byte"], rel=1e-5)
    assert s.perplexity_unk == pytest.approx(log.latest["kn-2.val_perplexity_unk"], rel=1e-5)
    assert s.perplexity > s.perplexity_unk  # OOV words pay for their spelling
    assert s.bytes == scoring.text_bytes(val) == sum(len(t.encode()) + 1 for t in val)
    best = scoring.score(ws, result, val)
    assert best.bits_per_byte == pytest.approx(out.metrics["best_val_bits_per_byte"], rel=1e-5)


def test_score_command(stage_run, tmp_path):
    from lmpipe.cli import main

    ws = stage_run[0]
    path = tmp_path / "text.txt"
    path.write_text("Return a new dictionary.\nSerialize obj to a JSON formatted str.\n", encoding="utf-8")
    res = CliRunner().invoke(main, ["score", str(path), "--workspace", str(ws.root), "--json", "--order", "1",
                                    "--method", "addk"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["model"] == "ngram addk order 1" and data["bytes"] == len(path.read_bytes())
    res = CliRunner().invoke(main, ["score", str(path), "--workspace", str(ws.root), "--order", "7"])
    assert res.exit_code != 0 and "no " in res.output


def test_ngram_scorer_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from lmpipe import scoring; scoring.scorer('ngram'); "
            "assert 'torch' not in sys.modules and 'prefect' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
