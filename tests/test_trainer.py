"""The shared training machinery: schedule, optimizer groups, progress line, checkpoints, exact resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmpipe import checkpoint, trainer
from lmpipe.gpt import GPT, GPTConfig
from lmpipe.trainer import (
    Objective,
    Trainer,
    TrainSettings,
    autocast_dtype,
    configure_optimizer,
    format_progress,
    lr_at,
    peak_flops,
)

torch.set_num_threads(1)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=32))


class RandomTokens(Objective):
    """Random 9-token rows drawn from a seed per step: the global batch is split over ranks and micro-batches."""

    def __init__(self, batch: int, accum: int = 1, rank: int = 0, world: int = 1, fail_at: int | None = None):
        self.batch, self.accum, self.rank, self.world, self.fail_at = batch, accum, rank, world, fail_at
        self.evaluated: list[int] = []

    def batches(self, step):
        if step == self.fail_at:
            raise KeyboardInterrupt("killed")
        g = torch.Generator().manual_seed(1000 + step)
        rows = torch.randint(0, 64, (self.batch * self.accum * self.world, 9), generator=g)
        mine = rows[self.rank * self.batch * self.accum : (self.rank + 1) * self.batch * self.accum]
        return [mine[i : i + self.batch] for i in range(0, len(mine), self.batch)]

    def loss(self, model, rows):
        _, loss = model(rows[:, :-1], rows[:, 1:])
        return loss, rows[:, :-1].numel()

    def evaluate(self, model, step, last):
        self.evaluated.append(step)
        return {"probe": float(model.wte.weight.sum())}


def settings(**kw) -> TrainSettings:
    base = dict(max_steps=8, warmup_steps=2, lr=1e-2, min_lr=1e-3, save_every=2, eval_every=0, keep_last=2,
                log_every=100, device="cpu", deterministic=True)
    return TrainSettings(**{**base, **kw})


def test_schedule_by_hand():
    s = TrainSettings(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, s) == pytest.approx(0.1)  # (0 + 1) / 10 of the peak
    assert lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(10, s) == pytest.approx(1.0)
    assert lr_at(60, s) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi / 2)) * 0.9)  # = 0.55
    assert lr_at(110, s) == pytest.approx(0.1)
    assert lr_at(500, s) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    m = tiny_model()
    opt = configure_optimizer(m, TrainSettings(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # the tied embedding appears once: 1 wte + 1 wpe + 4 matrices per block
    assert len(decay["params"]) == 2 + 4 * 2
    assert len(no_decay["params"]) == 2 * 2 + 1  # two LayerNorm gains per block, plus ln_f


def test_progress_line_format():
    line = format_progress(100, 5000, 3.21094, 6e-4, 12345.4, 0.4123, 3725)
    assert line == "step 00100/05000 | loss 3.2109 | lr 6.00e-04 | tok/s 12,345 | mfu 41.2% | eta 1h02m"
    assert format_progress(7, 20, 1.0, 1e-3, 10.0, None, 75).endswith("mfu   n/a | eta 1m15s")
    assert peak_flops(torch.device("cpu")) is None and peak_flops(torch.device("cpu"), 100.0) == 1e14


def test_every_trainable_parameter_changes():
    m = tiny_model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    t = Trainer(m, settings(warmup_steps=0), "unused", progress=False)
    t.train_step(RandomTokens(4).batches(0), RandomTokens(4).loss)
    unchanged = [n for n, p in m.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_checkpoint_folder_holds_only_open_formats(tmp_path):
    t = Trainer(tiny_model(), settings(max_steps=4), tmp_path, progress=False)
    t.fit(RandomTokens(4))
    assert checkpoint.checkpoint_steps(tmp_path / "checkpoints") == [2, 4]
    files = {p.name for p in (tmp_path / "checkpoints" / "step_000004").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "optimizer.json", "rng_rank0.safetensors",
                     "rng_rank0.json", "state.json"}
    state = json.loads((tmp_path / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["step"] == 4 and len(state["losses"]) == 4 and "probe" in state["eval"]


def test_keep_last_and_incomplete_checkpoints_are_ignored(tmp_path):
    t = Trainer(tiny_model(), settings(max_steps=8, keep_last=2), tmp_path, progress=False)
    t.fit(RandomTokens(2))
    root = tmp_path / "checkpoints"
    assert checkpoint.checkpoint_steps(root) == [6, 8]
    (root / ".tmp-step_000010").mkdir()  # what a kill during a save leaves behind
    assert checkpoint.latest_checkpoint(root) == root / "step_000008"


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    m = tiny_model()
    t = Trainer(m, settings(), tmp_path, progress=False)
    obj = RandomTokens(2)
    for step in range(3):
        t.train_step(obj.batches(step), obj.loss, step)
    tensors, meta = checkpoint.optimizer_to_flat(t.optimizer)
    fresh = configure_optimizer(tiny_model(1), t.settings, torch.device("cpu"))
    checkpoint.optimizer_from_flat(fresh, tensors, json.loads(json.dumps(meta)))
    a, b = t.optimizer.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, st in a["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


def test_auto_precision_is_bf16_where_the_device_computes_it_natively(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer, "cpu_computes_bf16", lambda: True)
    assert autocast_dtype(cpu) == torch.bfloat16
    assert autocast_dtype(cpu, "float32") == torch.float32
    monkeypatch.setattr(trainer, "cpu_computes_bf16", lambda: False)
    assert autocast_dtype(cpu) == torch.float32
    with pytest.warns(RuntimeWarning, match="emulated"):  # asked for by name: given, with a warning
        assert autocast_dtype(cpu, "bfloat16") == torch.bfloat16
    assert autocast_dtype(torch.device("meta")) == torch.float32


def test_cpu_bf16_detection_agrees_with_the_kernel_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    assert trainer.cpu_computes_bf16() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & set(flags))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_killed_run_resumes_to_the_identical_loss_curve(tmp_path, dtype):
    full = Trainer(tiny_model(), settings(dtype=dtype), tmp_path / "a", progress=False)
    full.fit(RandomTokens(4))

    first = Trainer(tiny_model(), settings(dtype=dtype), tmp_path / "b", progress=False)
    with pytest.raises(KeyboardInterrupt):
        first.fit(RandomTokens(4, fail_at=5))  # killed after the step-4 checkpoint, one step into the next
    torch.manual_seed(123)  # a different process state: the checkpoint must restore what matters
    second = Trainer(tiny_model(seed=7), settings(dtype=dtype), tmp_path / "b", progress=False)
    resumed = RandomTokens(4)
    metrics = second.fit(resumed)

    assert second.losses == full.losses  # bit-identical, all 8 steps (4 restored + 4 trained)
    assert len(full.losses) == 8
    assert second.tokens == full.tokens == 8 * 4 * 8  # tokens trained: the restored steps' count too
    for (n, p), q in zip(full.raw_model.named_parameters(), second.raw_model.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert metrics == full.eval_metrics
    assert resumed.evaluated == [8]


def test_finished_run_resumes_to_its_final_metrics_without_training(tmp_path):
    Trainer(tiny_model(), settings(max_steps=4), tmp_path, progress=False).fit(RandomTokens(2))
    again = Trainer(tiny_model(), settings(max_steps=4), tmp_path, progress=False)
    obj = RandomTokens(2, fail_at=0)  # any training step would raise
    metrics = again.fit(obj)
    assert "probe" in metrics and obj.evaluated == [] and len(again.losses) == 4 and again.tokens == 4 * 2 * 8


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    exact = dict(max_steps=5, save_every=0, dtype="float32")  # the same sums in float32; bf16 rounds per shape
    big = Trainer(tiny_model(), settings(**exact), tmp_path / "a", progress=False)
    big.fit(RandomTokens(8, accum=1))
    small = Trainer(tiny_model(), settings(**exact, grad_accum=8), tmp_path / "b", progress=False)
    small.fit(RandomTokens(1, accum=8))
    assert small.losses == pytest.approx(big.losses, rel=1e-5)


def test_progress_lines_and_metrics_are_reported(tmp_path):
    lines: list[str] = []
    logged: list[tuple[dict, int | None]] = []

    class Recorder:
        def metrics(self, values, step=None):
            logged.append((dict(values), step))

        def __getattr__(self, name):
            return lambda *a, **k: None

    t = Trainer(tiny_model(), settings(max_steps=4, log_every=2), tmp_path, log=Recorder(), print_fn=lines.append)
    t.fit(RandomTokens(2))
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert [ln.split(" | ")[0] for ln in steps] == ["step 00000/00004", "step 00002/00004", "step 00003/00004"]
    per_step = [v for v, s in logged if "train_loss" in v]
    assert len(per_step) == 4 and set(per_step[0]) == {"train_loss", "lr", "grad_norm", "tokens_per_s"}
    assert per_step[0]["lr"] == pytest.approx(5e-3)  # warmup step 0 of 2: half the peak


class StopsAtSecondEval(RandomTokens):
    def evaluate(self, model, step, last):
        self.evaluated.append((step, last))
        return {"probe": float(step)}

    def should_stop(self, metrics):
        return metrics["probe"] >= 2


def test_early_stopping_finishes_with_a_final_eval_and_stays_finished(tmp_path):
    obj = StopsAtSecondEval(2)
    t = Trainer(tiny_model(), settings(max_steps=10, eval_every=2, save_every=4), tmp_path, progress=False)
    assert t.fit(obj) == {"probe": 2.0}
    assert obj.evaluated == [(0, False), (2, False), (2, True)] and len(t.losses) == 2
    assert checkpoint.checkpoint_steps(tmp_path / "checkpoints") == [2]
    again = StopsAtSecondEval(2, fail_at=2)  # training on would raise
    assert Trainer(tiny_model(), settings(max_steps=10), tmp_path, progress=False).fit(again) == {"probe": 2.0}
    assert again.evaluated == []


CACHE_PROBE = """
import os, resource
import torch
import lmpipe.trainer
torch.set_num_threads(1)
w = torch.randn(1024, 256)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for n in range(1, 601):  # 600 distinct bf16 matmul shapes, as varying lengths make them
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.linear(torch.randn(n, 256), w)
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], os.environ["LRU_CACHE_CAPACITY"], round(grown_mb))
"""


def test_cpu_kernel_caches_are_bounded_unless_the_environment_says_otherwise():
    env = {k: v for k, v in os.environ.items() if k not in trainer.CPU_KERNEL_CACHES}
    out = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, check=True)
    onednn, ideep, grown_mb = out.stdout.split()
    assert (onednn, ideep) == ("64", "64")
    # unbounded, the two caches keep about 0.7 MB per shape: over 400 MB here
    assert int(grown_mb) < 200, grown_mb
    env["LRU_CACHE_CAPACITY"] = "7"
    out = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[:2] == ["64", "7"]
