"""The pretrain stage end to end on tiny shards written here: files, metrics, bits per byte, resume, CLI."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lmpipe import pretrain as pt
from lmpipe.bpe import train_tokenizer
from lmpipe.checkpoint import checkpoint_steps, load_model_folder
from lmpipe.config import ConfigError, PretrainConfig, TokenizerConfig, load_config
from lmpipe.gpt import GPT, GPTConfig
from lmpipe.stage import RecordingLogger, StageContext, StageResult

torch.set_num_threads(1)

CFG = PretrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, max_steps=6, warmup_steps=2,
                     lr=1e-2, min_lr=1e-3, eval_every=3, eval_iters=2, save_every=2, sample_tokens=8,
                     sample_prompts=("Return the", "The module"), device="cpu", export_hf=False)


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    verbs, things = ["Return", "Compute", "Build", "Parse"], ["the sum", "a list", "the path", "one value", "été 中文"]
    return [f"{rng.choice(verbs)} {rng.choice(things)} of {rng.choice(things)}." for _ in range(n)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """tokenizer.json and train/val/test shards in the tokenizer stage's format (uint16, meta.json)."""
    out = tmp_path_factory.mktemp("shards")
    splits = {"train": documents(400, 0), "val": documents(20, 1), "test": documents(20, 2)}
    tok = train_tokenizer([splits["train"]], TokenizerConfig(vocab_size=300))
    tok.save(str(out / "tokenizer.json"))
    meta = {"dtype": "uint16", "vocab_size": tok.get_vocab_size(), "eot_id": 0, "pad_id": 1,
            "tokenizer_sha256": "test", "splits": {}}
    for split, docs in splits.items():
        ids = [i for d in docs for i in [*tok.encode(d).ids, 0]]
        np.asarray(ids, dtype=np.uint16).tofile(out / f"{split}.bin")
        meta["splits"][split] = {"tokens": len(ids), "documents": len(docs),
                                 "bytes": sum(len(d.encode("utf-8")) + 1 for d in docs)}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_pretrain_learns_and_reports_bits_per_byte(tmp_path, shard_dir):
    result = pt.pretrain(replace(CFG, max_steps=12, save_every=6), shard_dir, shard_dir / "tokenizer.json",
                         tmp_path, progress=False)
    assert {p.name for p in result.model_dir.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["vocab_size"] == 320 and config["tokenizer_vocab_size"] == 300  # padded to a multiple of 64
    assert len(result.losses) == 12 and np.mean(result.losses[-3:]) < np.mean(result.losses[:3]) - 0.5
    m = result.metrics
    assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
    # bits per byte recomputed from the saved model: all val tokens' nats / ln 2 / the split's bytes
    model = load_model_folder(result.model_dir)
    meta = json.loads((shard_dir / "meta.json").read_text())
    val = np.fromfile(shard_dir / "val.bin", dtype=np.uint16)
    nats, n = pt.split_nats(model, val, batch_size=3)
    assert n == len(val)
    # the stage scores under its autocast precision (bf16 on CPUs that compute it natively), this in float32:
    # they agree to about 1e-5; one token left out of the count would move it by 1e-3
    assert m["val_bpb"] == pytest.approx(nats / math.log(2) / meta["splits"]["val"]["bytes"], rel=1e-4)
    assert m["test_bpb"] > 0 and m["tokens_trained"] == 12 * 4 * 32
    assert checkpoint_steps(tmp_path / "checkpoints") == [6, 12]


def test_uniform_model_costs_log2_vocab_bits_per_token():
    model = GPT(GPTConfig(vocab_size=64, block_size=4, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.wte.weight.zero_()  # tied output embedding: every logit 0, a uniform prediction
    tokens = np.arange(2, 12, dtype=np.uint16)  # 10 tokens: 3 windows of 4, the last one half padding
    nats, n = pt.split_nats(model, tokens, batch_size=2)
    assert n == 10 and nats == pytest.approx(10 * math.log(64), rel=1e-6)
    assert pt.bits_per_byte(nats, 20) == pytest.approx(10 * 6 / 20)  # log2(64) = 6 bits per token, 20 bytes


def test_killed_stage_resumes_to_the_same_model(tmp_path, shard_dir, monkeypatch):
    whole = pt.pretrain(CFG, shard_dir, shard_dir / "tokenizer.json", tmp_path / "a", progress=False)

    original = pt.NextTokenObjective.batches

    def killed_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return original(self, step)

    monkeypatch.setattr(pt.NextTokenObjective, "batches", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pt.pretrain(CFG, shard_dir, shard_dir / "tokenizer.json", tmp_path / "b", progress=False)
    assert checkpoint_steps(tmp_path / "b" / "checkpoints") == [2]
    monkeypatch.setattr(pt.NextTokenObjective, "batches", original)
    again = pt.pretrain(CFG, shard_dir, shard_dir / "tokenizer.json", tmp_path / "b", progress=False)

    assert again.losses == whole.losses
    assert (again.model_dir / "model.safetensors").read_bytes() == (whole.model_dir / "model.safetensors").read_bytes()
    assert again.metrics == whole.metrics
    assert again.samples == whole.samples and "step 6" in again.samples


def _context(workspace, shard_dir, log) -> StageContext:
    tokenizer_result = StageResult("tokenizer", "k", "f", {"tokenizer": workspace.rel(shard_dir / "tokenizer.json"),
                                                           "shards": workspace.rel(shard_dir)}, {})
    cfg = replace(load_config(None), pretrain=replace(CFG, export_hf=True))
    return StageContext(workspace, cfg, {"tokenizer": tokenizer_result}, workspace.stage_dir("pretrain", "k" * 16),
                        log=log, progress=False)


def _copy_shards(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_stage_outputs_logging_scoring_and_generate_command(workspace, shard_dir):
    from lmpipe import cli, scoring
    from lmpipe.state import save_stage_state

    shards_here = _copy_shards(shard_dir, workspace.root / "artifacts" / "tokenizer" / "k")
    log = RecordingLogger()
    out = pt.run_stage(_context(workspace, shards_here, log))
    assert set(out.outputs) == {"model", "tokenizer", "samples", "hf"}
    assert all(workspace.abs(p).exists() for p in out.outputs.values())
    assert len(out.fingerprint) == 32 and "bits per byte" in out.summary
    assert {"val_loss", "val_ppl", "val_bpb", "test_bpb", "params"} <= set(out.metrics)
    assert set(log.texts) == {"samples/step_000000.md", "samples/step_000003.md", "samples/step_000006.md"}
    assert "Return the" in log.texts["samples/step_000006.md"]
    per_step = [s for v, s in log.history if {"train_loss", "lr", "grad_norm", "tokens_per_s"} <= set(v)]
    assert per_step == list(range(6))
    assert "metrics.json" in log.artifacts

    result = StageResult("pretrain", "k" * 64, out.fingerprint, out.outputs, out.metrics)
    texts = ["Return the sum of a list.", "Parse <|endoftext|> été."]
    score = scoring.score(workspace, result, texts)
    model, tok, _ = pt.load_lm(workspace.abs(out.outputs["model"]))
    nats, tokens = pt.score_texts(model, tok, texts)
    enc = [tok.encode(t, add_special_tokens=False).ids for t in ["Return the sum of a list."]]
    assert score.tokens == tokens and tokens > len(enc[0]) + 1  # every text's tokens plus its end-of-text
    assert score.bits_per_byte == pytest.approx(nats / math.log(2) / sum(len(t.encode()) + 1 for t in texts))

    save_stage_state(workspace, "pretrain", "completed", result, None, None)
    run = CliRunner().invoke(cli.main, ["generate", "--workspace", str(workspace.root), "--temperature", "0",
                                        "--max-new-tokens", "5", "Return the", "Parse"])
    assert run.exit_code == 0, run.output
    lines = run.output.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Return the") and lines[1].startswith("Parse")
    text_file = workspace.root / "texts.txt"
    text_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    scored = CliRunner().invoke(cli.main, ["score", str(text_file), "--stage", "pretrain", "--workspace",
                                           str(workspace.root), "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.output)["bits_per_byte"] == pytest.approx(score.bits_per_byte)
    missing = CliRunner().invoke(cli.main, ["generate", "--workspace", str(workspace.root / "none"), "hi"])
    assert missing.exit_code != 0 and "no trained model" in missing.output


def test_presets_and_config_checks():
    tiny, gpu = load_config("tiny").pretrain, load_config("gpu").pretrain
    n = GPT(pt.model_config(tiny, load_config("tiny").tokenizer.vocab_size)).num_params()
    assert 2e6 < n < 10e6  # "a few million parameters"
    assert (gpu.n_layer, gpu.n_head, gpu.n_embd, gpu.block_size) == (12, 12, 768, 1024)
    assert gpu.vocab_multiple == 64 and gpu.dtype == "bfloat16" and gpu.compile
    assert pt.model_config(gpu, 50257).vocab_size == 50304
    with pytest.raises(ConfigError, match="multiple of n_head"):
        load_config("tiny", overrides=["pretrain.n_head=3"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config("tiny", overrides=["pretrain.warmup_steps=5000"])
    with pytest.raises(ConfigError, match="sample_tokens"):
        load_config("tiny", overrides=["pretrain.sample_tokens=256"])
