"""SFT and PPO on two CPU processes (gloo), as torchrun runs them: ranks stay identical, SFT matches one process
with the same global batch, PPO's whitening and KL control use statistics of every rank, rank 0 alone writes."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from ranks import spawn
from safetensors.torch import load_file, save_file

from lmpipe import instructions, ppo, rl, sft
from lmpipe.bpe import train_tokenizer
from lmpipe.chat import TEMPLATE_NAME
from lmpipe.checkpoint import load_model_folder, save_model_folder
from lmpipe.config import IngestConfig, PpoConfig, SftConfig, TokenizerConfig
from lmpipe.gpt import GPT, GPTConfig
from lmpipe.trainer import Trainer, distributed
from lmpipe.workspace import Workspace

TIMEOUT_S = 180
NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "iota", "lambda", "rho"]
SFT_CFG = SftConfig(batch_size=2, grad_accum=1, max_steps=4, warmup_steps=1, lr=1e-2, min_lr=1e-3, eval_every=2,
                    eval_examples=0, patience=0, save_every=2, heldout_prompts=2, max_new_tokens=4, sample_rows=2,
                    log_every=100, device="cpu", builtin=False)
PPO_CFG = PpoConfig(iterations=3, batch_size=4, mini_batch_size=4, micro_batch_size=2, ppo_epochs=2, max_new_tokens=6,
                    value_model="reward", init_kl_coef=0.05, target_kl=0.5, kl_horizon=20.0, lr=1e-2, min_lr=1e-2,
                    heldout_prompts=2, sample_rows=2, save_every=0, device="cpu", seed=3)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=384, block_size=64, n_layer=2, n_head=2, n_embd=32))


class LetterReward:
    """A stand-in reward model with a transformer to start the value model from; it scores the share of "a"."""

    mean, std = 0.1, 0.5

    def __init__(self) -> None:
        self.net = SimpleNamespace(gpt=tiny_gpt(seed=5), head=nn.Linear(32, 1))

    def score(self, prompts, responses):
        return [r.count("a") / max(1, len(r)) for r in responses]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a (random) pretrained/SFT model folder, and a workspace holding train/val/test instructions."""
    root = tmp_path_factory.mktemp("ddp-stages")
    docs = [f"What does `mod.{n}` do? Return the value of {n}." for n in NAMES]
    tok = train_tokenizer([docs * 5], TokenizerConfig(vocab_size=320))
    extra = {"eot_id": 0, "pad_id": 1, "chat_template": TEMPLATE_NAME}
    model_dir = save_model_folder(tiny_gpt(), root / "model", extra)
    tok.save(str(model_dir / "tokenizer.json"))
    records = [{"prompt": f"What does `mod.{n}{i}` do?", "response": f"Return the value of {n}.",
                "split": "train" if i < 4 else ("val" if i < 5 else "test")} for i in range(6) for n in NAMES]
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    ws = Workspace.resolve(root / "ws")
    instructions.ingest_files(ws, [str(path)], IngestConfig())
    return {"model": model_dir, "ws": ws.root, "root": root}


# ----------------------------------------------------------------------------------------------
# running ranks


def _join(rank: int, world: int, port: int):
    """The process group of ``rank`` for a ``with`` block, left after a barrier when the block succeeds."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return distributed("cpu", wait=True)


def _recording_save(folder: Path, rank: int):
    """Trainer.save that also writes this rank's weights (every rank saves; the last save holds the trained model)."""
    save = Trainer.save

    def save_and_record(self, *args, **kwargs):
        state = {k: v.detach().contiguous() for k, v in self.raw_model.state_dict().items()}
        save_file({k: v for k, v in state.items() if not k.endswith("lm_head.weight")},  # tied to the embedding
                  str(folder / f"rank{rank}.safetensors"))
        return save(self, *args, **kwargs)

    return save_and_record


