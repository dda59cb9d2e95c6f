"""The sft stage: packing without cross-example attention, response-only loss, training from the pretrained
model, early stopping, exact resume, evaluation reports, scoring and the generate command."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lmpipe import instructions, sft
from lmpipe.bpe import END_ID, PAD_ID, train_tokenizer
from lmpipe.chat import ChatTemplate, Rendered, conversation
from lmpipe.checkpoint import checkpoint_steps, load_model_folder, save_model_folder
from lmpipe.config import ConfigError, IngestConfig, SftConfig, TokenizerConfig, load_config
from lmpipe.gpt import GPT, GPTConfig
from lmpipe.stage import RecordingLogger, StageContext, StageResult

torch.set_num_threads(1)

CFG = SftConfig(batch_size=4, max_steps=30, warmup_steps=3, lr=1e-2, min_lr=1e-3, eval_every=10, eval_examples=0,
                patience=0, heldout_prompts=6, max_new_tokens=12, sample_rows=4, save_every=10, log_every=100,
                device="cpu", builtin=False)
NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "iota", "lambda", "rho"]


def tiny_gpt(vocab_size: int, seed: int = 0, block_size: int = 64) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a (random) 'pretrained' model folder, corpus shards and an instruction file."""
    root = tmp_path_factory.mktemp("sft-assets")
    docs = [f"Return the value of {n}." for n in NAMES] + [f"What does `mod.{n}` do?" for n in NAMES]
    tok = train_tokenizer([docs * 5], TokenizerConfig(vocab_size=320))
    model_dir = save_model_folder(tiny_gpt(384), root / "pretrained", {"eot_id": 0, "pad_id": 1})
    tok.save(str(model_dir / "tokenizer.json"))
    shard_dir = root / "shards"
    shard_dir.mkdir()
    meta = {"dtype": "uint16", "vocab_size": 320, "eot_id": 0, "pad_id": 1, "tokenizer_sha256": "t", "splits": {}}
    for split, texts in {"train": docs, "test": docs[:4]}.items():
        ids = [i for d in texts for i in [*tok.encode(d).ids, 0]]
        np.asarray(ids, dtype=np.uint16).tofile(shard_dir / f"{split}.bin")
        meta["splits"][split] = {"tokens": len(ids), "documents": len(texts),
                                 "bytes": sum(len(d.encode()) + 1 for d in texts)}
    (shard_dir / "meta.json").write_text(json.dumps(meta))
    # every answer has the same shape, so a held-out object's answer can be learned from the train ones
    records = [{"prompt": f"What does `mod.{n}{i}` do?", "response": "Return the value.",
                "split": "train" if i < 6 else ("val" if i < 8 else "test")} for i in range(10) for n in NAMES]
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {"model": model_dir, "shards": shard_dir, "data": path}


@pytest.fixture
def ws(workspace, assets):
    instructions.ingest_files(workspace, [str(assets["data"])], IngestConfig())
    return workspace


# ----------------------------------------------------------------------------------------------
# packing


def test_targets_cover_the_response_only():
    r = Rendered(ids=[0, 3, 50, 5, 4, 60, 61, 5], mask=[0, 0, 0, 0, 0, 1, 1, 1])
    x, y = sft.to_example(r, block_size=16)
    assert x.tolist() == [0, 3, 50, 5, 4, 60, 61]
    assert y.tolist() == [-100, -100, -100, -100, 60, 61, 5]  # predict the answer and its <|end|> only
    x, y = sft.to_example(r, block_size=5)  # too long: keeps the first block_size + 1 tokens
    assert x.tolist() == [0, 3, 50, 5, 4] and y.tolist() == [-100, -100, -100, -100, 60]


def test_pack_and_collate_by_hand():
    assert sft.pack_rows([3, 2, 4, 1], [0, 1, 2, 3], 5) == [[0, 1], [2, 3]]
    assert sft.pack_rows([3, 2, 4, 1], [2, 0, 3, 1], 5) == [[2], [0, 3], [1]]
    examples = [(np.array([7, 8, 9]), np.array([-100, 8, 9])), (np.array([5, 6]), np.array([6, -100]))]
    b = sft.collate(examples, [[0, 1], [1]], 6)
    assert b.x.tolist() == [[7, 8, 9, 5, 6, PAD_ID], [5, 6, PAD_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert b.y.tolist() == [[-100, 8, 9, 6, -100, -100], [6, -100, -100, -100, -100, -100]]
    assert b.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 0, 0]]
    assert b.segments.tolist() == [[0, 0, 0, 1, 1, -1], [0, 0, -1, -1, -1, -1]]
    mask = b.attention_mask()[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                    [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]


def test_a_packed_example_computes_exactly_as_alone():
    model = tiny_gpt(64, block_size=16).eval()
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(6, 64, (n,), generator=g).numpy(), np.zeros(n, dtype=np.int64)) for n in (5, 7, 3)]
    batch = sft.collate(examples, [[0, 1, 2]], 16)
    with torch.no_grad():
        packed, _ = model(batch.x, positions=batch.positions, attn_mask=batch.attention_mask())
        start = 0
        for x, _ in examples:
            alone, _ = model(torch.from_numpy(x)[None])
            torch.testing.assert_close(packed[0, start : start + len(x)], alone[0], rtol=1e-5, atol=1e-5)
            start += len(x)


