"""Checkpoints and model folders without pickle: tensors in safetensors, everything else in JSON.

A training checkpoint is a folder ``step_000100/`` holding

- ``model.safetensors``: the weights (tied tensors stored once);
- ``optimizer.safetensors`` and ``optimizer.json``: the optimizer's tensors and its hyper-parameters;
- ``rng_rank{r}.safetensors`` and ``rng_rank{r}.json``: torch (CPU and CUDA), numpy and Python RNG
  states of every data-parallel rank;
- ``state.json``: step, data position and whatever else the training stage records.

It is written under a temporary name and renamed, so a folder named ``step_*`` is always complete.
A model folder (``model.safetensors`` + ``config.json``) is what stages hand to each other.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from lmpipe.gpt import GPT, GPTConfig
from lmpipe.workspace import atomic_write_text

STEP_PREFIX = "step_"


# ----------------------------------------------------------------------------------------------
# model folders


def save_model_folder(model: GPT, folder: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (the GPTConfig plus ``extra``) atomically."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    atomic_write_text(tmp / "config.json", json.dumps({**model.config.to_dict(), **(extra or {})}, indent=2))
    replace_dir(tmp, folder)
    return folder


def read_model_config(folder: Path) -> tuple[GPTConfig, dict[str, Any]]:
    """The GPTConfig of a model folder and the extra keys stored beside it."""
    data = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    names = GPTConfig.__dataclass_fields__
    return GPTConfig(**{k: v for k, v in data.items() if k in names}), {k: v for k, v in data.items() if k not in names}


def load_model_folder(folder: Path, device: str | torch.device = "cpu") -> GPT:
    """The GPT stored in a model folder, in eval mode on ``device``."""
    config, _ = read_model_config(folder)
    model = GPT(config)
    load_model(model, str(Path(folder) / "model.safetensors"), device=str(device))
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# optimizer and RNG state as (tensors, JSON)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_to_flat() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    numpy_state = [name, keys.tolist(), pos, has_gauss, gauss]
    return tensors, {"numpy": numpy_state, "python": [version, list(py_state), py_gauss]}


def rng_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    name, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))


# ----------------------------------------------------------------------------------------------
# training checkpoints


def checkpoint_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under ``root``, ascending."""
    if not Path(root).is_dir():
        return []
    steps = [int(p.name[len(STEP_PREFIX):]) for p in Path(root).iterdir()
             if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(steps)


def latest_checkpoint(root: Path) -> Path | None:
    steps = checkpoint_steps(root)
    return Path(root) / f"{STEP_PREFIX}{steps[-1]:06d}" if steps else None


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep_last: int, rank: int = 0, world_size: int = 1,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; every rank calls this (rank 0 writes the model)."""
    root = Path(root)
    final = root / f"{STEP_PREFIX}{step:06d}"
    tmp = root / f".tmp-{STEP_PREFIX}{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_tensors, rng_meta = rng_to_flat()
    save_file(rng_tensors, str(tmp / f"rng_rank{rank}.safetensors"))
    atomic_write_text(tmp / f"rng_rank{rank}.json", json.dumps(rng_meta))
    barrier()
    if rank == 0:
        save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        atomic_write_text(tmp / "optimizer.json", json.dumps(opt_meta))
        atomic_write_text(tmp / "state.json", json.dumps({**state, "step": step, "world_size": world_size}, indent=2))
        replace_dir(tmp, final)
        for old in checkpoint_steps(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(root / f"{STEP_PREFIX}{old:06d}", ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    rank: int = 0) -> dict[str, Any]:
    """Restore weights, optimizer and this rank's RNG states from ``path``; return its state.json."""
    path = Path(path)
    device = next(model.parameters()).device
    load_model(model, str(path / "model.safetensors"), device=str(device))
    if optimizer is not None:
        meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        optimizer_from_flat(optimizer, load_file(str(path / "optimizer.safetensors"), device=str(device)), meta)
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.exists():  # a run resumed on more ranks than it was saved with starts their RNGs fresh
        rng_from_flat(load_file(str(rng_file)), json.loads((path / f"rng_rank{rank}.json").read_text()))
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing an older copy."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
