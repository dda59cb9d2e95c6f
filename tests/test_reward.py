"""The reward stage: the Bradley-Terry loss by hand, group batches, the scalar head, baselines, calibration,
training from the SFT model, the floor for PPO, exact resume and the score-reward command."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lmpipe import preferences as prefs
from lmpipe import reward, warehouse
from lmpipe.bpe import PAD_ID, train_tokenizer
from lmpipe.chat import ChatTemplate
from lmpipe.checkpoint import checkpoint_steps, save_model_folder
from lmpipe.config import ConfigError, IngestConfig, RewardConfig, TokenizerConfig, load_config
from lmpipe.corpus import text_hash
from lmpipe.gpt import GPT, GPTConfig
from lmpipe.preferences import Pair
from lmpipe.pretrain import load_lm
from lmpipe.stage import RecordingLogger, StageContext, StageResult

torch.set_num_threads(1)

NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "iota", "lambda", "rho"]
CFG = RewardConfig(builtin=False, batch_size=8, max_steps=40, warmup_steps=4, lr=3e-3, min_lr=3e-4, eval_every=20,
                   eval_pairs=0, save_every=20, log_every=100, device="cpu", min_accuracy=0.6)


# ----------------------------------------------------------------------------------------------
# the math, by hand


def test_bradley_terry_loss_by_hand():
    rc, rr = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 0.0])
    # -log σ(2) = log(1 + e^-2) = 0.126928; -log σ(0) = log 2 = 0.693147; -log σ(1) = 0.313262
    assert reward.bradley_terry_loss(rc[:1], rr[:1]).item() == pytest.approx(0.126928, abs=1e-6)
    assert reward.bradley_terry_loss(rc, rr).item() == pytest.approx((0.126928 + 0.693147 + 0.313262) / 3, abs=1e-6)
    # a margin of 1 asks for a gap of 1: a gap of exactly 1 costs log 2, a gap of 2 costs -log σ(1)
    assert reward.bradley_terry_loss(rc[2:], rr[2:], margin=1.0).item() == pytest.approx(0.693147, abs=1e-6)
    assert reward.bradley_terry_loss(rc[:1], rr[:1], margin=1.0).item() == pytest.approx(0.313262, abs=1e-6)
    weight = torch.tensor([0.25, 0.75, 0.0])  # weights sum to one: 0.25·0.126928 + 0.75·0.693147 = 0.551592
    assert reward.bradley_terry_loss(rc, rr, weight=weight).item() == pytest.approx(0.551592, abs=1e-6)
    # gradient: d/dr_chosen = -σ(r_rejected - r_chosen) = -0.5 at a tie, and the opposite for r_rejected
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    reward.bradley_terry_loss(a, b).backward()
    assert (a.grad.item(), b.grad.item()) == (pytest.approx(-0.5), pytest.approx(0.5))


def test_accuracy_interval_resamples_whole_prompts():
    # prompt a: 3 pairs, all right; prompt b: 1 pair, wrong. Resampling the two prompts gives {a, a} (accuracy 1),
    # {b, b} (0), each with probability 1/4, or {a, b} (3/4) with probability 1/2: the 95% interval is [0, 1]
    delta, groups = np.array([1.0, 2.0, 0.5, -1.0]), ["a", "a", "a", "b"]
    assert reward.accuracy_interval(delta, groups) == (0.0, 1.0)
    low, high = reward.accuracy_interval(delta, groups, level=0.4)  # the middle 40% is all {a, b}
    assert low == high == 0.75
    # a bootstrap over pairs instead would have put 0.75 in a far narrower interval; one prompt per pair does
    many = np.tile([1.0, 1.0, 1.0, -1.0], 100)
    low, high = reward.accuracy_interval(many, [str(i) for i in range(400)], seed=1)
    assert low < 0.75 < high and high - low == pytest.approx(2 * 1.96 * math.sqrt(0.75 * 0.25 / 400), abs=0.015)
    assert reward.accuracy_interval(np.array([1.0, 3.0]), ["a", "b"]) == (1.0, 1.0)
    # the gain over a baseline on the same resampled prompts: per prompt a, 3 right against 2 of 3 (+1 over 3
    # pairs); b, 0 against 1 of 1 (-1 over 1). {a, a}: +2/6, {b, b}: -2/2, {a, b}: 0/4
    base = np.array([1.0, -1.0, 1.0, 1.0])
    assert reward.accuracy_interval(delta, groups, baseline=base) == pytest.approx((-1.0, 1 / 3))
    assert reward.accuracy_interval(delta, groups, baseline=base, level=0.4) == (0.0, 0.0)
    assert all(math.isnan(x) for x in reward.accuracy_interval(np.array([]), []))


def test_pairwise_accuracy_calibration_and_longer_baseline_by_hand():
    assert reward.pairwise_accuracy(np.array([1.0, -1.0, 0.0, 2.0])) == 0.625  # (2 right + half a tie) / 4
    assert math.isnan(reward.pairwise_accuracy(np.array([])))
    rows = reward.calibration(np.array([0.1, -0.2, 0.3, 0.4]), buckets=2)  # |Δ| median 0.25 splits them 2 / 2
    assert [(r["pairs"], r["accuracy"]) for r in rows] == [(2.0, 0.5), (2.0, 1.0)]
    assert rows[0]["mean_margin"] == pytest.approx(0.15)
    assert rows[1]["predicted"] == pytest.approx(1 / (1 + math.exp(-0.35)))
    pairs = [Pair("q", "long answer", "short"), Pair("q", "tiny", "longer one"), Pair("q", "same", "emas")]
    assert reward.longer_baseline(pairs).tolist() == [6.0, -6.0, 0.0]
    table = reward.accuracy_table({"m": np.array([1.0, 1.0, -1.0])}, ["truncated", "ranked", "ranked"])
    assert table["all"] == {"m": pytest.approx(2 / 3), "pairs": 3.0}
    assert table["corrupted"]["m"] == 1.0 and table["ranked"] == {"m": 0.5, "pairs": 2.0}
    assert table["truncated"] == {"m": 1.0, "pairs": 1.0}


def test_bag_of_words_learns_word_preferences():
    train = [Pair("q", f"good answer {n}", f"bad answer {n}") for n in NAMES[:8]]
    train += [Pair("q", f"fine {n}", f"poor {n}") for n in NAMES[:8]]
    bow = reward.BagOfWords()
    model = bow.build_vocab(train).fit(bow.difference(train), l2=1e-3)
    held = [Pair("q", "a good one", "a bad one"), Pair("q", "poor", "fine"), Pair("q", "unseen", "words")]
    delta = model.delta(held)
    assert delta[0] > 1 and delta[1] < -1 and delta[2] == 0.0  # unknown words score 0: a tie
    assert model.w[model.vocab["good"]] > 0 > model.w[model.vocab["bad"]]


def test_collate_keeps_groups_whole_and_weighs_them_equally():
    g1 = reward.Group([[5, 6, 7], [5, 8], [5, 9, 9, 9]], [(0, 1), (0, 2), (1, 2)], ["ranked"] * 3)
    g2 = reward.Group([[4, 4], [4]], [(1, 0)], ["truncated"])
    b = reward.collate([g1, g2])
    assert b.idx.tolist() == [[5, 6, 7, PAD_ID], [5, 8, PAD_ID, PAD_ID], [5, 9, 9, 9], [4, 4, PAD_ID, PAD_ID],
                              [4, PAD_ID, PAD_ID, PAD_ID]]
    assert b.last.tolist() == [2, 1, 3, 1, 0] and b.tokens == 12
    assert b.chosen.tolist() == [0, 0, 1, 4] and b.rejected.tolist() == [1, 2, 2, 3]
    assert b.weight.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])  # each group weighs 1/2


def test_group_stream_is_a_pure_function_of_the_position():
    whole = reward.group_stream(5, 0, 12, seed=3)
    assert sorted(whole[:5]) == list(range(5)) and sorted(whole[5:10]) == list(range(5))  # epochs are permutations
    assert reward.group_stream(5, 7, 5, seed=3) == whole[7:12]


def tiny_net(vocab_size: int = 64, seed: int = 0) -> reward.RewardNet:
    torch.manual_seed(seed)
    return reward.RewardNet(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16))


def test_the_reward_is_read_at_the_last_token_and_padding_after_it_changes_nothing():
    net = tiny_net().eval()
    alone = net(torch.tensor([[7, 8, 9]]), torch.tensor([2]))
    batch = reward.collate([reward.Group([[7, 8, 9], [3, 4, 5, 6, 7, 8]], [], [])])
    together = net(batch.idx, batch.last)
    assert together[0].item() == pytest.approx(alone.item(), abs=1e-6)
    assert net(torch.tensor([[7, 8, 10]]), torch.tensor([2])).item() != pytest.approx(alone.item())
    assert reward.score_sequences(net, [[3, 4, 5, 6, 7, 8], [7, 8, 9]], batch_size=1)[1] == pytest.approx(alone.item())
    assert reward.fit_length(list(range(20)), 16) == list(range(4, 20))  # the end is kept


def test_check_floor():
    reward.check_floor(0.7, 0.6)
    with pytest.raises(reward.WeakRewardModel, match=r"accuracy 0\.550 is below the floor 0\.600"):
        reward.check_floor(0.55, 0.6)
    with pytest.raises(reward.WeakRewardModel, match="no held-out pairs"):
        reward.check_floor(math.nan, 0.0)


# ----------------------------------------------------------------------------------------------
# the stage


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a random 'SFT' chat model folder and a preference file only word order can solve."""
    root = tmp_path_factory.mktemp("reward-assets")
    docs = [f"Return the value of {n}." for n in NAMES] + [f"What does `mod.{n}` do?" for n in NAMES]
    tok = train_tokenizer([docs * 5], TokenizerConfig(vocab_size=320))
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=384, block_size=64, n_layer=2, n_head=2, n_embd=32))
    model_dir = save_model_folder(gpt, root / "sft", {"eot_id": 0, "pad_id": 1, "chat_template": "lmpipe-chat-1"})
    tok.save(str(model_dir / "tokenizer.json"))
    # the rejected answer is the chosen one with its first word moved to the end: same words, same length,
    # so both baselines are at chance and only the order tells them apart
    records = []
    for i in range(10):
        for n in NAMES:
            words = f"Return the value of {n}{i}.".split()
            records.append({"prompt": f"What does `mod.{n}{i}` do?", "chosen": " ".join(words),
                            "rejected": " ".join(words[1:] + words[:1]),
                            "split": "train" if i < 7 else ("val" if i < 8 else "test")})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {"model": model_dir, "data": path}


