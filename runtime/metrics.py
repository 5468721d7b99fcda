"""Runtime metrics: per-stage latency percentiles, control jitter, counters, a JSONL log
written by its own thread (never on the control thread's hot path), a live status line
and the summary table at exit.

Memory is bounded for unbounded runs (a deployed unit runs with ``--duration inf``): each
series keeps a sliding window of its last :data:`SERIES_WINDOW` values (percentiles are
over that window; ``n`` counts every value observed) and the log queue is bounded."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

SERIES_WINDOW = 30_000  # values kept per series: 10 min of a 50 Hz tick, ~240 KB each


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan")}
    arr = np.asarray(values)
    return {"n": len(values), "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}


class Metrics:
    """Thread-safe enough for one writer per series; readers take snapshots."""

    def __init__(self, log_path: str | Path | None = None, status_every_s: float = 0.5, status: bool = False,
                 sinks: Sequence[Callable[[dict[str, Any]], None]] = ()):
        """``sinks`` get every record too, on the log thread (a recorder); one that raises is
        dropped and counted (``record_sink_failed``), never the run."""
        self.series: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=SERIES_WINDOW))
        self.observed: Counter[str] = Counter()  # values ever observed per series (the window forgets)
        self.counts: Counter[str] = Counter()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=10000)
        self._log_path = Path(log_path) if log_path else None
        self._sinks = list(sinks)
        self._status = status
        self._status_every = status_every_s
        self._thread = threading.Thread(target=self._writer, name="metrics-log", daemon=True)
        self._thread.start()

    def observe(self, name: str, value: float) -> None:
        self.series[name].append(float(value))
        self.observed[name] += 1

    def window(self, name: str, last: int | None = None) -> list[float]:
        """A copy of a series' window (its ``last`` values); safe while the owner appends."""
        values = list(self.series.get(name, ()))  # one C call under the GIL: no mutation mid-copy
        return values if last is None else values[-last:]

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    @property
    def logging(self) -> bool:
        """Whether records go anywhere (a log file, a sink); callers skip building per-tick records otherwise."""
        return self._log_path is not None or bool(self._sinks)

    def record(self, record: str, **data: Any) -> None:
        """Queue a JSONL record; dropped (and counted) rather than ever blocking the caller."""
        try:
            self._queue.put_nowait({"t": time.monotonic(), "record": record, **data})
        except queue.Full:
            self.counts["log_dropped"] += 1

    def _writer(self) -> None:
        f = open(self._log_path, "a", encoding="utf-8") if self._log_path else None
        last_status = 0.0
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self._status_every)
                except queue.Empty:
                    item = {}
                if item is None:
                    break
                if item and f is not None:
                    f.write(json.dumps(item, default=float) + "\n")
                for sink in list(self._sinks) if item else ():
                    try:
                        sink(item)
                    except Exception as exc:  # a broken recorder must not end the log (or the run)
                        self._sinks.remove(sink)
                        self.counts["record_sink_failed"] += 1
                        sys.stderr.write(f"\nrecord sink {sink!r} failed and was dropped: {exc}\n")
                now = time.monotonic()
                if self._status and now - last_status >= self._status_every:
                    last_status = now
                    sys.stderr.write("\r" + self.status_line() + "   ")
                    sys.stderr.flush()
        finally:
            if f is not None:
                f.close()
            if self._status:
                sys.stderr.write("\n")

    def status_line(self) -> str:
        e2e = self.window("end_to_end_ms", 20)
        jit = self.window("jitter_ms", 200)
        return (f"chunks {self.counts['chunks']}  e2e {np.median(e2e) if e2e else float('nan'):.0f} ms  "
                f"jitter p99 {np.percentile(jit, 99) if jit else float('nan'):.2f} ms  "
                f"starved {self.counts['starvation']}  holds {self.counts['hold']}  "
                f"rejected {self.counts['chunk_rejected']}")

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5.0)

    def summary(self) -> dict[str, Any]:
        return {"latency_ms": {k: {**percentiles(self.window(k)), "n": self.observed[k]} for k in sorted(self.series)},
                "counts": dict(sorted(self.counts.items()))}


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="runtime summary: latency and jitter (ms)")
    for col in ("series", "n", "p50", "p95", "p99", "max"):
        table.add_column(col, justify="right" if col != "series" else "left")
    for name, s in summary["latency_ms"].items():
        table.add_row(name, str(s["n"]), *(f"{s[k]:.2f}" for k in ("p50", "p95", "p99", "max")))
    Console().print(table)
    print_counts("events and counters", summary["counts"])


def print_counts(title: str, counts: Mapping[str, int]) -> None:
    """A two-column table of counters (name, value), sorted by name; "none" when empty."""
    from rich.console import Console
    from rich.table import Table

    counts = dict(counts)  # one copy (atomic for a dict): another thread may still be adding counters

    table = Table(title=title)
    table.add_column("counter")
    table.add_column("value", justify="right")
    for name, value in sorted(counts.items()):
        table.add_row(name, str(value))
    if not counts:
        table.add_row("(none)", "")
    Console().print(table)
