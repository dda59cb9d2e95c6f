"""Plots saved as PNG artifacts (matplotlib's non-interactive backend; imported lazily)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

# Families that draw Chinese, Japanese and Korean, used after DejaVu Sans for the glyphs it lacks when they are
# installed (matplotlib falls back from font to font glyph by glyph).
CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Source Han Sans SC",
                "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "AR PL UMing CN",
                "Microsoft YaHei", "SimHei", "PingFang SC", "Hiragino Sans GB", "Arial Unicode MS")
_MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from font")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_fonts(installed: set[str] | None = None) -> list[str]:
    """Font families for text from a corpus (words, samples): DejaVu Sans, then each CJK family of
    :data:`CJK_FAMILIES` that is ``installed`` (by default: known to matplotlib on this machine)."""
    if installed is None:
        installed = _installed_families()
    return ["DejaVu Sans", *(f for f in CJK_FAMILIES if f in installed)]


@cache
def _installed_families() -> frozenset[str]:
    from matplotlib import font_manager

    return frozenset(f.name for f in font_manager.fontManager.ttflist)


def save(fig, path: Path) -> Path:
    """Lay out and write ``fig`` to ``path``. Characters that no installed font draws (shown as boxes) give one
    warning that names a few of them, instead of matplotlib's warning per glyph."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.tight_layout()
        fig.savefig(path)
    missing: set[str] = set()
    for w in caught:
        m = _MISSING_GLYPH.search(str(w.message))
        if m:
            missing.add(chr(int(m.group(1))))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing:
        warnings.warn(f"{path.name}: {len(missing)} characters have no glyph in the installed fonts and are drawn as "
                      f"boxes (e.g. {''.join(sorted(missing)[:8])}); install a font that covers them (for Chinese, "
                      f"Japanese or Korean, Noto Sans CJK or WenQuanYi Zen Hei) and plots use it", stacklevel=2)
    return path


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
