"""Data parallelism: two CPU processes (gloo) train replicas that stay identical and match one process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from ranks import spawn
from safetensors.torch import load_file, save_file

from lmpipe.gpt import GPT, GPTConfig
from lmpipe.trainer import Objective, Trainer, TrainSettings, distributed

STEPS = 3
TIMEOUT_S = 120


class Rows(Objective):
    """Rank ``rank`` of ``world`` trains on its slice of one global batch of random rows per step."""

    def __init__(self, rank: int, world: int, per_rank: int = 2):
        self.rank, self.world, self.per_rank = rank, world, per_rank

    def batches(self, step):
        rows = torch.randint(0, 64, (self.per_rank * 2, 9), generator=torch.Generator().manual_seed(step))
        return [rows[self.rank * self.per_rank * 2 // self.world : (self.rank + 1) * self.per_rank * 2 // self.world]]

    def loss(self, model, rows):
        _, loss = model(rows[:, :-1], rows[:, 1:])
        return loss, rows[:, :-1].numel()


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=32))


def _settings() -> TrainSettings:
    # float32: the comparison with one process holds to float32 rounding; bf16 rounds the two halves differently
    return TrainSettings(max_steps=STEPS, warmup_steps=1, lr=1e-2, save_every=0, eval_every=0, device="cpu",
                         dtype="float32")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed("cpu", wait=True) as dist:
        if rank == 1:
            torch.manual_seed(99)  # a different initialisation: DDP must broadcast rank 0's weights
        model = _model() if rank == 0 else GPT(_model().config)
        trainer = Trainer(model, _settings(), Path(out) / "run", dist=dist, progress=False)
        for step in range(STEPS):
            trainer.train_step(Rows(rank, world).batches(step), Rows(rank, world).loss, step)
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
                  str(Path(out) / f"rank{rank}.safetensors"))


@pytest.mark.slow
def test_two_gloo_processes_stay_in_sync_and_match_one_process(tmp_path):
    spawn(_worker, str(tmp_path), timeout=TIMEOUT_S)
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # one process on the whole global batch takes the same steps (DDP averages the two halves' gradients)
    single = _model()
    trainer = Trainer(single, _settings(), tmp_path / "single", progress=False)
    for step in range(STEPS):
        trainer.train_step(Rows(0, 1).batches(step), Rows(0, 1).loss, step)
    for k, v in single.state_dict().items():
        if k in a:
            torch.testing.assert_close(a[k], v, rtol=1e-4, atol=1e-5)
    assert not torch.equal(a["wte.weight"], _model().wte.weight)  # it did train