def test_row_stream_is_a_pure_function_of_the_row_index():
    lengths = [3, 5, 2, 4, 6, 1, 2]
    a, b = sft.RowStream(lengths, 8, seed=1), sft.RowStream(lengths, 8, seed=1)
    late = b.rows(9, 4)  # asked out of order, across epoch boundaries
    assert a.rows(0, 13)[9:] == late
    first_epoch = a.epochs[0]
    assert sorted(i for row in first_epoch for i in row) == list(range(7))  # an epoch uses every example once
    assert all(sum(lengths[i] for i in row) <= 8 for row in first_epoch)
    assert a.epochs[0] != a.epochs[1]  # each epoch is shuffled anew


# ----------------------------------------------------------------------------------------------
# the stage


def _context(ws, assets, cfg: SftConfig, log=None, key: str = "k") -> StageContext:
    local = ws.root / "inputs"
    if not local.exists():
        local.mkdir()
        for name in ("model", "shards"):
            (local / name).mkdir()
            for f in assets[name].iterdir():
                (local / name / f.name).write_bytes(f.read_bytes())
    inputs = {"ingest": StageResult("ingest", "k", "f", {}, {}),
              "tokenizer": StageResult("tokenizer", "k", "f", {"shards": "inputs/shards"}, {}),
              "pretrain": StageResult("pretrain", "k", "f", {"model": "inputs/model"}, {})}
    config = replace(load_config(None), sft=cfg)
    return StageContext(ws, config, inputs, ws.stage_dir("sft", key * 16), log=log or RecordingLogger(), progress=False)


def test_stage_trains_on_responses_and_beats_the_pretrained_model(ws, assets):
    log = RecordingLogger()
    out = sft.run_stage(_context(ws, assets, CFG, log))
    assert {"model", "tokenizer", "metrics", "comparison", "samples", "samples_json"} <= set(out.outputs)
    assert all(ws.abs(p).exists() for p in out.outputs.values())
    m = out.metrics
    assert (m["examples_train"], m["examples_val"], m["examples_test"]) == (72, 24, 24)
    assert m["steps"] == 30 and m["stopped_early"] == 0 and m["best_step"] in (10, 20, 30)
    # the answers' shape is learnable: response loss falls far below the pretrained model's
    assert m["val_response_loss"] < 0.5 < 3 < m["pretrained_val_response_loss"]
    assert m["test_response_ppl"] == pytest.approx(math.exp(m["test_response_loss"]))
    # greedy answers to 6 held-out prompts: the tuned model says "Return the value."; the random one does not
    assert m["heldout_prompts"] == 6
    assert m["heldout_token_f1"] == pytest.approx(1.0) and m["pretrained_heldout_token_f1"] < 0.2
    assert m["heldout_token_f1_gain"] == pytest.approx(m["heldout_token_f1"] - m["pretrained_heldout_token_f1"])
    assert m["test_bpb"] > 0 and m["pretrained_test_bpb"] > 0

    rows = json.loads(ws.abs(out.outputs["samples_json"]).read_text())
    assert len(rows) == 4 and all(r["sft"] == "Return the value." for r in rows)
    assert all(r["sft_token_f1"] == 1.0 and r["prompt"].startswith("What does `mod.") for r in rows)
    table = ws.abs(out.outputs["comparison"]).read_text()
    assert "| pretrained |" in table and "| sft |" in table and "| change |" in table
    assert {"samples.md", "comparison.md", "metrics.json"} <= set(log.artifacts)
    per_step = [s for v, s in log.history if "train_loss" in v]
    assert per_step == list(range(30))
    config = json.loads((ws.abs(out.outputs["model"]) / "config.json").read_text())
    assert config["chat_template"] == "lmpipe-chat-1" and config["eot_id"] == 0
    assert sft.is_chat_model(ws.abs(out.outputs["model"])) and not sft.is_chat_model(assets["model"])

    _check_scoring_and_generate(ws, out)


def _check_scoring_and_generate(ws, out):
    from lmpipe import cli, scoring
    from lmpipe.state import save_stage_state

    result = StageResult("sft", "k" * 64, out.fingerprint, out.outputs, out.metrics)
    score = scoring.score(ws, result, ["Return the value."])
    assert score.tokens > 2 and score.bits_per_byte > 0
    save_stage_state(ws, "sft", "completed", result, None, None)
    run = CliRunner().invoke(cli.main, ["generate", "--stage", "sft", "--workspace", str(ws.root),
                                        "--temperature", "0", "--max-new-tokens", "10", "What does `mod.beta9` do?"])
    assert run.exit_code == 0, run.output
    assert run.output.strip() == "Return the value."


