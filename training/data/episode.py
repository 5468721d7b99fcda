"""The one episode record every dataset reader produces, and the frame sources behind it.

A reader (official sample format, LeRobot, CALVIN) turns its files into
:class:`TrainEpisode` objects: instruction, actions, optional states, and a
:class:`FrameSource` that decodes one camera view on demand. Everything downstream
(checks, statistics, samplers, feature caches) sees only this record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import av
import numpy as np

from vpp_edge.episodes import decode_video
from vpp_edge.errors import DataError


class FrameSource(Protocol):
    """Decoded RGB frames of an episode's camera views."""

    @property
    def num_views(self) -> int: ...

    def count(self, view: int) -> int:
        """Frames of ``view`` (from headers or metadata where possible: cheap)."""

    def read(self, view: int) -> np.ndarray:
        """All frames of ``view``: uint8 [T, H, W, 3]."""

    def describe(self, view: int) -> str:
        """The file behind ``view``, for error messages."""


@dataclass(frozen=True)
class TrainEpisode:
    """One demonstration, ready for checks and sampling.

    ``actions`` has one row per frame, or one fewer (the last frame has no action, as in
    the Bridge and RT-1 samples). ``name`` identifies the file (and the episode within
    it) in every message about this episode.
    """

    name: str
    instruction: str
    actions: np.ndarray  # float32 [N, A]
    frames: FrameSource
    states: np.ndarray | None = None  # float32 [N', S]
    source: str = ""  # the dataset (source) it came from

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])


def count_video_frames(path: Path) -> int:
    """Frame count of a video from its header; counts packets when the header has none."""
    if not path.is_file():
        raise DataError(f"{path}: video file not found")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for p in container.demux(stream) if p.size)
    except (av.FFmpegError, IndexError) as exc:
        raise DataError(f"{path}: cannot read video ({exc})") from None


def decode_segment(path: Path, start_s: float, end_s: float, fps: float) -> np.ndarray:
    """RGB frames with presentation time in [start_s, end_s) of a video holding many
    episodes one after another (LeRobot v3 files)."""
    if not path.is_file():
        raise DataError(f"{path}: video file not found")
    half = 0.5 / fps  # frame times are exact multiples of 1/fps up to rounding
    frames = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if start_s > 0 and stream.time_base:
                container.seek(int(max(0.0, start_s - 1.0) / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else 0.0
                if t < start_s - half:
                    continue
                if t >= end_s - half:
                    break
                frames.append(frame.to_ndarray(format="rgb24"))
    except (av.FFmpegError, IndexError) as exc:
        raise DataError(f"{path}: cannot decode video ({exc})") from None
    if not frames:
        raise DataError(f"{path}: no frames between {start_s:.3f} s and {end_s:.3f} s")
    return np.stack(frames)


class VideoFiles:
    """One video file per view (official sample format, LeRobot v2)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = tuple(Path(p) for p in paths)

    @property
    def num_views(self) -> int:
        return len(self.paths)

    def count(self, view: int) -> int:
        return count_video_frames(self.paths[view])

    def read(self, view: int) -> np.ndarray:
        return decode_video(self.paths[view])

    def describe(self, view: int) -> str:
        return str(self.paths[view])


class VideoSegments:
    """One time segment per view of videos shared by many episodes (LeRobot v3)."""

    def __init__(self, segments: Sequence[tuple[Path, float, float]], fps: float):
        self.segments = tuple((Path(p), float(a), float(b)) for p, a, b in segments)
        self.fps = fps

    @property
    def num_views(self) -> int:
        return len(self.segments)

    def count(self, view: int) -> int:
        path, start, end = self.segments[view]
        if not path.is_file():
            raise DataError(f"{path}: video file not found")
        return int(round((end - start) * self.fps))

    def read(self, view: int) -> np.ndarray:
        path, start, end = self.segments[view]
        return decode_segment(path, start, end, self.fps)

    def describe(self, view: int) -> str:
        path, start, end = self.segments[view]
        return f"{path} [{start:.3f} s, {end:.3f} s)"


class ArrayFrames:
    """Frames already in memory (images stored inside parquet files, tests)."""

    def __init__(self, views: Sequence[np.ndarray], name: str):
        self.views = tuple(views)
        self.name = name

    @property
    def num_views(self) -> int:
        return len(self.views)

    def count(self, view: int) -> int:
        return len(self.views[view])

    def read(self, view: int) -> np.ndarray:
        return self.views[view]

    def describe(self, view: int) -> str:
        return f"{self.name} (view {view})"