def _context(ws, assets, cfg: RewardConfig, key: str = "k", log=None, extra: tuple[str, ...] = ()) -> StageContext:
    local = ws.root / "inputs" / "sft"
    if not local.exists():
        local.mkdir(parents=True)
        for f in assets["model"].iterdir():
            (local / f.name).write_bytes(f.read_bytes())
    inputs = {"ingest": StageResult("ingest", "k", "f", {}, {}),
              "sft": StageResult("sft", "k", "f", {"model": "inputs/sft"}, {})}
    config = replace(load_config(None), reward=replace(cfg, sources=(str(assets["data"]), *extra)))
    out_dir = ws.stage_dir("reward", key * 16)
    return StageContext(ws, config, inputs, out_dir, log=log or RecordingLogger(), progress=False)


def test_stage_learns_what_the_baselines_cannot_and_scores_through_the_loader(workspace, assets):
    log = RecordingLogger()
    out = reward.run_stage(_context(workspace, assets, CFG, log=log))
    m = out.metrics
    assert (m["pairs_used_train"], m["pairs_used_val"], m["pairs_used_test"]) == (84, 12, 24)
    assert m["heldout_pairs"] == 24 and m["heldout_pairs_file"] == 24
    assert m["longer_accuracy"] == 0.5 and m["bag_of_words_accuracy"] == 0.5  # same lengths, same bags: ties
    assert m["heldout_accuracy"] > 0.95 and m["val_accuracy"] > 0.95
    assert m["heldout_accuracy_low"] <= m["heldout_accuracy"] <= m["heldout_accuracy_high"] <= 1.0
    assert "95% interval" in out.summary and "95% interval" in ws_file(workspace, out, "evaluation").read_text()
    assert m["steps"] == 40 and m["reward_std"] > 0
    assert {"model", "tokenizer", "metrics", "evaluation", "margins_plot", "calibration_plot"} <= set(out.outputs)
    assert ws_file(workspace, out, "margins_plot").read_bytes()[:4] == b"\x89PNG"
    assert {"evaluation.md", "metrics.json", "reward_margins.png", "calibration.png"} <= set(log.artifacts)
    assert "| file | 24 |" in ws_file(workspace, out, "evaluation").read_text()
    assert [s for v, s in log.history if "train_loss" in v] == list(range(40))

    model_dir = ws_file(workspace, out, "model")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["reward_model"] and config["heldout_accuracy"] == m["heldout_accuracy"]
    assert (config["reward_mean"], config["reward_std"]) == (m["reward_mean"], m["reward_std"])
    rm = reward.RewardModel.load(model_dir, min_accuracy=0.9)
    good, bad = rm.score(["What does `mod.alpha9` do?"] * 2, ["Return the value of alpha9.",
                                                              "the value of alpha9. Return"])
    assert good > bad
    (z,) = rm.score(["What does `mod.alpha9` do?"], ["Return the value of alpha9."], normalize=True)
    # alone or in a batch of two: float32 products of different shapes round differently
    assert z == pytest.approx((good - rm.mean) / rm.std, abs=1e-5)
    weak = workspace.root / "weak"
    weak.mkdir()
    for f in model_dir.iterdir():
        (weak / f.name).write_bytes(f.read_bytes())
    (weak / "config.json").write_text(json.dumps({**config, "heldout_accuracy": 0.55}))
    with pytest.raises(reward.WeakRewardModel, match=r"accuracy 0\.550 is below the floor 0\.600"):
        reward.RewardModel.load(weak, min_accuracy=0.6)
    _check_cli(workspace, out, good)


