"""The training log: one CSV row per step in `--out`/metrics.csv, mirrored to TensorBoard if installed."""

import csv
import io
from pathlib import Path

from .files import atomic_write

FILE = "metrics.csv"


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_row(row: dict) -> dict:
    return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}


class MetricsLog:
    """The application's `columns` (step among them), `scalars` of them mirrored to TensorBoard.

    Rows after `start_step` from an earlier run are dropped, so a resumed log reads like one run.
    """

    def __init__(self, out_dir: Path, start_step: int, columns: tuple[str, ...], scalars: tuple[str, ...]):
        self.columns, self.scalars = columns, scalars
        path = out_dir / FILE
        kept = [r for r in read_rows(path) if start_step and int(r["step"]) <= start_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in columns} for r in kept)
        atomic_write(path, text.getvalue().encode())
        self.path = path
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.tensorboard = None
        else:
            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)

    def log(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:  # one row per step: open, append, close
            values = format_row({k: row.get(k, "") for k in self.columns})
            csv.DictWriter(f, self.columns, lineterminator="\n").writerow(values)
        if self.tensorboard is not None:
            for key in self.scalars:
                if row.get(key) not in (None, ""):
                    self.tensorboard.add_scalar(key, row[key], row["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