def test_answers_stop_at_the_end_of_turn(assets):
    model, tok, _ = sft.load_lm(assets["model"])
    template = ChatTemplate(tok)

    class AlwaysEnd(torch.nn.Module):  # an output head whose most likely token is always <|end|>
        def forward(self, h):
            return torch.nn.functional.one_hot(torch.full(h.shape[:-1], END_ID), model.config.vocab_size).float()

    model.lm_head = AlwaysEnd()
    assert sft.answer(model, template, ["Hi", conversation("Yo")], 8) == ["", ""]


def test_early_stopping_keeps_the_best_model(ws, assets):
    # nothing counts as better after the first evaluation (min_delta is huge): two evaluations later it stops
    cfg = replace(CFG, max_steps=50, eval_every=2, patience=2, min_delta=100.0, save_every=0)
    ctx = _context(ws, assets, cfg)
    out = sft.run_stage(ctx)
    m = out.metrics
    assert (m["steps"], m["best_step"], m["stopped_early"]) == (4, 0, 1)
    # the best model is the one evaluated at step 0: the pretrained weights
    tuned, base = load_model_folder(ws.abs(out.outputs["model"])), load_model_folder(assets["model"])
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values(), strict=True))
    assert checkpoint_steps(ctx.out_dir / "checkpoints") == [4]
    state = json.loads((ctx.out_dir / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["stopped"] is True
    again = sft.run_stage(ctx)  # running the stopped stage again trains no further
    assert again.metrics["steps"] == 4 and checkpoint_steps(ctx.out_dir / "checkpoints") == [4]


def test_killed_stage_resumes_to_the_same_model(ws, assets, monkeypatch):
    cfg = replace(CFG, max_steps=12, eval_every=4, save_every=4)
    whole = sft.run_stage(_context(ws, assets, cfg, key="a"))

    original = sft.InstructionObjective.batches

    def killed_at_step_6(self, step):
        if step == 6:
            raise KeyboardInterrupt("killed")
        return original(self, step)

    monkeypatch.setattr(sft.InstructionObjective, "batches", killed_at_step_6)
    ctx = _context(ws, assets, cfg, key="b")
    with pytest.raises(KeyboardInterrupt):
        sft.run_stage(ctx)
    assert checkpoint_steps(ctx.out_dir / "checkpoints") == [4]
    monkeypatch.setattr(sft.InstructionObjective, "batches", original)
    again = sft.run_stage(ctx)
    assert ws.abs(again.outputs["model"]).joinpath("model.safetensors").read_bytes() == ws.abs(
        whole.outputs["model"]).joinpath("model.safetensors").read_bytes()
    a, b = (json.loads(ws.abs(o.outputs["metrics"]).read_text()) for o in (whole, again))
    assert a["losses"] == b["losses"] and a["metrics"] == b["metrics"]


def test_presets_and_config_checks():
    tiny, gpu = load_config("tiny").sft, load_config("gpu").sft
    assert tiny.builtin and tiny.max_steps * tiny.batch_size <= 4000  # a couple of minutes on 2 CPU cores
    assert gpu.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="sft.batch_size"):
        load_config("tiny", overrides=["sft.batch_size=0"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config("tiny", overrides=["sft.warmup_steps=100000"])
    with pytest.raises(ConfigError, match="patience"):
        load_config("tiny", overrides=["sft.patience=-1"])


def test_cache_key_follows_instruction_files_and_rows_ingested_elsewhere(workspace, tmp_path):
    from lmpipe.pipeline import get_stage

    stage, mine = get_stage("sft"), tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"prompt": "P", "response": "R"}) + "\n", encoding="utf-8")
    inputs = {d: StageResult(d, "k", "f", {}, {}) for d in stage.deps}
    cfg = load_config("tiny", overrides=[f"sft.sources=[{mine}]"])
    key = stage.cache_key(workspace, cfg, inputs)
    instructions.ingest_files(workspace, [str(mine)], cfg.ingest)  # what the stage itself does: same key
    assert stage.cache_key(workspace, cfg, inputs) == key
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "Q", "response": "S"}) + "\n", encoding="utf-8")
    instructions.ingest_files(workspace, [str(other)], cfg.ingest)  # e.g. `lmpipe ingest --kind instructions`
    changed = stage.cache_key(workspace, cfg, inputs)
    assert changed != key
    mine.write_text(json.dumps({"prompt": "P", "response": "R2"}) + "\n", encoding="utf-8")
    assert stage.cache_key(workspace, cfg, inputs) != changed


@pytest.mark.parametrize("builtin", [True, False])
def test_no_instructions_is_an_error_that_says_what_to_give(workspace, builtin):
    # a workspace whose corpus is the user's own: no stdlib objects, so no built-in set either
    with pytest.raises(ValueError, match="no train instructions") as e:
        sft.prepare_data(workspace, SftConfig(builtin=builtin), IngestConfig())
    assert "sft.sources" in str(e.value) and "lmpipe ingest --kind instructions" in str(e.value)
    assert ("sft.builtin: false" in str(e.value)) != builtin
