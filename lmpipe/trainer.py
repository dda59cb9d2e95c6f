"""Training machinery shared by every training stage: one loop, no framework.

A stage describes *what* to train by subclassing :class:`Objective` (its micro-batches for a step, the
loss of one micro-batch, its evaluation, its data position); :class:`Trainer` does the rest the same
way for all of them: AdamW with decay on matrices only, linear warmup then cosine decay, gradient
accumulation, clipping, bf16 autocast where the hardware computes it natively, optional ``torch.compile``, DDP under
``torchrun``, the progress line, metrics, and checkpoints with exact resume. A stage whose loop is
not "one batch, one step" (PPO) calls :meth:`Trainer.train_step` and :meth:`Trainer.save` itself.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from lmpipe import checkpoint
from lmpipe.stage import Logger, NullLogger

# bf16 matmuls on the CPU run through oneDNN, which keeps each distinct shape's generated kernel and workspace
# in two caches of 1,024 entries (oneDNN's own and PyTorch's ideep layer's), about 0.3-0.7 MB apiece. The
# alignment stages' varying lengths fill them: the sft stage peaked at 2.75 GB against 1.33 GB with 64 entries
# each, at the same speed (ppo: 1.53 against 1.19 GB). Both capacities are read at the first bf16 matmul of the
# process, so they are set when this module is imported, unless the environment already sets them.
CPU_KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}


def bound_cpu_kernel_caches() -> None:
    for name, value in CPU_KERNEL_CACHES.items():
        os.environ.setdefault(name, value)


bound_cpu_kernel_caches()

# Dense bf16 peak in FLOP/s, for MFU. H100/H200 use the 800 TFLOP/s a matmul benchmark reaches on
# the card rather than the data sheet's 989; override with TrainSettings.peak_tflops.
PEAK_FLOPS = {"H200": 800e12, "H100": 800e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12}


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation knobs every training stage shares; build with :meth:`from_section`."""

    max_steps: int = 1000
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode: default, max-autotune-no-cudagraphs, max-autotune, ...
    seed: int = 1337
    deterministic: bool = False
    peak_tflops: float = 0.0

    @classmethod
    def from_section(cls, section: Any, **overrides: Any) -> TrainSettings:
        """Take every field of the same name from a stage's config section, then ``overrides``."""
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(cls) if hasattr(section, f.name)}
        return cls(**{**values, **overrides})


# ----------------------------------------------------------------------------------------------
# devices, precision and data parallelism


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel job (one process, rank 0 of 1, without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed element-wise over every rank, on every rank (``t`` itself in a single process).

        Statistics that must agree across ranks (means, variances, counts) are reduced as sums and counts
        with this, then divided, so every rank computes the same value from the whole global batch.
        """
        if self.world_size == 1:
            return t
        total = t.detach().clone()
        torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM)
        return total


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world, dev)


def teardown_distributed(wait: bool = False) -> None:
    """Leave the process group; with ``wait``, after a barrier, so that no rank closes its connections while
    another is still using them (gloo aborts a process whose peer resets a connection under it)."""
    if torch_dist.is_initialized():
        if wait:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX).

    Where it does, oneDNN runs bf16 matmuls at more than twice the float32 rate (430 against 177 GFLOP/s on
    two Zen 4 cores); elsewhere bf16 is emulated and slower than float32.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The autocast precision ``name`` asks for; "auto" is bfloat16 where the device computes it natively
    (CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX) and float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = device.type == "cpu" and cpu_computes_bf16()
        return torch.bfloat16 if native else torch.float32
    if name == "bfloat16" and device.type == "cpu" and not cpu_computes_bf16():
        warnings.warn("dtype bfloat16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): its products are "
                      "emulated, from half the float32 speed down to a hundredth of it; dtype auto or float32 "
                      "trains in float32 here", RuntimeWarning, stacklevel=2)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """The accelerator's dense bf16 peak (FLOP/s) from the table or the override; None on CPU or unknown."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------------------------
# optimisation


def configure_optimizer(model: nn.Module, s: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only (not gains, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() lists a tied weight once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), fused=device.type == "cuda")


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps))
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (s.lr - s.min_lr)


def format_progress(step: int, max_steps: int, loss: float, lr: float, tok_s: float, mfu: float | None,
                    eta_s: float) -> str:
    """``step 00100/05000 | loss 3.2109 | lr 6.00e-04 | tok/s 12,345 | mfu 41.2% | eta 1h02m``."""
    width = len(str(max_steps))
    mfu_text = f"{100 * mfu:4.1f}%" if mfu is not None else "  n/a"
    return (f"step {step:0{max(5, width)}d}/{max_steps:0{max(5, width)}d} | loss {loss:.4f} | lr {lr:.2e} | "
            f"tok/s {tok_s:,.0f} | mfu {mfu_text} | eta {format_duration(eta_s)}")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean over micro-batches and ranks
    grad_norm: float  # before clipping
    lr: float
    tokens: int  # over all ranks
    seconds: float