def ws_file(ws, out, name: str) -> Path:
    return ws.abs(out.outputs[name])


def _check_cli(ws, out, expected: float) -> None:
    from lmpipe import cli
    from lmpipe.state import save_stage_state

    save_stage_state(ws, "reward", "completed", StageResult("reward", "k" * 64, out.fingerprint, out.outputs,
                                                            out.metrics), None, None)
    run = CliRunner().invoke(cli.main, ["score-reward", "--workspace", str(ws.root), "--device", "cpu", "--prompt",
                                        "What does `mod.alpha9` do?", "--response", "Return the value of alpha9."])
    assert run.exit_code == 0, run.output
    assert float(run.output.split()[0]) == pytest.approx(expected, abs=1e-3)


def test_a_weak_reward_model_is_refused_for_ppo(workspace, assets, tmp_path):
    # held-out pairs that contradict the train rule: the trained model gets them wrong, so about half overall
    records = [json.loads(line) for line in assets["data"].read_text().splitlines()]
    flipped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"], "prompt": r["prompt"] + " "}
               for r in records if r["split"] == "test"]
    path = tmp_path / "flipped.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in flipped), encoding="utf-8")
    ctx = _context(workspace, assets, replace(CFG, eval_every=0, save_every=0), extra=(str(path),))
    with pytest.raises(reward.WeakRewardModel, match=r"accuracy 0\.[45]\d+ is below the floor 0\.600"):
        reward.run_stage(ctx)
    assert (ctx.out_dir / "evaluation.md").exists()  # the reports that show why are written first


