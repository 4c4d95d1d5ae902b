"""The PNG that people look at: a training metric and its validation value against steps (curves.png)."""

import io
from pathlib import Path

from .files import atomic_write
from .metrics import FILE, read_rows

PLOT = "curves.png"


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled towards zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_curves(out_dir: Path, train_key: str, val_key: str, label: str) -> Path:
    """Columns `train_key` (smoothed) and `val_key` of metrics.csv against steps, into curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = read_rows(out_dir / FILE)
    train = [(int(r["step"]), float(r[train_key])) for r in rows if r[train_key]]
    val = [(int(r["step"]), float(r[val_key])) for r in rows if r[val_key]]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(list(values), 0.9), color="tab:blue", label="train (smoothed)")
    if val:
        steps, values = zip(*val)
        ax.plot(steps, values, "o-", color="tab:orange", markersize=3, label="validation")
        ax.set_title(f"{out_dir.name}: validation {values[-1]:.3f} {label} at step {steps[-1]}")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(out_dir / PLOT, buffer.getvalue())
    return out_dir / PLOT
