"""The ppo stage: rollout layout and stop handling, the PPO loop against a tiny policy and reward, exact resume,
the value model from the reward model, reports, the stage and the generate command."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer

from lmpipe import instructions, ppo, reward
from lmpipe.bpe import END_ID, EOT_ID, PAD_ID, train_tokenizer
from lmpipe.chat import TEMPLATE_NAME, ChatTemplate
from lmpipe.checkpoint import checkpoint_steps, load_model_folder, save_model_folder
from lmpipe.config import ConfigError, IngestConfig, PpoConfig, TokenizerConfig, load_config
from lmpipe.gpt import GPT, GPTConfig
from lmpipe.sft import answer
from lmpipe.stage import RecordingLogger, StageContext, StageResult

torch.set_num_threads(1)

CFG = PpoConfig(iterations=6, batch_size=16, mini_batch_size=8, micro_batch_size=4, ppo_epochs=2, max_new_tokens=10,
                value_model="policy", init_kl_coef=0.01, target_kl=0.0, lr=1e-2, min_lr=1e-2, heldout_prompts=6,
                sample_rows=4, save_every=2, device="cpu", seed=3)
NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "iota", "lambda", "rho"]


class LetterReward:
    """A stand-in reward model: the share of the letter "a" among the response's characters."""

    mean, std = 0.1, 0.5

    def score(self, prompts, responses):
        return [r.count("a") / max(1, len(r)) for r in responses]


