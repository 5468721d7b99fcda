"""A run as an annotated video: ``vpp run/demo --log LOG --log-frames`` keeps the camera
frames beside the log, ``vpp replay LOG --video OUT.mp4`` draws the run from both.

Frames (:class:`FrameLog`, a :class:`~vpp_edge.runtime.metrics.Metrics` sink: it runs on
the metrics thread, never on the control thread) go into ``LOG.frames/``::

    index.jsonl          one line per frame saved: {"t": capture time, "view": N, "file": ...}
    view<N>/<us>.jpg     the view as the model saw it (cropped, resized), at most every
                         ``FRAME_EVERY_S`` and downsampled to ``FRAME_MAX_SIDE`` pixels

``t`` is the runtime's monotonic clock, the clock of the log's records. The index is
appended line by line, so a run that dies leaves a readable folder.

The video (:func:`render_video`), one frame every 1/fps seconds of the run from its first
tick to its last: the camera views as they were at that time, the instruction, the time
and tick, whether the runtime was sending targets or holding and the robot's mode (the
bridge's: active, hold, stopped, estop), the last safety or bridge events, and one small
plot per action dimension around that time (x: seconds from the frame's time): the newest
predicted chunk (points at the times it planned them for) against the targets sent (line)
and, for absolute dimensions, the robot's setpoint.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpp_edge.errors import DataError
from vpp_edge.runtime.cameras.base import StaleFrameError

FRAME_EVERY_S = 0.1  # 10 frames a second per view are enough to see what the robot saw
FRAME_MAX_SIDE = 160  # pixels; about 6 kB a JPEG, 0.4 GB an hour for two views
INDEX = "index.jsonl"

# Video layout in pixels: camera panels in the top row, the text beside them, below a grid
# of per-dimension plots. libx264 with yuv420p needs even sizes; 16 suits every encoder.
WIDTH = 960
CAMERA_SIDE = 240
TEXT_MIN_WIDTH = 320
PLOT_COLUMNS = 4
PLOT_HEIGHT = 120
WINDOW_BEFORE_S = 3.0  # the plots show this much of the past ...
WINDOW_AFTER_S = 1.5  # ... and of the newest chunk's future
EVENT_SHOWN_S = 1.0  # an event stays on screen this long


def frames_dir(log: str | Path) -> Path:
    """Where ``--log-frames`` puts the frames of the run log ``log``: ``LOG.frames``."""
    log = Path(log)
    return log.with_name(log.name + ".frames")


class FrameLog:
    """Saves the cameras' newest frames into ``folder`` when a metrics record arrives
    (``__call__``), each view at most every ``every_s`` seconds of capture time."""

    def __init__(self, folder: str | Path, cameras: Sequence[Any], every_s: float = FRAME_EVERY_S,
                 max_side: int = FRAME_MAX_SIDE):
        import cv2  # OpenCV is the camera stack's own dependency: nothing new on the robot

        self.cv2, self.folder, self.cameras = cv2, Path(folder), cameras
        self.every_s, self.max_side = every_s, max_side
        self.folder.mkdir(parents=True, exist_ok=True)
        self.last: dict[int, float] = {}  # view -> capture time of the last frame saved
        self.saved = 0

    def __call__(self, record: Mapping[str, Any]) -> None:
        view = 0
        for cam in self.cameras:
            try:
                frame = cam.latest(float("inf"))
            except StaleFrameError:  # no frame yet: its views keep their numbers
                view += getattr(cam, "views", 1)
                continue
            for v, image in enumerate(frame.image, start=view):
                last = self.last.get(v)
                if last is None or frame.stamp - last >= self.every_s:
                    self.last[v] = frame.stamp
                    self._save(v, frame.stamp, image)
            view += len(frame.image)

    def _save(self, view: int, stamp: float, image: np.ndarray) -> None:
        cv2 = self.cv2
        h, w = image.shape[:2]
        scale = self.max_side / max(h, w)
        if scale < 1:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            raise DataError(f"{self.folder}: OpenCV could not encode a frame of view {view}")
        name = f"view{view}/{round(stamp * 1e6)}.jpg"
        (self.folder / name).parent.mkdir(exist_ok=True)
        (self.folder / name).write_bytes(jpeg.tobytes())
        with open(self.folder / INDEX, "a", encoding="utf-8") as index:  # a line at a time: a crash keeps the rest
            index.write(json.dumps({"t": stamp, "view": view, "file": name}) + "\n")
        self.saved += 1


@dataclass
class SavedFrames:
    """The frames of a ``LOG.frames`` folder per view, in capture order."""

    folder: Path
    stamps: dict[int, np.ndarray] = field(default_factory=dict)
    files: dict[int, list[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: str | Path) -> SavedFrames:
        folder = Path(folder)
        index = folder / INDEX
        if not index.is_file():
            raise DataError(f"{folder}: no {INDEX} (written by 'vpp run --log LOG --log-frames')")
        entries: dict[int, list[tuple[float, str]]] = {}
        for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                entries.setdefault(int(item["view"]), []).append((float(item["t"]), str(item["file"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise DataError(f"{index} line {n}: not a frame entry") from None
        frames = cls(folder)
        for view, items in sorted(entries.items()):
            items.sort()
            frames.stamps[view] = np.array([t for t, _ in items])
            frames.files[view] = [f for _, f in items]
        return frames

    def at(self, view: int, t: float) -> str | None:
        """The file of ``view``'s newest frame captured at or before ``t``, or None."""
        stamps = self.stamps.get(view)
        if stamps is None:
            return None
        i = int(np.searchsorted(stamps, t, side="right")) - 1
        return self.files[view][i] if i >= 0 else None


Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, origin top left (as a decoded frame's array)


@dataclass(frozen=True)
class VideoLayout:
    """Where each part of the video is, so a test can look at it."""

    width: int
    height: int
    cameras: tuple[Box, ...]
    text: Box
    plots: tuple[Box, ...]  # one per action dimension


def layout(views: int, dims: int) -> VideoLayout:
    """Camera panels (at most ``CAMERA_SIDE`` square, leaving the text ``TEXT_MIN_WIDTH``)
    side by side, the text beside them, a grid of ``PLOT_COLUMNS`` plots a row below."""
    side = min(CAMERA_SIDE, (WIDTH - TEXT_MIN_WIDTH) // max(views, 1)) // 2 * 2
    cameras = tuple((v * side, 0, (v + 1) * side, side) for v in range(views))
    text = (views * side, 0, WIDTH, side)
    columns = min(PLOT_COLUMNS, max(dims, 1))
    rows = math.ceil(dims / columns)
    cell = WIDTH // columns
    plots = tuple((d % columns * cell, side + d // columns * PLOT_HEIGHT,
                   (d % columns + 1) * cell, side + (d // columns + 1) * PLOT_HEIGHT) for d in range(dims))
    height = -(-(side + rows * PLOT_HEIGHT) // 16) * 16
    return VideoLayout(WIDTH, height, cameras, text, plots)


@dataclass
class _Run:
    """The parts of a run log the video draws, times in seconds from the first tick."""

    instruction: str
    title: str
    dt: float
    delta: list[bool]
    tick_t: np.ndarray
    sent: np.ndarray  # [ticks, dims], NaN on a tick that sent no target
    setpoint: np.ndarray  # [ticks, dims], NaN on a tick without a robot state
    modes: list[str]  # the robot's mode per tick ("" without a state)
    chunk_t: np.ndarray  # when each chunk was accepted
    chunks: list[tuple[np.ndarray, np.ndarray]]  # (times, actions [horizon, dims]) per chunk
    events: list[tuple[float, str]]
    t0: float  # the first tick's time on the runtime's clock (the frames' clock)


def _read_run(log: str | Path) -> _Run:
    from vpp_edge.runlog import read_records

    records = read_records(log)
    ticks = [r for r in records if r.get("record") == "tick"]
    if len(ticks) < 2:
        raise DataError(f"{log}: fewer than two tick records (written by 'vpp run --log' with --log-ticks 1)")
    t0 = float(ticks[0]["t"])
    tick_t = np.array([r["t"] for r in ticks], np.float64) - t0
    dims = max(len(r.get("target") or r.get("planned") or ()) for r in ticks) or 1
    def row(values: Any) -> list[float]:  # a tick's vector, NaN where it has none (or not one per action)
        return list(values) if values and len(values) == dims else [math.nan] * dims

    sent = np.array([row(r.get("target")) for r in ticks], np.float64)
    setpoint = np.array([row((r.get("state") or {}).get("target")) for r in ticks], np.float64)
    chunk_records = [r for r in records if r.get("record") == "chunk" and r.get("actions")]
    dt = float(np.median(np.diff(tick_t)))
    chunks = [(float(r["obs_stamp"]) - t0 + dt * np.arange(len(r["actions"])), np.asarray(r["actions"], np.float64))
              for r in chunk_records]
    run = next((r for r in records if r.get("record") == "run"), {})
    events = [(float(r["t"]) - t0, str(r.get("kind", "?"))) for r in records
              if r.get("record") in ("event", "bridge_event") and r.get("kind") != "instruction"]
    for r in ticks:  # the gate's verdicts other than plain clamping
        events += [(float(r["t"]) - t0, e) for e in r.get("events", ()) if not e.startswith("clamped")]
    delta = next((list(r.get("delta_dims") or []) for r in records if r.get("record") == "handshake"), [])
    return _Run(instruction=str(run.get("instruction", "")),
                title=" | ".join(str(run[k]) for k in ("engine", "robot") if run.get(k)),
                dt=dt, delta=delta + [False] * (dims - len(delta)), tick_t=tick_t, sent=sent, setpoint=setpoint,
                modes=[str((r.get("state") or {}).get("mode", "")) for r in ticks],
                chunk_t=np.array([float(r["t"]) - t0 for r in chunk_records]), chunks=chunks,
                events=sorted(events), t0=t0)


def _limits(values: list[np.ndarray]) -> tuple[float, float]:
    """A plot's y range over everything it will ever show, with a margin."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    if not finite.size:
        return -1.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    pad = max(0.05 * (high - low), 1e-3)
    return low - pad, high + pad


def render_video(log: str | Path, out: str | Path, fps: float = 10.0,
                 frames: str | Path | None = None) -> tuple[Path, int, VideoLayout]:
    """Write the annotated video of the run log ``log`` to ``out`` (H.264 MP4). Camera
    frames come from ``frames`` (default ``LOG.frames`` when it exists); without any, the
    camera panels say how to record them. Returns (path, video frames written, layout)."""
    import av
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not fps > 0:
        raise DataError(f"--fps must be positive, not {fps}")
    run = _read_run(log)
    frames_folder = Path(frames) if frames else frames_dir(log)
    saved = SavedFrames.read(frames_folder) if frames or frames_folder.is_dir() else None
    views = max((saved.stamps if saved else {}), default=-1) + 1
    dims = run.sent.shape[1]
    lay = layout(max(views, 1), dims)
    fig = plt.figure(figsize=(lay.width / 100, lay.height / 100), dpi=100)

    def axes(box: Box, pad: tuple[int, int, int, int] = (0, 0, 0, 0)):
        """Axes filling ``box`` less ``pad`` (left, top, right, bottom) pixels."""
        x0, y0, x1, y1 = box[0] + pad[0], box[1] + pad[1], box[2] - pad[2], box[3] - pad[3]
        return fig.add_axes((x0 / lay.width, 1 - y1 / lay.height, (x1 - x0) / lay.width, (y1 - y0) / lay.height))

    blank = np.full((8, 8, 3), 40, np.uint8)
    images, labels = [], []  # labels: drawn over the images, so animated too
    for v, box in enumerate(lay.cameras):
        ax = axes(box, (2, 2, 2, 2))
        ax.set_axis_off()
        images.append(ax.imshow(blank, interpolation="bilinear", animated=True))
        labels.append(ax.text(0.02, 0.98, f"view {v}", transform=ax.transAxes, va="top", fontsize=8, color="w",
                              bbox={"facecolor": "k", "alpha": 0.5, "lw": 0}, animated=True))
        if saved is None:
            labels.append(ax.text(0.5, 0.5, "no camera frames:\nrecord them with\nvpp run --log LOG\n--log-frames",
                                  transform=ax.transAxes, ha="center", va="center", fontsize=9, color="w",
                                  animated=True))
    text_ax = axes(lay.text, (10, 8, 6, 4))
    text_ax.set_axis_off()
    text_ax.text(0, 1, _wrap(run.instruction or "(no instruction logged)", 48), va="top", fontsize=10,
                 weight="bold", transform=text_ax.transAxes)
    text_ax.text(0, 0, run.title, va="bottom", fontsize=7, color="0.4", transform=text_ax.transAxes)
    status = text_ax.text(0, 0.62, "", va="top", fontsize=10, family="monospace", transform=text_ax.transAxes,
                          animated=True)
    event_text = text_ax.text(0, 0.3, "", va="top", fontsize=8, color="C3", transform=text_ax.transAxes,
                              animated=True)

    plot_artists = []
    for d, box in enumerate(lay.plots):
        ax = axes(box, (44, 16, 8, 18))
        ax.tick_params(labelsize=6, pad=1)
        # time relative to the frame's: the axes never move, so they are drawn once (blitting)
        ax.set_xlim(-WINDOW_BEFORE_S, WINDOW_AFTER_S)
        ticks = np.arange(-math.floor(WINDOW_BEFORE_S), math.floor(WINDOW_AFTER_S) + 1)
        ax.set_xticks(ticks, [f"{x:+d} s" if x else "now" for x in ticks])
        ax.set_title(f"a{d}" + (" (step)" if run.delta[d] else ""), fontsize=7, pad=2, loc="left")
        ax.set_ylim(*_limits([run.sent[:, d], *(c[:, d] for _, c in run.chunks)]
                             + ([] if run.delta[d] else [run.setpoint[:, d]])))
        predicted, = ax.plot([], [], ".", ms=3, color="C0", label="predicted chunk", animated=True)
        executed, = ax.plot([], [], "-", lw=1.2, color="C1", label="target sent", animated=True)
        setpoint, = ax.plot([], [], "-", lw=0.8, color="C2", label="robot setpoint", animated=True)
        ax.axvline(0, color="0.5", lw=0.8)
        if d == 0:
            ax.legend(loc="upper left", fontsize=5, ncol=3, frameon=False, borderaxespad=0.1)
        plot_artists.append((predicted, executed, setpoint))
    fig.canvas.draw()  # everything but the animated artists, once
    background = fig.canvas.copy_from_bbox(fig.bbox)
    animated = [*images, *labels, status, event_text, *(a for artists in plot_artists for a in artists)]

    count = int(math.floor(run.tick_t[-1] * fps + 1e-9)) + 1
    decoded: dict[str, np.ndarray] = {}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = lay.width, lay.height, "yuv420p"
        for k in range(count):
            t = k / fps
            _draw(run, t, saved, views, images, status, event_text, plot_artists, decoded)
            fig.canvas.restore_region(background)
            for artist in animated:
                fig.draw_artist(artist)
            rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    plt.close(fig)
    return out, count, lay


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3])


def _draw(run: _Run, t: float, saved: SavedFrames | None, views: int, images: list, status: Any, event_text: Any,
          plot_artists: list, decoded: dict[str, np.ndarray]) -> None:
    """Update every artist to time ``t`` (seconds from the first tick)."""
    import cv2

    for v in range(views):
        name = saved.at(v, run.t0 + t) if saved else None
        if name is not None:
            if name not in decoded:
                bgr = cv2.imread(str(saved.folder / name))
                if bgr is None:
                    raise DataError(f"{saved.folder / name}: not a readable image")
                decoded.clear()  # one frame per view is ever shown again: keep memory flat
                decoded[name] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            images[v].set_data(decoded[name])
    tick = int(np.searchsorted(run.tick_t, t, side="right")) - 1
    sending = bool(np.isfinite(run.sent[tick]).any())
    chunk = int(np.searchsorted(run.chunk_t, t, side="right")) - 1
    status.set_text(f"t {t:6.2f} s   tick {tick + 1}/{len(run.tick_t)}\n"
                    f"chunks {chunk + 1}   {'sending targets' if sending else 'HOLDING (no target)'}\n"
                    f"robot  {run.modes[tick] or '(no state)'}")
    status.set_color("k" if sending else "C3")
    recent = [kind for when, kind in run.events if t - EVENT_SHOWN_S < when <= t]
    event_text.set_text("\n".join(dict.fromkeys(recent[-4:])))  # each kind once, newest last
    shown = (run.tick_t <= t) & (run.tick_t >= t - WINDOW_BEFORE_S - 1)
    past = run.tick_t[shown] - t  # the plots' x: seconds from this frame's time
    for d, (predicted, executed, setpoint) in enumerate(plot_artists):
        executed.set_data(past, run.sent[shown, d])
        setpoint.set_data(([], []) if run.delta[d] else (past, run.setpoint[shown, d]))
        if chunk >= 0:
            times, actions = run.chunks[chunk]
            predicted.set_data(times - t, actions[:, d])