def test_killed_stage_resumes_to_the_same_model(workspace, assets, monkeypatch):
    cfg = replace(CFG, max_steps=12, eval_every=4, save_every=4)
    whole = reward.run_stage(_context(workspace, assets, cfg, key="a"))
    original = reward.PreferenceObjective.batches

    def killed_at_step_6(self, step):
        if step == 6:
            raise KeyboardInterrupt("killed")
        return original(self, step)

    monkeypatch.setattr(reward.PreferenceObjective, "batches", killed_at_step_6)
    ctx = _context(workspace, assets, cfg, key="b")
    with pytest.raises(KeyboardInterrupt):
        reward.run_stage(ctx)
    assert checkpoint_steps(ctx.out_dir / "checkpoints") == [4]
    monkeypatch.setattr(reward.PreferenceObjective, "batches", original)
    again = reward.run_stage(ctx)
    assert ws_file(workspace, again, "model").joinpath("model.safetensors").read_bytes() == ws_file(
        workspace, whole, "model").joinpath("model.safetensors").read_bytes()
    a, b = (json.loads(ws_file(workspace, o, "metrics").read_text()) for o in (whole, again))
    assert a["losses"] == b["losses"] and a["metrics"] == b["metrics"]


def add_objects(ws, objects: list[tuple[str, str, str]]) -> None:
    """(qualname, docstring, split) into the corpus tables."""
    with warehouse.connect(ws) as con:
        for i, (qualname, doc, split) in enumerate(objects, start=1):
            h = text_hash(doc)
            con.execute("INSERT INTO stdlib_objects VALUES (?, 'function', 'mod', ?, ?, 1)", [qualname, doc, h])
            con.execute("INSERT INTO documents VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)",
                        [i, i, doc, len(doc), len(doc.encode()), h, split, qualname])