def tiny_gpt(vocab_size: int = 384, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.1))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a (random) 'SFT' chat model folder and an instruction file with train and test prompts."""
    root = tmp_path_factory.mktemp("ppo-assets")
    docs = [f"What does `mod.{n}` do? Return a value of {n}." for n in NAMES]
    tok = train_tokenizer([docs * 5], TokenizerConfig(vocab_size=320))
    sft_dir = save_model_folder(tiny_gpt(), root / "sft", {"eot_id": 0, "pad_id": 1, "chat_template": TEMPLATE_NAME})
    tok.save(str(sft_dir / "tokenizer.json"))
    records = [{"prompt": f"What does `mod.{n}{i}` do?", "response": f"Return a value of {n}.",
                "split": "train" if i < 3 else "test"} for i in range(4) for n in NAMES]
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {"sft": sft_dir, "data": path}


@pytest.fixture
def ws(workspace, assets):
    instructions.ingest_files(workspace, [str(assets["data"])], IngestConfig())
    return workspace


@pytest.fixture(scope="module")
def run(tmp_path_factory, assets):
    """One PPO run (6 iterations) shared by the tests that inspect its results."""
    from lmpipe.workspace import Workspace

    ws = Workspace.resolve(tmp_path_factory.mktemp("ppo-run") / "ws")
    instructions.ingest_files(ws, [str(assets["data"])], IngestConfig())
    log = RecordingLogger()
    result = ppo.ppo(ws, CFG, assets["sft"], LetterReward(), ws.root / "out", log, progress=False, builtin=False)
    return {"result": result, "log": log, "out": ws.root / "out"}


# ----------------------------------------------------------------------------------------------
# rollouts


def test_truncate_at_stop_keeps_the_end_token_and_pads_after_it():
    tokens = torch.tensor([[7, END_ID, PAD_ID, PAD_ID], [7, 8, EOT_ID, 9], [7, 8, 9, 9]])
    lengths = torch.tensor([2, 4, 4])  # row 1 stopped at <|end|>; row 2 said <|endoftext|> and went on
    out, mask, finished = ppo.truncate_at_stop(tokens, lengths)
    assert out.tolist() == [[7, END_ID, PAD_ID, PAD_ID], [7, 8, EOT_ID, PAD_ID], [7, 8, 9, 9]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert finished.tolist() == [True, True, False]  # the end token counts; padding does not


def test_rollout_logprobs_equal_each_row_computed_alone():
    model = ppo.ActorCritic(tiny_gpt()).eval()
    prompts = [[0, 3, 50, 51, 5, 4], [0, 3, 60, 5, 4]]  # different lengths: the second is left-padded
    response = torch.tensor([[70, 71, END_ID], [80, END_ID, PAD_ID]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = ppo.layout(prompts, response, mask, torch.tensor([True, True]))
    assert batch.prompt_len == 6 and batch.idx[1, :1].tolist() == [PAD_ID]
    ppo.annotate(model, model.policy, batch, temperature=0.7)
    for i, p in enumerate(prompts):
        n = int(mask[i].sum())
        seq = torch.tensor([p + response[i, :n].tolist()])
        logits = model.policy(seq)[0][0, len(p) - 1 : len(p) - 1 + n] / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, response[i, :n, None]).squeeze(-1)
        assert torch.allclose(batch.data["logp"][i, :n], expected, atol=1e-5)
    assert torch.equal(batch.data["logp"] * mask, batch.data["ref_logp"] * mask)  # policy == reference: KL 0
    assert torch.equal(batch.data["values"], torch.zeros(2, 3))  # the value head starts at 0


@pytest.mark.parametrize("value_model", ["policy", "reward"])
def test_fused_head_equals_the_full_logits_path(value_model):
    policy = tiny_gpt().double()
    value = ppo.ValueModel(tiny_gpt(seed=1).double()) if value_model == "reward" else None
    model = ppo.ActorCritic(policy, value).double().eval()
    torch.nn.init.normal_(value.head.weight if value else model.value_head.weight)  # non-zero values
    prompts = [[0, 3, 50, 51, 5, 4], [0, 3, 60, 5, 4], [0, 7, 4]]
    response = torch.tensor([[70, 71, END_ID, PAD_ID], [80, END_ID, PAD_ID, PAD_ID], [90, 91, 92, 93]])
    mask = (response != PAD_ID).long()
    batch = ppo.layout(prompts, response, mask, torch.tensor([True, True, False]))
    start = batch.prompt_len - 1  # the response's states: the prompt's columns skip the last block's MLP
    full = policy.hidden(batch.idx, batch.positions, batch.attn_mask)[:, start : start + 4]
    got = ppo.response_hidden(policy, batch.idx, batch.positions, batch.attn_mask, start, 4)
    torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)
    weights = torch.randn(3, 4, dtype=torch.float64)
    results = []
    for chunk in (0, 3):  # the full logits, then the fused head over the 9 real tokens in chunks of 3
        model.zero_grad()
        logp, entropy, values = model(batch.idx, batch.positions, batch.attn_mask, batch.prompt_len - 1,
                                      response, mask, temperature=0.7, chunk=chunk)
        ((logp + 0.1 * entropy + values) * weights).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((logp, entropy, values, *grads))
    assert len(results[0]) == len(results[1])
    for plain, fused in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    logp, entropy = results[1][:2]
    assert (logp[mask == 0] == 0).all() and (entropy[mask == 0] == 0).all() and (logp[mask == 1] < 0).all()


def test_fused_head_under_bf16_autocast_matches_the_full_logits():
    # the GPU path: matmuls in bf16, the softmax in float32, on either path
    model = ppo.ActorCritic(tiny_gpt()).eval()  # no dropout: both paths see the same function
    torch.nn.init.normal_(model.value_head.weight)
    response = torch.tensor([[70, 71, END_ID], [80, END_ID, PAD_ID]])
    mask = (response != PAD_ID).long()
    batch = ppo.layout([[0, 3, 50, 51, 5, 4], [0, 3, 60, 5, 4]], response, mask, torch.tensor([True, True]))
    results = []
    for chunk in (0, 2):
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            logp, entropy, values = model(batch.idx, batch.positions, batch.attn_mask, batch.prompt_len - 1,
                                          response, mask, 0.7, chunk)
        assert logp.dtype == entropy.dtype == torch.float32
        (logp.sum() + 0.1 * entropy.sum() + values.float().sum()).backward()
        results.append((logp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()
                                                          if p.grad is not None]))
    (lp0, h0, g0), (lp1, h1, g1) = results
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-5)
    torch.testing.assert_close(h1, h0, rtol=0, atol=1e-5)
    for a, b in zip(g0, g1, strict=True):  # the same bf16 products, summed in another order
        assert float((a - b).abs().max()) <= 1e-2 * float(a.abs().max()) + 1e-6


def test_fused_head_stays_one_graph_under_compile():
    model = ppo.ActorCritic(tiny_gpt()).eval()
    response = torch.tensor([[70, 71, END_ID], [80, END_ID, PAD_ID]])
    mask = (response != PAD_ID).long()
    batch = ppo.layout([[0, 3, 50, 51, 5, 4], [0, 3, 60, 5, 4]], response, mask, torch.tensor([True, True]))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(batch.idx, batch.positions, batch.attn_mask, batch.prompt_len - 1,
                                             response, mask, 0.7, 4)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_minibatches_and_prompt_order():
    parts = ppo.minibatches(10, 4, 2, torch.Generator().manual_seed(0))
    assert [[len(m) for m in mb] for mb in parts] == [[2, 2], [2, 2], [2]]
    assert sorted(torch.cat([m for mb in parts for m in mb]).tolist()) == list(range(10))
    first_pass = ppo.prompt_indices(6, 3, 0, seed=1) + ppo.prompt_indices(6, 3, 1, seed=1)
    assert sorted(first_pass) == list(range(6))  # each pass over the prompts sees every prompt once
    assert ppo.prompt_indices(6, 4, 1, seed=1)[:2] == first_pass[4:]  # iteration 1 continues the same order


def test_load_gpt_turns_dropout_off(assets):
    assert load_model_folder(assets["sft"]).config.dropout == 0.1
    assert ppo.load_gpt(assets["sft"], "cpu").config.dropout == 0.0
    ref = ppo.load_gpt(assets["sft"], "cpu", frozen=True)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())


# ----------------------------------------------------------------------------------------------
# the loop


def test_each_iteration_logs_its_metrics(run):
    per_iter = [(m, s) for m, s in run["log"].history if "kl_k1" in m]
    assert [s for _, s in per_iter] == list(range(CFG.iterations))
    keys = {"reward_raw", "reward", "kl_k1", "kl_k3", "beta", "entropy", "clip_frac", "approx_kl", "value_loss",
            "explained_variance", "response_length", "rollout_tokens_per_s", "update_tokens_per_s", "policy_loss"}
    assert keys <= set(per_iter[0][0])
    first = per_iter[0][0]
    assert first["kl_k1"] == 0.0 and first["kl_k3"] == 0.0  # the first rollout comes from the reference itself
    assert all(m["beta"] == CFG.init_kl_coef for m, _ in per_iter)  # target_kl 0: a fixed β
    assert all(0 < m["response_length"] <= CFG.max_new_tokens for m, _ in per_iter)
    assert all(m["kl_k3"] >= 0 for m, _ in per_iter)
    assert per_iter[-1][0]["kl_k3"] > 0  # the policy has moved away from the reference


def test_ppo_raises_the_reward_and_changes_every_trainable_parameter(run, assets):
    history, m = run["result"].history, run["result"].metrics
    early = sum(h["reward_raw"] for h in history[:2]) / 2
    late = sum(h["reward_raw"] for h in history[-2:]) / 2
    assert late > early, (early, late)  # sampled rollouts: noisy, but more "a"s
    assert m["heldout_reward_raw"] > m["sft_heldout_reward_raw"] + 0.1  # greedy held-out answers: clearly more
    policy, sft = load_model_folder(run["result"].model_dir), load_model_folder(assets["sft"])
    sft_params = dict(sft.named_parameters())
    for name, p in policy.named_parameters():
        assert not torch.equal(p, sft_params[name]), f"{name} did not change"
    config = json.loads((run["result"].model_dir / "config.json").read_text())
    assert config["chat_template"] == TEMPLATE_NAME and config["dropout"] == 0.0
    assert (run["result"].model_dir / "tokenizer.json").exists()


def test_evaluation_before_and_after(run):
    m, rows = run["result"].metrics, run["result"].rows
    assert len(rows) == CFG.heldout_prompts and {"prompt", "reference", "sft", "ppo", "sft_reward", "ppo_reward",
                                                 "sft_token_f1", "ppo_token_f1"} <= set(rows[0])
    reward_model = LetterReward()
    assert m["heldout_reward_raw"] == pytest.approx(sum(r["ppo_reward"] for r in rows) / len(rows))
    assert m["sft_heldout_reward_raw"] == pytest.approx(sum(reward_model.score([], [r["sft"] for r in rows]))
                                                        / len(rows))
    assert m["heldout_reward"] == pytest.approx((m["heldout_reward_raw"] - 0.1) / 0.5)
    assert m["heldout_reward_gain"] == pytest.approx(m["heldout_reward"] - m["sft_heldout_reward"])
    for key in ("heldout_reward_gain", "heldout_token_f1_gain"):  # paired bootstrap intervals around the gains
        assert m[f"{key}_low"] <= m[key] + 1e-12 and m[key] <= m[f"{key}_high"] + 1e-12
    assert m["iterations"] == CFG.iterations and m["optimizer_steps"] == CFG.iterations * 2 * 2
    assert math.isfinite(m["final_kl"]) and m["final_kl_k3"] >= 0


def test_checkpoints_hold_the_iteration_and_controller(run):
    steps = checkpoint_steps(run["out"] / "checkpoints")
    assert steps == [16, 24]  # saved every 2 iterations of 4 optimizer steps, the last 2 kept
    state = json.loads((run["out"] / "checkpoints" / "step_000024" / "state.json").read_text())
    assert state["iteration"] == 6 and state["kl_ctl"] == {"value": CFG.init_kl_coef} and len(state["history"]) == 6


def test_resume_is_exact(ws, assets, monkeypatch):
    cfg = replace(CFG, iterations=3, save_every=1, target_kl=1.0, init_kl_coef=0.1, kl_horizon=10.0,
                  value_model="policy", kl_estimator="k3")
    straight = ppo.ppo(ws, cfg, assets["sft"], LetterReward(), ws.root / "a", progress=False, builtin=False)

    real = ppo.iteration

    def crash_at_2(models, trainer, ctl, prompts, prompt_ids, cfg_, it):
        if it == 2:
            raise KeyboardInterrupt("killed")
        return real(models, trainer, ctl, prompts, prompt_ids, cfg_, it)

    monkeypatch.setattr(ppo, "iteration", crash_at_2)
    with pytest.raises(KeyboardInterrupt):
        ppo.ppo(ws, cfg, assets["sft"], LetterReward(), ws.root / "b", progress=False, builtin=False)
    monkeypatch.setattr(ppo, "iteration", real)
    resumed = ppo.ppo(ws, cfg, assets["sft"], LetterReward(), ws.root / "b", progress=False, builtin=False)
    a, b = load_model_folder(straight.model_dir), load_model_folder(resumed.model_dir)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    drop = {"rollout_tokens_per_s", "update_tokens_per_s", "rollout_s", "update_s"}  # timings differ
    assert [{k: v for k, v in h.items() if k not in drop} for h in straight.history] == [
        {k: v for k, v in h.items() if k not in drop} for h in resumed.history]
    assert straight.history[-1]["beta_next"] != 0.1  # the adaptive β moved, and resumed from its checkpoint


# ----------------------------------------------------------------------------------------------
# the value model from the reward model, the stage and the generate command


def reward_folder(assets, root: Path) -> Path:
    """A reward model folder as the reward stage writes it (a random head on the SFT body)."""
    net = reward.from_sft(load_model_folder(assets["sft"]), seed=5)
    folder = save_model_folder(net, root / "reward", {"reward_model": True, "reward_mean": 0.5, "reward_std": 2.0,
                                                      "heldout_accuracy": 0.9, "chat_template": TEMPLATE_NAME})
    (folder / "tokenizer.json").write_bytes((assets["sft"] / "tokenizer.json").read_bytes())
    return folder


def test_value_model_starts_as_a_copy_of_the_reward_model(assets, tmp_path):
    rm = ppo.load_reward_model(reward_folder(assets, tmp_path), torch.device("cpu"), min_accuracy=0.6)
    assert (rm.mean, rm.std) == (0.5, 2.0) and not any(p.requires_grad for p in rm.net.parameters())
    models = ppo.build_models(assets["sft"], rm, replace(CFG, value_model="reward"), torch.device("cpu"))
    value = models.actor_critic.value
    assert models.actor_critic.value_head is None and value is not None
    assert torch.equal(value.body.wte.weight, rm.net.gpt.wte.weight) and torch.equal(value.head.weight,
                                                                                     rm.net.head.weight)
    assert value.body.wte.weight.data_ptr() != rm.net.gpt.wte.weight.data_ptr()  # a trainable copy
    assert all(p.requires_grad for p in value.parameters())
    # the value read at the end token equals the reward read there (same network, same input)
    template = ChatTemplate(rm.template.tokenizer)
    ids = template.render_prompt("What does `mod.alpha0` do?")
    answer = template.encode_texts(["Return a value."])[0] + [END_ID]
    batch = ppo.layout([ids], torch.tensor([answer]), torch.ones(1, len(answer)), torch.tensor([True]))
    values = value(batch.idx, batch.positions, batch.attn_mask)
    assert values[0, -1].item() == pytest.approx(rm.score(["What does `mod.alpha0` do?"], ["Return a value."])[0],
                                                 abs=1e-4)
    with pytest.raises(reward.WeakRewardModel):
        ppo.load_reward_model(reward_folder(assets, tmp_path / "weak"), torch.device("cpu"), min_accuracy=0.95)


def test_stage_writes_reports_and_generate_answers_with_the_aligned_model(ws, assets):
    from lmpipe import cli
    from lmpipe.state import save_stage_state

    cfg = load_config(None, overrides=["ppo.iterations=2", "ppo.batch_size=8", "ppo.mini_batch_size=8",
                                       "ppo.micro_batch_size=8", "ppo.ppo_epochs=1", "ppo.max_new_tokens=8",
                                       "ppo.heldout_prompts=4", "ppo.device=cpu", "sft.builtin=false"])
    rm_dir = reward_folder(assets, ws.root)
    inputs = {"sft": StageResult("sft", "k", "f", {"model": str(assets["sft"])}, {}),
              "reward": StageResult("reward", "k", "f", {"model": str(rm_dir)}, {})}
    log = RecordingLogger()
    out = ppo.run_stage(StageContext(ws, cfg, inputs, ws.root / "artifacts" / "ppo", log, progress=False))
    assert {"model", "tokenizer", "metrics", "comparison", "samples", "samples_json", "frontier"} <= set(out.outputs)
    assert all(ws.abs(p).exists() for p in out.outputs.values())
    assert ws.abs(out.outputs["frontier"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = ws.abs(out.outputs["comparison"]).read_text()
    assert "| sft |" in table and "| ppo |" in table and "| change |" in table
    assert {"reward_kl_frontier.png", "samples.md", "comparison.md", "metrics.json"} <= set(log.artifacts)
    assert "held-out reward" in out.summary and out.metrics["iterations"] == 2

    save_stage_state(ws, "ppo", "completed", StageResult("ppo", "k" * 64, out.fingerprint, out.outputs, out.metrics),
                     None, None)
    result = CliRunner().invoke(cli.main, ["generate", "--stage", "ppo", "--workspace", str(ws.root),
                                           "--temperature", "0", "--max-new-tokens", "6", "What does `mod.beta3` do?"])
    assert result.exit_code == 0, result.output
    policy = load_model_folder(ws.abs(out.outputs["model"]))
    template = ChatTemplate(Tokenizer.from_file(str(ws.abs(out.outputs["tokenizer"]))))
    assert result.output.strip() == answer(policy, template, ["What does `mod.beta3` do?"], 6)[0]


# ----------------------------------------------------------------------------------------------
# configuration


def test_presets_configure_ppo():
    tiny, gpu = load_config("tiny").ppo, load_config("gpu").ppo
    assert tiny.batch_size % tiny.mini_batch_size == 0 and gpu.batch_size % gpu.mini_batch_size == 0
    assert gpu.device == "cuda" and tiny.device in ("auto", "cpu")


@pytest.mark.parametrize("override", ["ppo.mini_batch_size=128", "ppo.temperature=0", "ppo.kl_estimator=k2",
                                      "ppo.micro_batch_size=32", "ppo.gamma=1.5"])
def test_invalid_ppo_settings_are_errors(override):
    with pytest.raises(ConfigError, match="ppo"):
        load_config(None, overrides=[override])


# ----------------------------------------------------------------------------------------------
# the static-cache decoder


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_static_decoder_matches_the_eager_generator(positions):
    from lmpipe import decode

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=40, n_layer=2, n_head=2, n_embd=32, positions=positions)).eval()
    prompts = [[0, 5, 9, 11, 4], [0, 7, 4], [0, 3, 3, 8, 9, 10, 4]]  # different lengths: left-padded
    eager = model.generate(prompts, 12, temperature=0.0, eot_id=None)
    static = decode.generate(model, prompts, 12, temperature=0.0, eot_id=None)
    assert torch.equal(eager.tokens, static.tokens) and torch.equal(eager.lengths, static.lengths)
    # next-token logits of every step equal a full forward over each row alone
    dec = decode.StaticDecoder(model, 3, 7 + 12)
    P = 7
    idx = torch.tensor([[PAD_ID] * (P - len(p)) + p for p in prompts])
    valid = torch.arange(P) >= torch.tensor([P - len(p) for p in prompts])[:, None]
    logits = dec.prefill(idx, valid)
    for t in range(4):
        for i, p in enumerate(prompts):
            full = model(torch.tensor([p + static.tokens[i, :t].tolist()]))[0][0, -1]
            assert torch.allclose(logits[i], full, atol=1e-4)
        logits = dec.step(static.tokens[:, t], torch.tensor([len(p) + t for p in prompts]), P + t)


def test_static_decoder_samples_like_the_eager_generator():
    from lmpipe import decode

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=40, n_layer=2, n_head=2, n_embd=32)).eval()
    prompts = [[0, 5, 9, 11, 4], [0, 7, 4]]
    eager = model.generate(prompts, 10, temperature=0.9, top_k=20, eot_id=3,
                           generator=torch.Generator().manual_seed(1))
    static = decode.generate(model, prompts, 10, temperature=0.9, top_k=20, eot_id=3,
                             generator=torch.Generator().manual_seed(1))
    assert torch.equal(eager.tokens, static.tokens) and torch.equal(eager.finished, static.finished)
