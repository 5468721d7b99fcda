"""A run's JSONL log (``vpp run --log``) read back and plotted (``vpp plot``).

Records (one JSON object a line, ``t`` = the runtime's monotonic clock, ``record`` = kind):

- ``run``: what ran (artifact, engine, cameras, instruction, robot, bridge), written first;
- ``handshake``: the bridge's answer: ``delta_dims`` (dimensions whose targets are steps,
  not positions: their setpoint is the running sum of what was sent);
- ``tick``: each control tick: ``planned`` (the plan's action), ``target`` (what was sent
  to the bridge, or null when the tick sent a heartbeat), ``events`` (the safety gate's),
  ``state`` (the bridge's newest state: ``target`` setpoint, ``joints``, ``mode``, or null);
- ``chunk``: an accepted action chunk (``actions``, latency, timings);
- ``event`` / ``bridge_event``: faults and notices by ``kind``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpp_edge.errors import DataError


@dataclass
class RunLog:
    """The series of one run log, times in seconds from its first tick."""

    run: dict[str, Any] = field(default_factory=dict)
    delta_dims: list[bool] = field(default_factory=list)
    tick_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sent: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [ticks, dims], NaN where nothing was sent
    state_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    state_target: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # the bridge's setpoint
    chunk_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    events: list[tuple[float, str]] = field(default_factory=list)  # (t, kind)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run log in order; :class:`DataError` naming the line that is not JSON."""
    path = Path(path)
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {n}: not JSON ({exc.msg})") from None
    return records


def read_run(path: str | Path) -> RunLog:
    """Parse a run log; :class:`DataError` for a file that is not one, naming the line."""
    path = Path(path)
    records = read_records(path)
    ticks = [r for r in records if r.get("record") == "tick"]
    if not ticks:
        raise DataError(f"{path}: no tick records (written by 'vpp run --log' since the run record was added)")
    t0 = ticks[0]["t"]
    dims = max(len(r.get("target") or r.get("planned") or ()) for r in ticks) or 1
    log = RunLog(run=next((r for r in records if r.get("record") == "run"), {}))
    log.delta_dims = next((r.get("delta_dims") or [] for r in records if r.get("record") == "handshake"), [])
    log.tick_t = np.array([r["t"] - t0 for r in ticks])
    log.sent = np.array([r["target"] if r.get("target") else [np.nan] * dims for r in ticks], float)
    states = [r for r in ticks if r.get("state")]
    log.state_t = np.array([r["t"] - t0 for r in states])
    log.state_target = np.array([r["state"]["target"] for r in states], float).reshape(len(states), -1)
    log.chunk_t = np.array([r["t"] - t0 for r in records if r.get("record") == "chunk"])
    log.events = [(r["t"] - t0, r.get("kind", "?")) for r in records if r.get("record") in ("event", "bridge_event")]
    for r in ticks:  # safety verdicts other than plain clamping, once per kind and tick
        log.events += [(r["t"] - t0, e) for e in r.get("events", ()) if not e.startswith("clamped")]
    return log


def plot_run(path: str | Path, out: str | Path | None = None) -> Path:
    """A PNG of the run: one panel per action dimension with the targets sent (points) and
    the bridge's setpoint (line) over time, chunk arrivals as ticks on the time axis, and
    the events below. Returns the PNG's path (default: the log's with ``.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_run(path)
    out = Path(out) if out else Path(path).with_suffix(".png")
    dims = log.sent.shape[1]
    fig, axes = plt.subplots(dims + 1, 1, figsize=(10, 1.6 * (dims + 1) + 1), sharex=True, squeeze=False)
    for d in range(dims):
        ax = axes[d, 0]
        delta = d < len(log.delta_dims) and log.delta_dims[d]
        sent_ax = ax.twinx() if delta else ax  # a step per tick has its own scale beside the position
        sent_ax.plot(log.tick_t, log.sent[:, d], ".", ms=3, color="C0", label="step sent (runtime, right axis)"
                     if delta else "target sent (runtime)")
        if log.state_target.size:
            ax.plot(log.state_t, log.state_target[:, d], "-", lw=1, color="C1", label="setpoint (bridge state)")
        for t in log.chunk_t:
            ax.axvline(t, color="0.85", lw=0.5, zorder=0)
        ax.set_ylabel(f"a{d}" + (" (delta)" if delta else ""))
        handles = [h for a in {ax, sent_ax} for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles=handles, loc="upper left", fontsize=7)
    ax = axes[dims, 0]
    kinds = sorted({k for _, k in log.events})
    for i, kind in enumerate(kinds):
        ts = [t for t, k in log.events if k == kind]
        ax.plot(ts, [i] * len(ts), "|", ms=8, label=kind)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
    ax.set_ylabel("events")
    ax.set_xlabel("time since the first tick (s); grey lines: chunks accepted")
    run = log.run
    fig.suptitle(f"{run.get('artifact', Path(path).name)}  {run.get('engine', '')}  {run.get('robot', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
