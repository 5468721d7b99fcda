"""Training metrics: a CSV file always, TensorBoard when installed, and a PNG plot.

Only the main process writes; the others get a no-op logger.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path

log = logging.getLogger(__name__)

CSV_FILE = "metrics.csv"
PLOT_FILE = "metrics.png"


class MetricsLog:
    """``log(step, {name: value})`` -> ``metrics.csv`` (step,metric,value), ``tensorboard/``."""

    def __init__(self, run: Path, enabled: bool = True, tensorboard: bool = True):
        self.run = Path(run)
        self.enabled = enabled
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._writer = None
        if not enabled:
            return
        path = self.run / CSV_FILE
        new = not path.exists()
        self._file = open(path, "a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(["step", "metric", "value"])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: the CSV has everything
                log.info("tensorboard not installed; metrics go to %s only", path)
            else:
                self._writer = SummaryWriter(str(self.run / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.history[name].append((step, float(value)))
        if not self.enabled:
            return
        for name, value in values.items():
            self._csv.writerow([step, name, f"{float(value):.6g}"])
            if self._writer is not None:
                self._writer.add_scalar(name, float(value), step)
        self._file.flush()

    def plot(self) -> Path | None:
        """Every metric against the step, one panel each, saved as ``metrics.png``."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker

        names = [n for n in sorted(self.history) if n != "train/lr"]
        fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), squeeze=False)
        for ax, name in zip(axes[:, 0], names):
            steps, values = zip(*self.history[name])
            ax.plot(steps, values, marker="." if len(steps) < 50 else None)
            ax.set_ylabel(name, fontsize=8)
            if "loss" in name and min(values) > 0:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        path = self.run / PLOT_FILE
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._writer is not None:
                self._writer.close()
