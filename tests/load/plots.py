"""The load reports' plots share one look: log-log axes ticked at the measured values only, PNG at 110 dpi."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: files only, no display (imported late: only plotting needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_log(ax: Any, ticks: Sequence[float], **labels: str) -> None:
    """Both axes logarithmic, the x axis ticked at `ticks` (the measured values) and nowhere else."""
    from matplotlib.ticker import NullLocator

    ax.set(xscale="log", yscale="log", **labels)
    ax.set_xticks(list(ticks), [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(True, which="both", alpha=0.3)


def save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