class Objective(abc.ABC):
    """What a stage trains: micro-batches, their loss, evaluation and the data position to checkpoint."""

    @abc.abstractmethod
    def batches(self, step: int) -> Sequence[Any]:
        """The micro-batches this rank trains on at ``step`` (``grad_accum`` of them); deterministic in step."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """Mean loss of one micro-batch through ``model`` (maybe DDP-wrapped or compiled) and its token count."""

    def evaluate(self, model: nn.Module, step: int, last: bool) -> dict[str, float]:
        """Evaluation metrics at ``step`` (``last`` at the final step); runs on rank 0 under no_grad."""
        return {}

    def should_stop(self, metrics: dict[str, float]) -> bool:
        """Early stopping: True ends training after this evaluation (called on rank 0 after each one)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """JSON-able data position, stored in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook, nothing by default
        """Restore the data position from :meth:`state_dict`'s output."""


class Trainer:
    """Owns the model's device placement, optimizer, precision, DDP wrapper, checkpoints and logging."""

    def __init__(self, model: nn.Module, settings: TrainSettings, out_dir: Path, log: Logger | None = None,
                 dist: Dist | None = None, progress: bool = True,
                 print_fn: Callable[[str], None] | None = None) -> None:
        self.settings = s = settings
        self.dist = dist or Dist(device=resolve_device(s.device))
        self.device = self.dist.device
        self.raw_model = model.to(self.device)
        self.optimizer = configure_optimizer(model, s, self.device)
        self.dtype = autocast_dtype(self.device, s.dtype)
        wrapped: nn.Module = torch.compile(model, mode=s.compile_mode) if s.compile else model
        if self.dist.world_size > 1:
            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(wrapped, device_ids=ids)
        self.model = wrapped
        self.ckpt_dir = Path(out_dir) / "checkpoints"
        self.log = log if log is not None and self.dist.is_main else NullLogger()
        self.print = (print_fn or (lambda line: print(line, file=sys.stderr, flush=True))) if (
            progress and self.dist.is_main) else (lambda line: None)
        self.step = 0
        self.eval_metrics: dict[str, float] = {}
        self.losses: list[float] = []  # training loss of every step this process ran
        self.tokens = 0  # tokens trained on over all ranks, steps before a resume included
        self._peak = peak_flops(self.device, s.peak_tflops)
        self._step_time: float | None = None

    # -- one optimizer step --------------------------------------------------------------------

    def _sync_context(self, micro: int, n_micro: int) -> contextlib.AbstractContextManager:
        # DDP all-reduces gradients on every backward; only the last micro-batch needs it
        if isinstance(self.model, DistributedDataParallel) and micro < n_micro - 1:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _update(self, batches: Sequence[Any], loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, int]],
                step: int) -> tuple[torch.Tensor, float]:
        """One optimizer step; returns ([mean loss, grad norm, tokens] on the device, lr) without a host sync."""
        lr = lr_at(step, self.settings)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for i, batch in enumerate(batches):
            with self._sync_context(i, len(batches)), autocast(self.device, self.dtype):
                loss, n = loss_fn(self.model, batch)
            (loss / len(batches)).backward()
            loss_sum += loss.detach().float()
            tokens += n
        clip = self.settings.grad_clip if self.settings.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # torch.full is a kernel launch, where torch.tensor would copy from host memory and wait for the GPU
        n_tokens = torch.full((), float(tokens), device=self.device)
        stats = torch.stack([loss_sum / len(batches), grad_norm.float(), n_tokens])
        if self.dist.world_size > 1:
            torch_dist.all_reduce(stats)
            stats[:2] /= self.dist.world_size  # mean loss over ranks; the grad norm is the same on every rank
        return stats, lr

    def train_step(self, batches: Sequence[Any], loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, int]],
                   step: int | None = None) -> StepStats:
        """Accumulate gradients over ``batches``, clip, and take one AdamW step at the schedule's lr."""
        t0 = time.perf_counter()
        stats, lr = self._update(batches, loss_fn, self.step if step is None else step)
        loss, grad_norm, tokens = stats.tolist()
        return StepStats(loss, grad_norm, lr, int(tokens), time.perf_counter() - t0)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, objective: Objective | None = None, extra: dict[str, Any] | None = None) -> Path:
        state = {"data": objective.state_dict() if objective else {}, "eval": self.eval_metrics,
                 "losses": self.losses, "tokens": self.tokens, **(extra or {})}
        return checkpoint.save_checkpoint(self.ckpt_dir, self.step, self.raw_model, self.optimizer, state,
                                          self.settings.keep_last, self.dist.rank, self.dist.world_size,
                                          self.dist.barrier)

    def resume(self, objective: Objective | None = None) -> dict[str, Any] | None:
        """Load the latest checkpoint under ``out_dir/checkpoints`` if there is one; return its state."""
        path = checkpoint.latest_checkpoint(self.ckpt_dir)
        if path is None:
            return None
        state = checkpoint.load_checkpoint(path, self.raw_model, self.optimizer, self.dist.rank)
        self.step = state["step"]
        self.eval_metrics = dict(state.get("eval", {}))
        self.losses = list(state.get("losses", []))
        self.tokens = int(state.get("tokens", 0))
        if objective is not None:
            objective.load_state_dict(state.get("data", {}))
        self.print(f"resumed from {path} at step {self.step}")
        return state

    # -- evaluation and reporting ----------------------------------------------------------------

    def evaluate(self, objective: Objective, step: int, last: bool) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.dist.is_main:
            self.raw_model.eval()
            with torch.no_grad(), autocast(self.device, self.dtype):
                metrics = objective.evaluate(self.raw_model, step, last)
            self.raw_model.train()
            self.log.metrics(metrics, step=step)
            if metrics:
                self.print(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self.dist.barrier()
        return metrics

    def _flush(self, pending: list[tuple[int, float, torch.Tensor]], seconds: float) -> None:
        """Bring the steps run since the last flush to the host (one sync): record, log and print them."""
        if not pending:
            return
        values = torch.stack([t for _, _, t in pending]).tolist()
        self.tokens += int(sum(v[2] for v in values))
        tok_s = sum(v[2] for v in values) / max(seconds, 1e-9)  # averaged over the window: steps are not synced
        per_step = seconds / len(pending)
        if self._step_time is None or pending[0][0] == 0:  # the first step compiles and warms up: not an estimate
            self._step_time = per_step
        else:
            self._step_time = 0.7 * self._step_time + 0.3 * per_step
        flops = getattr(self.raw_model, "flops_per_token", None)
        mfu = flops() * tok_s / (self._peak * self.dist.world_size) if self._peak and callable(flops) else None
        s = self.settings
        for (step, lr, _), (loss, grad_norm, _) in zip(pending, values, strict=True):
            self.losses.append(loss)
            metrics = {"train_loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s}
            self.log.metrics(metrics if mfu is None else {**metrics, "mfu": mfu}, step=step)
            if step % s.log_every == 0 or step == s.max_steps - 1:
                eta = self._step_time * (s.max_steps - step - 1)
                self.print(format_progress(step, s.max_steps, loss, lr, tok_s, mfu, eta))
        pending.clear()

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, objective: Objective) -> dict[str, float]:
        """Train to ``max_steps`` from the latest checkpoint (if any); return the final eval metrics.

        The loop runs one step past the last update (``last_step``) so the final evaluation and save
        happen inside it, once, whatever the eval/save intervals.
        """
        with deterministic_algorithms(self.settings.deterministic):
            return self._fit(objective)

    def _fit(self, objective: Objective) -> dict[str, float]:
        s = self.settings
        state = self.resume(objective)
        if state is not None and state.get("stopped"):
            return self.eval_metrics  # an early-stopped run is finished
        start = self.step
        pending: list[tuple[int, float, torch.Tensor]] = []  # steps not yet brought to the host
        t_window = time.perf_counter()
        for step in range(start, s.max_steps + 1):
            last_step = step == s.max_steps
            fresh = state is None or step != start  # the checkpoint we resumed from already holds these
            evaluate = fresh and (last_step or (s.eval_every > 0 and step % s.eval_every == 0))
            save = fresh and step > 0 and (last_step or (s.save_every > 0 and step % s.save_every == 0))
            if pending and (evaluate or save or (step - 1) % s.log_every == 0):
                self._flush(pending, time.perf_counter() - t_window)
            stop = False
            if evaluate:
                self.eval_metrics = self.evaluate(objective, step, last_step) or self.eval_metrics
                stop = not last_step and self._agree(objective.should_stop(self.eval_metrics))
                if stop:  # finish as if this were the last step: final evaluation, final checkpoint
                    self.print(f"early stop at step {step}")
                    self.eval_metrics = self.evaluate(objective, step, True) or self.eval_metrics
            if save or stop:
                self.save(objective, {"stopped": stop})
            if last_step or stop:
                break
            if not pending:
                t_window = time.perf_counter()
            stats, lr = self._update(objective.batches(step), objective.loss, step)
            pending.append((step, lr, stats))
            self.step = step + 1
        self._flush(pending, time.perf_counter() - t_window)
        return self.eval_metrics

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank (only rank 0 evaluates)."""
        if self.dist.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        torch_dist.broadcast(t, src=0)
        return bool(t.item())


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Ask PyTorch for deterministic kernels (warning where none exists) for a block, then restore the setting."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@contextlib.contextmanager
def distributed(device: str = "auto", wait: bool = False) -> Iterator[Dist]:
    """``setup_distributed`` for the duration of a block, torn down afterwards (with ``wait``, after a barrier
    when the block succeeds). Stages leave ``wait`` off: rank 0 evaluates and writes alone after training,
    which may take longer than a barrier's timeout."""
    d = setup_distributed(device)
    ok = False
    try:
        yield d
        ok = True
    finally:
        if d.world_size > 1:
            teardown_distributed(wait=wait and ok)  # after an error other ranks may never reach the barrier
