"""Replay of recorded episodes (official sample format) as live cameras: all views step
together, paced at the recorded rate (or as fast as possible), looping at the end."""

from __future__ import annotations

import time

import numpy as np

from vpp_edge.episodes import Episode
from vpp_edge.errors import DataError
from vpp_edge.preprocess import prepare_frame

from .base import Camera, Frame
from .factory import CAMERAS, CameraRequest


class ReplayCameras(Camera):
    """One capture thread for all views of an episode, so views stay in sync."""

    def __init__(self, episode: Episode, num_views: int, size: int, fps: float | None = None, loop: bool = True):
        super().__init__(f"replay:{episode.episode_id}")
        if episode.num_views < num_views:
            raise DataError(f"{episode.annotation}: {episode.num_views} view(s), the model needs {num_views}")
        videos = [episode.frames(v) for v in range(num_views)]
        length = min(len(v) for v in videos)
        # Decode and prepare once: replay then costs nothing on the capture thread.
        self.frames = np.stack([[prepare_frame(v[t], size) for v in videos] for t in range(length)])
        self.fps = fps if fps is not None else (episode.fps() or 10.0)
        self.loop = loop

    def capture_loop(self) -> None:
        period = 1.0 / self.fps if self.fps > 0 else 0.0
        t = 0
        next_t = time.monotonic()
        while not self._stop.is_set():
            if t >= len(self.frames):
                if not self.loop:
                    return  # the stream ends: frames age and the runtime reports it
                t = 0
            self._publish(Frame(self.frames[t], time.monotonic(), t))
            t += 1
            next_t += period
            self._stop.wait(max(0.0, next_t - time.monotonic()) if period else 0.001)



@CAMERAS.register("replay")
def _replay(req: CameraRequest) -> list[Camera]:
    return [ReplayCameras(req.need_episode(), req.views, req.size, fps=req.fps)]
