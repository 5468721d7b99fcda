"""``vpp run/demo --rerun FILE.rrd``: the run as a rerun recording (optional extra
``rerun-sdk``; open it with ``rerun FILE.rrd``).

The writer is a :class:`~vpp_edge.runtime.metrics.Metrics` sink, like the ``--record``
recorder: it runs on the metrics thread from the records the control loop queues, never
on the control thread. Entities, on the ``run_time`` timeline (seconds from the run's
first record, on the runtime's monotonic clock)::

    run                     what ran (artifact, engine, cameras, instruction, robot), static
    cameras/view<N>         each new camera frame as the model saw it (at most every
                            ``image_every_s``; JPEG-compressed), at its capture time
    actions/a<D>/predicted  every accepted chunk: action i at its observation's time + i * dt
    actions/a<D>/executed   the target sent to the bridge each tick (after the safety gate)
    actions/a<D>/setpoint   the robot's setpoint as the bridge reported it
    robot/joints/j<K>       the robot's joint state as the bridge reported it
    latency/<stage>_ms      per-stage inference time of each chunk, and end_to_end_ms
    events                  safety verdicts (other than clamping), faults, bridge events

``vpp replay LOG`` (:func:`replay_log`) writes the same recording, less the camera frames,
from a finished run's ``--log``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vpp_edge.extras import require
from vpp_edge.runtime.cameras.base import StaleFrameError

TIMELINE = "run_time"
APPLICATION_ID = "vpp-edge"


def require_rerun() -> Any:
    """The ``rerun`` module, or :class:`MissingDependencyError` with its one-line install hint."""
    return require("rerun", "--rerun (a rerun recording of the run)")


class RerunWriter:
    """Writes the metrics records of one run (``__call__`` takes each) into an .rrd file;
    :meth:`close` flushes it. Raises :class:`MissingDependencyError` without rerun-sdk."""

    def __init__(self, path: str | Path, cameras: Sequence[Any], dt: float, image_every_s: float = 0.1):
        self.rr = require_rerun()
        self.path, self.cameras, self.dt, self.image_every_s = Path(path), cameras, dt, image_every_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = self.rr.RecordingStream(APPLICATION_ID)
        self.stream.save(str(self.path))
        self.t0: float | None = None
        self.frame_stamps: dict[int, float] = {}  # view -> stamp of the last frame logged
        self.styled: set[str] = set()  # series whose name and style were logged
        self.logged = 0  # records turned into rerun data

    def __call__(self, record: Mapping[str, Any]) -> None:
        if self.t0 is None:
            self.t0 = float(record["t"])
        kind = record.get("record")
        handler = {"run": self._run, "tick": self._tick, "chunk": self._chunk, "event": self._event,
                   "bridge_event": self._event}.get(kind)
        if handler is not None:
            handler(record)
            self.logged += 1

    def close(self) -> None:
        """Flush everything logged to the file and close it."""
        self.stream.flush()
        self.stream.disconnect()

    def _at(self, t: float) -> None:
        self.stream.set_time(TIMELINE, duration=t - (self.t0 or 0.0))

    def _style(self, entity: str, name: str, points: bool = False) -> None:
        """Name (and, for points, style) a scalar series once, statically."""
        if entity not in self.styled:
            style = self.rr.SeriesPoints(names=name, marker_sizes=1.5) if points else self.rr.SeriesLines(names=name)
            self.stream.log(entity, style, static=True)
            self.styled.add(entity)

    def _scalars(self, prefix: str, leaf: str, values: Sequence[float], label: str, points: bool = False) -> None:
        for d, value in enumerate(values):
            entity = f"{prefix}{d}/{leaf}" if leaf else f"{prefix}{d}"
            self._style(entity, f"{label} {d}", points)
            self.stream.log(entity, self.rr.Scalars([float(value)]))

    def _run(self, record: Mapping[str, Any]) -> None:
        text = "\n".join(f"- **{k}**: {v}" for k, v in record.items() if k not in ("t", "record"))
        self.stream.log("run", self.rr.TextDocument(text, media_type="text/markdown"), static=True)

    def _tick(self, record: Mapping[str, Any]) -> None:
        self._frames()
        self._at(record["t"])
        if record.get("target") is not None:
            self._scalars("actions/a", "executed", record["target"], "executed target")
        state = record.get("state")
        if state:
            self._scalars("actions/a", "setpoint", state["target"], "robot setpoint")
            self._scalars("robot/joints/j", "", state.get("joints") or (), "joint")
        for event in record.get("events", ()):
            if not event.startswith("clamped"):
                self.stream.log("events", self.rr.TextLog(event, level="WARN"))

    def _frames(self) -> None:
        """Log each camera's newest frame if it is new and ``image_every_s`` after the last one."""
        view = 0
        for cam in self.cameras:
            try:
                frame = cam.latest(float("inf"))
            except StaleFrameError:
                view += 1
                continue
            for v, image in enumerate(frame.image, start=view):
                last = self.frame_stamps.get(v)
                if last is None or frame.stamp - last >= self.image_every_s:
                    self.frame_stamps[v] = frame.stamp
                    self._at(frame.stamp)
                    self.stream.log(f"cameras/view{v}", self.rr.Image(np.ascontiguousarray(image)).compress(85))
            view += len(frame.image)

    def _chunk(self, record: Mapping[str, Any]) -> None:
        self._at(record["t"])
        for stage, ms in (record.get("timings_ms") or {}).items():
            self.stream.log(f"latency/{stage}_ms", self.rr.Scalars([float(ms)]))
        self.stream.log("latency/end_to_end_ms", self.rr.Scalars([1e3 * float(record.get("latency_s", 0.0))]))
        actions = np.asarray(record.get("actions") or [], np.float64)
        if not actions.size:
            return
        times = float(record["obs_stamp"]) - (self.t0 or 0.0) + self.dt * np.arange(len(actions))
        for d in range(actions.shape[1]):
            entity = f"actions/a{d}/predicted"
            self._style(entity, f"predicted chunk {d}", points=True)
            self.stream.send_columns(entity, indexes=[self.rr.TimeColumn(TIMELINE, duration=times)],
                                     columns=self.rr.Scalars.columns(scalars=actions[:, d]))

    def _event(self, record: Mapping[str, Any]) -> None:
        self._at(record["t"])
        detail = record.get("detail")
        self.stream.log("events", self.rr.TextLog(f"{record.get('kind', '?')}" + (f": {detail}" if detail else ""),
                                                  level="WARN"))