def test_builtin_pairs_with_ranked_samples_from_the_sft_model(workspace, assets):
    add_objects(workspace, [(f"mod.{n}", f"Return the value of {n} in the module.", "train" if i < 8 else "test")
                            for i, n in enumerate(NAMES)])
    cfg = replace(CFG, builtin=True, ranked_prompts=6, samples_per_prompt=3, max_new_tokens=6)
    ctx = _context(workspace, assets, cfg)
    counts = reward.prepare_data(workspace, ctx.config.reward, ctx.config.ingest, workspace.root / "inputs" / "sft",
                                 torch.device("cpu"))
    corrupted = sum(n for k, n in counts.items() if k.split("_", 2)[-1] in prefs.CORRUPTIONS)
    ranked_count = sum(n for k, n in counts.items() if k.endswith("_ranked"))
    files = 84 + 12 + 24  # the preference file's pairs are there too
    assert corrupted == 12 and sum(counts[f"pairs_{s}"] for s in prefs.SPLITS) == files + 12 + ranked_count
    ranked = [p for s in prefs.SPLITS for p in prefs.load_pairs(workspace, s) if p.pair_type == "ranked"]
    for p in ranked:  # each ranked pair: a group per prompt, the chosen answer closer to the true summary
        assert p.group_id == f"ranked:{p.object}" and p.chosen != p.rejected
    by_object = {p.object: p.split for s in prefs.SPLITS for p in prefs.load_pairs(workspace, s)}
    assert by_object["mod.rho"] == "test" and by_object["mod.alpha"] == "train"
    groups = reward.build_groups(ChatTemplate(load_lm(workspace.root / "inputs" / "sft")[1]),
                                 prefs.load_pairs(workspace, "train"), 64)
    assert sum(len(g.pairs) for g in groups) == counts["pairs_train"]


def test_presets_and_config_checks():
    tiny, gpu = load_config("tiny").reward, load_config("gpu").reward
    assert tiny.builtin and tiny.max_steps * tiny.batch_size <= 2000  # a couple of minutes on 2 CPU cores
    assert gpu.dtype == "bfloat16" and gpu.device == "cuda"
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        load_config("tiny", overrides=["reward.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="min_accuracy"):
        load_config("tiny", overrides=["reward.min_accuracy=1.5"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config("tiny", overrides=["reward.corruptions=[swapped]"])


def test_no_preference_pairs_is_an_error_that_says_what_to_give(workspace, tmp_path):
    from lmpipe import warehouse

    with warehouse.connect(workspace):  # a warehouse whose corpus has no stdlib objects (a user's own corpus)
        pass
    with pytest.raises(ValueError, match="no train preference pairs") as e:
        reward.prepare_data(workspace, RewardConfig(), IngestConfig(), tmp_path, torch.device("cpu"))
    assert "reward.sources" in str(e.value) and "lmpipe ingest --kind preferences" in str(e.value)
