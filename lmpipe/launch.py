"""Command lines that run one training stage outside the pipeline, on several processes under ``torchrun``.

``python -m lmpipe.pretrain``, ``python -m lmpipe.sft``, ``python -m lmpipe.reward`` and ``python -m lmpipe.ppo``
share them::

    torchrun --nproc_per_node 8 -m lmpipe.sft --workspace W --out runs/sft --preset gpu

The configuration is built as ``lmpipe run`` builds it (preset, ``--config`` files, ``--set`` overrides).
A stage's inputs default to the workspace's last results of the stages before it (as
``<workspace>/state/stages/<stage>.json`` records them), or are given as folders. Rank 0 alone prepares
data in the warehouse (under the workspace lock) and writes checkpoints, the model folder and the reports
under ``--out``; every rank reads the warehouse read-only, so on several machines the workspace and
``--out`` must be on a file system they share.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from pathlib import Path

from lmpipe.config import PipelineConfig, load_config
from lmpipe.state import load_stage_state
from lmpipe.trainer import Dist
from lmpipe.workspace import Workspace


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The options every stage command has; the stage adds its input folders."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--workspace", help="Workspace (default: $LMPIPE_WORKSPACE, else ./data/workspace).")
    p.add_argument("--out", required=True, help="Output folder (checkpoints, model, reports); resumed if it has "
                                                "checkpoints.")
    p.add_argument("--preset", default="tiny", help="Configuration preset (tiny, gpu).")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config file (repeatable).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="Override one setting (repeatable).")
    return p


def config(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.preset, args.config, args.overrides)


def stage_output(ws: Workspace, given: str | None, stage: str, name: str, option: str, required: bool = True
                 ) -> Path | None:
    """``given`` if set, else output ``name`` of the workspace's last good ``stage`` result (None if there is
    none and it is not ``required``)."""
    if given:
        return Path(given)
    state = load_stage_state(ws, stage)
    if state is None or state.result is None or name not in state.result.outputs:
        if not required:
            return None
        raise SystemExit(f"workspace {ws.root} has no {stage} result: run `lmpipe run --to {stage}` there "
                         f"or pass {option} DIR")
    return ws.abs(state.result.outputs[name])


def prepare(ws: Workspace, dist: Dist, purpose: str, fn: Callable[[], object]) -> None:
    """Run ``fn()`` (which writes to the warehouse) on rank 0 under the workspace lock; the others wait for it."""
    if dist.is_main:
        with ws.lock(purpose=purpose):
            fn()
    dist.barrier()


def report(dist: Dist, metrics: Mapping[str, float]) -> None:
    """Rank 0 prints the final metrics as JSON."""
    if dist.is_main:
        print(json.dumps(dict(metrics), indent=2))
