"""The PNG that people look at: train and validation bits per byte against steps."""

import io
from pathlib import Path

from .checkpoint import atomic_write
from .metrics import FILE, read_rows

PLOT = "curves.png"


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled towards zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_curves(out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = read_rows(out_dir / FILE)
    train = [(int(r["step"]), float(r["train_bpb"])) for r in rows if r["train_bpb"]]
    val = [(int(r["step"]), float(r["val_bpb"])) for r in rows if r["val_bpb"]]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        steps, bpb = zip(*train)
        ax.plot(steps, bpb, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(list(bpb), 0.9), color="tab:blue", label="train (smoothed)")
    if val:
        steps, bpb = zip(*val)
        ax.plot(steps, bpb, "o-", color="tab:orange", markersize=3, label="validation")
        ax.set_title(f"{out_dir.name}: validation {bpb[-1]:.3f} bits per byte at step {steps[-1]}")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(out_dir / PLOT, buffer.getvalue())
    return out_dir / PLOT
