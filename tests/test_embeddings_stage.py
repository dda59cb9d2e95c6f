"""The ``embeddings`` stage end to end on a small built-in corpus; its scorer and ``lmpipe score``."""

import json
import math

import pytest
from click.testing import CliRunner

from lmpipe import embeddings, ngram, scoring, vectors, warehouse
from lmpipe.config import IngestConfig, load_config
from lmpipe.corpus import ingest
from lmpipe.pipeline import get_stage
from lmpipe.stage import RecordingLogger, StageContext, StageResult
from lmpipe.state import save_stage_state
from lmpipe.workspace import Workspace


def _texts(ws, split):
    with warehouse.connect(ws, read_only=True) as con:
        return [r[0] for r in con.execute("SELECT text FROM documents WHERE split = ? ORDER BY doc_id",
                                          [split]).fetchall()]


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embeddings")
    ws = Workspace.resolve(tmp / "ws")
    ingest(ws, IngestConfig(builtin_modules=("json", "collections")), progress=False)
    (tmp / "analogies.txt").write_text(": code\nload loads dump dumps\nkey keys value values\n", encoding="utf-8")
    (tmp / "sim.tsv").write_text("load\tdump\t8\nkey\tvalue\t7\nload\tthe\t1\nload\tzebra\t3\n", encoding="utf-8")
    cfg = load_config("tiny", overrides=[
        "ngram.orders=[1, 2]", "ngram.methods=[addk, kn]", "ngram.sample_tokens=5",
        "embeddings.nnlm_embd=8", "embeddings.nnlm_hidden=16", "embeddings.rnn_embd=8", "embeddings.rnn_hidden=16",
        "embeddings.lm_epochs=2", "embeddings.w2v_dim=16", "embeddings.w2v_epochs=2", "embeddings.w2v_min_count=2",
        "embeddings.w2v_variants=[sg-ns, cbow-hs]", "embeddings.sample_tokens=5", "embeddings.w2v_threads=2",
        f"embeddings.analogy_file={tmp / 'analogies.txt'}", f"embeddings.similarity_files=[{tmp / 'sim.tsv'}]",
        "embeddings.probe_words=[load, json]", "embeddings.threads=1",
    ])
    key = "0123456789abcdef0123"
    ng_ctx = StageContext(ws, cfg, {}, ws.stage_dir("ngram", key), RecordingLogger(), progress=False)
    ng = ngram.run_stage(ng_ctx)
    ng_result = StageResult("ngram", key, ng.fingerprint, ng.outputs, ng.metrics)
    log = RecordingLogger()
    ctx = StageContext(ws, cfg, {"ngram": ng_result}, ws.stage_dir("embeddings", key), log, progress=False)
    out = embeddings.run_stage(ctx)
    result = StageResult("embeddings", key, out.fingerprint, out.outputs, out.metrics, out.summary)
    save_stage_state(ws, "embeddings", "completed", result, None, None)
    return ws, cfg, out, log, result, ng


def test_stage_is_registered_after_ngram():
    stage = get_stage("embeddings")
    assert stage.deps == ("ngram",) and stage.section == "embeddings"
    assert "embeddings" in scoring.SCORERS


def test_language_models_join_the_ngram_comparison(stage_run):
    ws, _, out, log, _, ng = stage_run
    table = ws.abs(out.outputs["comparison"]).read_text(encoding="utf-8")
    for row in ("| kn | 2 |", "| addk | 1 |", "| nnlm | 4 |", "| rnnlm | lstm |"):
        assert row in table
    for kind in ("nnlm", "rnnlm"):
        bpb = out.metrics[f"{kind}_test_bits_per_byte"]
        assert math.isfinite(bpb) and bpb > 0
        assert f"{kind}.val_loss" in log.latest or f"{kind}.train_loss" in log.latest
    assert "## nnlm" in log.texts["embeddings_samples.md"] and "## rnnlm" in log.texts["embeddings_samples.md"]
    c = vectors.load_text(ws.abs(out.outputs["lm"]).parent / "nnlm_vectors.txt")
    assert c.words[:3] == ["<unk>", "<s>", "</s>"] and c.vectors.shape[1] == 8


def test_word2vec_outputs_losses_and_evaluation(stage_run):
    ws, cfg, out, log, _, _ = stage_run
    for variant in ("sg-ns", "cbow-hs"):
        folder = ws.abs(out.outputs[f"w2v_{variant}"])
        text, binary = vectors.load_text(folder / "vectors.txt"), vectors.load_binary(folder / "vectors.bin")
        assert text.words == binary.words and binary.vectors.shape[1] == 16
        assert (folder / "projector" / "vectors.tsv").exists() and (folder / "pca.png").exists()
        # the loss is reported during training (steps in words) and per epoch
        during = [v for v, step in log.history if f"w2v_{variant}.loss" in v]
        assert during and all(math.isfinite(v[f"w2v_{variant}.loss"]) for v in during)
        assert [s for v, s in log.history if f"w2v_{variant}.epoch_loss" in v] == [0, 1]
        assert "**json**" in log.texts[f"w2v_{variant}_neighbours_epoch2.md"]
        m = out.metrics
        assert m[f"w2v_{variant}_words_per_s"] > 0
        assert m[f"w2v_{variant}_analogy_questions"] == 2 and 0 <= m[f"w2v_{variant}_analogy_accuracy"] <= 1
        assert m[f"w2v_{variant}_sim_pairs"] == 4 and m[f"w2v_{variant}_sim_oov_share"] >= 0.25


def test_scorer_reproduces_stage_metrics(stage_run):
    ws, _, out, _, result, _ = stage_run
    test = _texts(ws, "test")
    s = scoring.score(ws, result, test)
    assert s.model == "nnlm" and s.bits_per_byte == pytest.approx(out.metrics["nnlm_test_bits_per_byte"], rel=1e-5)
    r = scoring.score(ws, result, test, {"method": "rnnlm"})
    assert r.bits_per_byte == pytest.approx(out.metrics["rnnlm_test_bits_per_byte"], rel=1e-5)
    with pytest.raises(KeyError):
        scoring.score(ws, result, test, {"method": "kn"})


def test_score_command(stage_run, tmp_path):
    from lmpipe.cli import main

    ws = stage_run[0]
    path = tmp_path / "text.txt"
    path.write_text("Return the JSON object.\nA dict subclass for counting.\n", encoding="utf-8")
    res = CliRunner().invoke(main, ["score", str(path), "--stage", "embeddings", "--workspace", str(ws.root), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["model"] == "nnlm" and data["bytes"] == len("Return the JSON object.") + 1 + len(
        "A dict subclass for counting.") + 1


def test_presets_configure_the_stage():
    tiny, gpu = load_config("tiny").embeddings, load_config("gpu").embeddings
    assert tiny.w2v_variants == ("sg-ns",) and tiny.nnlm_embd < gpu.nnlm_embd
    assert gpu.w2v_device == "cuda" and set(gpu.w2v_variants) == {"sg-ns", "sg-hs", "cbow-ns", "cbow-hs"}