def replay_log(log: str | Path, out: str | Path | None = None) -> Path:
    """``vpp replay LOG``: a run log (``--log``) as a rerun recording, everything but the
    camera frames (the log has none); the control period is the ticks' median spacing.
    Returns the .rrd's path (default: the log's with ``.rrd``)."""
    from vpp_edge.errors import DataError
    from vpp_edge.runlog import read_records

    records = read_records(log)
    ticks = np.array([r["t"] for r in records if r.get("record") == "tick"], np.float64)
    if len(ticks) < 2:
        raise DataError(f"{log}: fewer than two tick records (written by 'vpp run --log' with --log-ticks 1)")
    out = Path(out) if out else Path(log).with_suffix(".rrd")
    writer = RerunWriter(out, cameras=(), dt=float(np.median(np.diff(ticks))))
    try:
        for record in records:
            writer(record)
    finally:
        writer.close()
    return out


def read_entities(path: str | Path) -> dict[str, int]:
    """Entity path -> rows of a recording's first store (how the tests read an .rrd back)."""
    from rerun.chunk import RrdReader

    rows: dict[str, int] = {}
    for chunk in RrdReader(str(path)).stream():
        rows[str(chunk.entity_path)] = rows.get(str(chunk.entity_path), 0) + int(chunk.num_rows)
    return rows
