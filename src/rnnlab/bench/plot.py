"""Log-log line plots of benchmark results (one PNG, one panel per measured quantity)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["loglog"]


def loglog(path: str, panels: list[tuple[str, dict[str, list[tuple[float, float]]]]], xlabel: str,
           ylabel: str, title: str, reference: str | None = None) -> None:
    """Write a PNG to ``path`` (atomically): one log-log panel per ``(panel title, series)``, where
    series maps a line label to its (x, y) points (points with y None or <= 0 are left out). The
    line labelled ``reference`` (e.g. attention) is drawn thick, black and dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from ..models.lm import atomic_write

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels):
        for label, points in series.items():
            pts = sorted((x, y) for x, y in points if y is not None and y > 0)
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = (dict(color="black", linewidth=2.6, linestyle="--", zorder=5) if label == reference
                     else dict(linewidth=1.3, marker="o", markersize=3))
            ax.plot(xs, ys, label=label, **style)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