def _assert_same_weights(folder: Path) -> dict[str, torch.Tensor]:
    a, b = load_file(str(folder / "rank0.safetensors")), load_file(str(folder / "rank1.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the ranks"
    return a


# ----------------------------------------------------------------------------------------------
# SFT


def _sft_worker(rank: int, world: int, port: int, root: str) -> None:
    with _join(rank, world, port) as dist:
        a = Path(root)
        Trainer.save = _recording_save(a / "sft-ddp", rank)
        result = sft.sft(Workspace(a / "ws"), SFT_CFG, a / "model", a / "sft-ddp", dist=dist, progress=False)
        (a / "sft-ddp" / f"result{rank}.json").write_text(json.dumps({"metrics": result.metrics,
                                                                      "losses": result.losses}))


@pytest.mark.slow
def test_sft_on_two_processes_equals_one_process_with_the_same_global_batch(assets, monkeypatch):
    root = assets["root"]
    (root / "sft-ddp").mkdir()
    spawn(_sft_worker, str(root), timeout=TIMEOUT_S)
    ddp = _assert_same_weights(root / "sft-ddp")
    r0, r1 = (json.loads((root / "sft-ddp" / f"result{r}.json").read_text()) for r in (0, 1))
    assert r1["metrics"] == {} and r0["metrics"]["steps"] == SFT_CFG.max_steps  # rank 0 alone evaluates
    assert (root / "sft-ddp" / "model" / "model.safetensors").exists()
    state = json.loads((root / "sft-ddp" / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["world_size"] == 2 and (root / "sft-ddp" / "checkpoints" / "step_000004" / "rng_rank1.json").exists()

    # one process, two micro-batches of the same rows per step: rank r's rows are micro-batch r, and DDP's
    # average of the two ranks' gradients is gradient accumulation's average of the two micro-batches'
    (root / "sft-one").mkdir()
    monkeypatch.setattr(Trainer, "save", _recording_save(root / "sft-one", 0))
    single = sft.sft(Workspace(assets["ws"]), replace(SFT_CFG, grad_accum=2), assets["model"], root / "sft-one",
                     progress=False)
    one = load_file(str(root / "sft-one" / "rank0.safetensors"))
    for k, v in one.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert not torch.equal(ddp["wte.weight"], load_model_folder(assets["model"]).wte.weight)  # it did train
    assert r0["losses"] == pytest.approx(single.losses, rel=1e-4)
    assert r0["metrics"]["val_response_loss"] == pytest.approx(single.metrics["val_response_loss"], rel=1e-4)


# ----------------------------------------------------------------------------------------------
# PPO


def test_masked_statistics_reduce_sums_and_counts():
    # a reduction that adds an identical second shard: the statistics of [1, 2, 3] twice, by hand
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 50.0]]), torch.tensor([[1, 1, 1, 0]])
    twice = lambda t: 2 * t  # noqa: E731
    assert rl.masked_mean(x, mask, reduce=twice).item() == pytest.approx(2.0)
    assert rl.masked_var(x, mask).item() == pytest.approx(1.0)  # squared deviations 1 + 0 + 1 over n - 1 = 2
    assert rl.masked_var(x, mask, reduce=twice).item() == pytest.approx(0.8)  # 4 over n - 1 = 5
    whitened = rl.masked_whiten(x, mask, reduce=twice)
    assert whitened[0].tolist() == pytest.approx([-1 / math.sqrt(0.8), 0.0, 1 / math.sqrt(0.8), 0.0], abs=1e-6)


def _ppo_worker(rank: int, world: int, port: int, root: str) -> None:
    with _join(rank, world, port) as dist:
        a = Path(root)
        # hand numbers: rank 0 holds [1, 2], rank 1 holds [3, 4] and a padding entry
        x = torch.tensor([[1.0, 2.0, 0.0]]) if rank == 0 else torch.tensor([[3.0, 4.0, 100.0]])
        mask = torch.tensor([[1, 1, 0]])
        stats = {"sum": dist.all_sum(torch.tensor([1.0, 2.0]) * (rank + 1)).tolist(),
                 "mean": rl.masked_mean(x, mask, reduce=dist.all_sum).item(),
                 "var": rl.masked_var(x, mask, reduce=dist.all_sum).item(),
                 "whitened": rl.masked_whiten(x, mask, reduce=dist.all_sum)[0, :2].tolist()}
        Trainer.save = _recording_save(a / "ppo-ddp", rank)
        result = ppo.ppo(Workspace(a / "ws"), PPO_CFG, a / "model", LetterReward(), a / "ppo-ddp", progress=False,
                         builtin=False, dist=dist)
        (a / "ppo-ddp" / f"result{rank}.json").write_text(json.dumps({"stats": stats, "metrics": result.metrics,
                                                                      "history": result.history}))


@pytest.mark.slow
def test_ppo_on_two_processes_keeps_the_ranks_identical_with_global_statistics(assets):
    root = assets["root"]
    (root / "ppo-ddp").mkdir()
    spawn(_ppo_worker, str(root), timeout=TIMEOUT_S)
    r0, r1 = (json.loads((root / "ppo-ddp" / f"result{r}.json").read_text()) for r in (0, 1))

    # the reduction helpers, on both ranks: the statistics of [1, 2, 3, 4]
    for r in (r0, r1):
        assert r["stats"]["sum"] == [3.0, 6.0]
        assert r["stats"]["mean"] == pytest.approx(2.5) and r["stats"]["var"] == pytest.approx(5 / 3)
    assert r0["stats"]["whitened"] == pytest.approx([-1.5 / math.sqrt(5 / 3), -0.5 / math.sqrt(5 / 3)], abs=1e-6)
    assert r1["stats"]["whitened"] == pytest.approx([0.5 / math.sqrt(5 / 3), 1.5 / math.sqrt(5 / 3)], abs=1e-6)

    # identical updates: same weights, and the same reduced metrics and KL coefficient on both ranks
    weights = _assert_same_weights(root / "ppo-ddp")
    timing = ("rollout_s", "update_s", "rollout_tokens_per_s", "update_tokens_per_s")
    for h0, h1 in zip(r0["history"], r1["history"], strict=True):
        assert {k: v for k, v in h0.items() if k not in timing} == {k: v for k, v in h1.items() if k not in timing}
    betas = [h["beta_next"] for h in r0["history"]]
    assert len(betas) == PPO_CFG.iterations and betas[-1] != PPO_CFG.init_kl_coef  # the controller acted
    sft_weights = load_model_folder(assets["model"]).state_dict()
    assert not torch.equal(weights["policy.wte.weight"], sft_weights["wte.weight"])  # the policy moved
    assert "value.head.weight" in weights  # the separate value model was trained under DDP too

    # rank 0 alone evaluates and writes the policy
    assert r1["metrics"] == {} and "heldout_reward" in r0["metrics"]
    assert r0["metrics"]["optimizer_steps"] == PPO_CFG.iterations * PPO_CFG.ppo_epochs
    policy = load_model_folder(root / "ppo-ddp" / "model")
    torch.testing.assert_close(policy.wte.weight, weights["policy.wte.weight"])


# ----------------------------------------------------------------------------------------------
# the command a torchrun launch runs


def test_sft_command_trains_and_writes_the_reports(assets, tmp_path, capsys):
    with pytest.raises(SystemExit, match="has no pretrain result: run `lmpipe run --to pretrain`"):
        sft.main(["--workspace", str(assets["ws"]), "--out", str(tmp_path / "out")])
    sets = ["sft.builtin=false", "sft.device=cpu", "sft.batch_size=2", "sft.max_steps=2", "sft.warmup_steps=1",
            "sft.eval_every=0", "sft.heldout_prompts=2", "sft.max_new_tokens=4"]
    sft.main(["--workspace", str(assets["ws"]), "--pretrained", str(assets["model"]), "--out", str(tmp_path / "out"),
              *[a for s in sets for a in ("--set", s)]])
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 2 and "heldout_token_f1" in printed
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert written == pytest.approx(printed)
    assert (tmp_path / "out" / "model" / "model.safetensors").exists() and (tmp_path / "out" / "comparison.md").exists()
