"""Cameras decoded by NVIDIA DALI: MJPEG streams in, model-ready views out.

USB cameras send JPEG frames; decoding them is the costliest part of capture. Here each
camera only *grabs* compressed frames (:class:`V4L2MjpegStream`, or
:class:`ReplayMjpegStream` to replay a recording as if it were a camera), and one DALI
pipeline decodes the newest frame of every view as one batch, fed through
``external_source``: on the GPU (``mixed`` nvJPEG decode, resize on the GPU) where CUDA
is available, otherwise a CPU pipeline (``device_id=None``).

Geometry matches :func:`vpp_edge.preprocess.prepare_frame`: the shorter side is resized
to the model size (anti-aliased) and the centre square is cropped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import cv2
import numpy as np

from vpp_edge.episodes import Episode
from vpp_edge.errors import DataError
from vpp_edge.extras import require

from .base import Camera, Frame, StaleFrameError
from .factory import CAMERAS, CameraRequest


class DaliDecoder:
    """Decode a batch of JPEG images (one per view) to uint8 ``[V, size, size, 3]``."""

    def __init__(self, size: int, views: int, device: str = "auto", threads: int = 2):
        dali = require("nvidia.dali", "the DALI camera decoder")
        from nvidia.dali import fn, types

        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"DALI device must be auto, cpu or gpu, not {device!r}")
        if device == "auto":
            device = "gpu" if _cuda_devices() > 0 else "cpu"
        self.size, self.views, self.device = size, views, device

        # Synchronous, one batch in flight: the newest frames go in, their decode comes out,
        # nothing is prefetched (prefetching would hand out old frames).
        @dali.pipeline_def(batch_size=views, num_threads=threads, device_id=0 if device == "gpu" else None,
                           prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def pipeline():
            jpegs = fn.external_source(name="jpeg", dtype=types.UINT8, batch=True)
            images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu",
                                       output_type=types.RGB)
            images = fn.resize(images, resize_shorter=size, antialias=True)
            return fn.crop(images, crop=(size, size))

        self._pipe = pipeline()
        self._pipe.build()

    def decode(self, jpegs: Sequence[np.ndarray]) -> np.ndarray:
        if len(jpegs) != self.views:
            raise ValueError(f"expected {self.views} JPEG image(s), got {len(jpegs)}")
        self._pipe.feed_input("jpeg", [np.asarray(j, np.uint8) for j in jpegs])
        (out,) = self._pipe.run()
        if self.device == "gpu":
            out = out.as_cpu()
        return np.ascontiguousarray(out.as_array())


def _cuda_devices() -> int:
    from nvidia.dali import backend

    try:
        return backend.GetCUDADeviceCount()
    except RuntimeError:  # no driver at all
        return 0


class V4L2MjpegStream(Camera):
    """A V4L2 device in MJPG mode whose frames are kept compressed (OpenCV raw mode)."""

    def __init__(self, device: int | str, width: int = 640, height: int = 480, fps: float = 30.0):
        super().__init__(f"v4l2-mjpeg:{device}")
        self.device, self.width, self.height, self.fps = device, width, height, fps

    def capture_loop(self) -> None:
        cap = cv2.VideoCapture(self.device, cv2.CAP_V4L2)
        if not cap.isOpened():
            raise RuntimeError(f"cannot open V4L2 device {self.device!r}")
        cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"MJPG"))
        cap.set(cv2.CAP_PROP_CONVERT_RGB, 0)  # hand out the JPEG bytes, do not decode here
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        cap.set(cv2.CAP_PROP_FPS, self.fps)
        index = 0
        try:
            while not self._stop.is_set():
                ok, buf = cap.read()
                if not ok:
                    self.error = "read failed"
                    self._stop.wait(0.01)
                    continue
                self.error = None
                self._publish(Frame(buf.reshape(-1), time.monotonic(), index))
                index += 1
        finally:
            cap.release()


class ReplayMjpegStream(Camera):
    """One view of a recorded episode, JPEG-encoded and paced like a live MJPEG camera."""

    def __init__(self, episode: Episode, view: int, fps: float | None = None, quality: int = 90, loop: bool = True):
        super().__init__(f"replay-mjpeg:{episode.episode_id}:{view}")
        if view >= episode.num_views:
            raise DataError(f"{episode.annotation}: no view {view} ({episode.num_views} view(s))")
        encode = [cv2.IMWRITE_JPEG_QUALITY, quality]
        self.jpegs = [np.frombuffer(cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), encode)[1], np.uint8)
                      for f in episode.frames(view)]
        self.fps = fps if fps is not None else (episode.fps() or 10.0)
        self.loop = loop

    def capture_loop(self) -> None:
        period, t, next_t = 1.0 / self.fps, 0, time.monotonic()
        while not self._stop.is_set():
            if t >= len(self.jpegs):
                if not self.loop:
                    return
                t = 0
            self._publish(Frame(self.jpegs[t], time.monotonic(), t))
            t += 1
            next_t += period
            self._stop.wait(max(0.0, next_t - time.monotonic()))


class DaliCameras(Camera):
    """All views decoded together: publishes a frame whenever any view has a new JPEG.

    The frame's stamp is the *oldest* view's capture time, so the runtime's frame-age check
    is conservative; a stalled view stops publication (and the age check reports it).
    """

    def __init__(self, streams: Sequence[Camera], size: int, device: str = "auto", max_view_age_s: float = 0.5):
        super().__init__("dali:" + "+".join(s.name for s in streams))
        if not streams:
            raise ValueError("DaliCameras needs at least one stream")
        self.streams = list(streams)
        self.decoder = DaliDecoder(size, len(streams), device)
        self.max_view_age_s = max_view_age_s

    def start(self) -> "DaliCameras":
        for s in self.streams:
            s.start()
        return super().start()

    def stop(self) -> None:
        super().stop()
        for s in self.streams:
            s.stop()

    def capture_loop(self) -> None:
        last: tuple[int, ...] | None = None
        index = 0
        while not self._stop.is_set():
            try:
                frames = [s.latest(self.max_view_age_s) for s in self.streams]
            except StaleFrameError as exc:
                self.error = str(exc)
                self._stop.wait(0.005)
                continue
            key = tuple(f.index for f in frames)
            if key == last:
                self._stop.wait(0.002)
                continue
            self.error = None
            images = self.decoder.decode([f.image for f in frames])
            self._publish(Frame(images, min(f.stamp for f in frames), index))
            last, index = key, index + 1



@CAMERAS.register("replay-dali")
def _replay_dali(req: CameraRequest) -> list[Camera]:
    episode = req.need_episode()
    return [DaliCameras([ReplayMjpegStream(episode, v, fps=req.fps) for v in range(req.views)], req.size,
                        req.dali_device)]


@CAMERAS.register("dali")
def _dali(req: CameraRequest) -> list[Camera]:
    return [DaliCameras([V4L2MjpegStream(d) for d in req.devices()], req.size, req.dali_device)]
