"""Plots saved as PNG artifacts (matplotlib's non-interactive backend; imported lazily)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def histogram(values: Mapping[str, Sequence[float]], path: Path, title: str, xlabel: str, log_x: bool = True) -> Path:
    """One histogram per named series on shared (log-spaced) bins, saved to ``path``."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    series = {k: np.asarray(v, dtype=float) for k, v in values.items() if len(v)}
    if series:
        lo = max(1.0, min(float(v.min()) for v in series.values()))
        hi = max(lo * 10, max(float(v.max()) for v in series.values()))
        bins = np.geomspace(lo, hi, 50) if log_x else np.linspace(lo, hi, 50)
        for name, v in series.items():
            ax.hist(v, bins=bins, alpha=0.6, label=f"{name} (n={len(v)})")
        if log_x:
            ax.set_xscale("log")
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("documents")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
