"""The loss paths the GPT benchmarks compare, written as a comma-separated list.

``0`` is the plain loss (all the logits, then the cross-entropy); ``N`` the fused LM head + cross-entropy in
chunks of N tokens; ``Ns`` the same over the targets that are not ignored only (``skip_ignored``: the head, the
final norm and the last block's MLP and attention projection run over those positions alone). With a share
of ignored targets, the first part of every 64 targets is ignored, as prompts and padding are in instruction
tuning's packed rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def parse(spec: str) -> list[str]:
    paths = [p.strip() for p in spec.split(",")]
    for p in paths:
        if not p.rstrip("s").isdigit() or p.count("s") > 1:
            raise SystemExit(f"unknown loss path {p!r}: write 0, N or Ns (N tokens per chunk)")
    return paths


def describe(path: str, ignored: float) -> str:
    chunk = int(path.rstrip("s"))
    text = f"fused, chunks of {chunk}" if chunk else "plain"
    if path.endswith("s"):
        text += ", kept targets only"
    return text + (f", {ignored:.0%} ignored" if ignored else "")


def loss_fn(path: str, ignored: float, block_size: int) -> Callable[[torch.nn.Module, torch.Tensor], tuple]:
    """The trainer's loss over rows of ``block_size + 1`` token ids: (mean loss, tokens)."""
    chunk, skip = int(path.rstrip("s")), path.endswith("s")
    mask = (torch.arange(block_size) % 64) < round(64 * ignored)

    def loss(model: torch.nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        targets = rows[:, 1:].masked_fill(mask.to(rows.device), -100) if ignored else rows[:, 1:]
        _, value = model(rows[:, :-1], targets, loss_chunk=chunk, skip_ignored=skip)
        return value, rows[:, :-1].numel()

    return loss
