"""PNG plots of a report with matplotlib (Agg backend), an optional
dependency: the `experiments` extra."""
from __future__ import annotations

from pathlib import Path

INSTALL_HINT = "pip install 'jaxkit[experiments]'"


class MissingMatplotlib(ImportError):
    """The plots need matplotlib, which is not installed."""


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlib(f"the report's plots need matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(panels: dict[str, dict[str, list[tuple[list, list]]]], path: Path) -> None:
    """One panel per title, one colour per label, one line per (steps, values)
    of that label (its seeds)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    labels = list(dict.fromkeys(label for curves in panels.values() for label in curves))
    colors = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for label, lines in curves.items():
            for i, (steps, values) in enumerate(lines):
                ax.plot(steps, values, color=colors[label], alpha=0.85, linewidth=1.2,
                        marker="o" if len(steps) < 12 else None, markersize=3,
                        label=label if i == 0 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_against(series: dict[str, list[tuple[object, float, float | None]]], x_label: str,
                 y_label: str, path: Path) -> None:
    """Each series' (x, mean, std) points; x numbers on a numeric axis (log
    when positive and spanning a factor 10 or more), anything else as
    categories in the order they first appear."""
    plt = pyplot()
    xs = [x for points in series.values() for x, _, _ in points]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    categories = list(dict.fromkeys(map(str, xs)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        points = sorted(points, key=lambda p: p[0]) if numeric else points
        pos = [p[0] if numeric else categories.index(str(p[0])) for p in points]
        ax.errorbar(pos, [p[1] for p in points], yerr=[p[2] or 0.0 for p in points],
                    marker="o", capsize=3, label=name or None)
    if numeric and xs and min(xs) > 0 and max(xs) >= 10 * min(xs):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(categories)), categories, rotation=20)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    if any(series):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
