"""Run a test's worker function on several processes, as torchrun would (gloo on CPU)."""

from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args, world: int = 2, timeout: float = 180) -> None:
    """Run ``worker(rank, world, port, *args)`` on ``world`` processes; fail the test on an error or a hang."""
    ctx = mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} worker processes did not finish within {timeout:g} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
