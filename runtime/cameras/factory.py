"""Camera sources from one command-line spec.

``replay``                      the episode's views, pre-decoded (the default; no camera needed)
``replay-dali``                 the episode's views as MJPEG streams, decoded by DALI
``v4l2:/dev/video0,/dev/video2`` V4L2 cameras decoded by OpenCV (one per view, in view order)
``dali:/dev/video0,/dev/video2`` V4L2 MJPEG cameras decoded together by DALI
``gstreamer:/dev/video0,...``    V4L2 MJPEG cameras decoded by a GStreamer pipeline (Jetson: hardware)
``auto:/dev/video0,/dev/video2`` the best decoder here: DALI, else GStreamer, else OpenCV (gstreamer.py)
``zmq[:ENDPOINT]``               views streamed by a simulator bridge (default tcp://127.0.0.1:5705)
"""

from __future__ import annotations

from vpp_edge.episodes import Episode
from vpp_edge.errors import ConfigError

from .base import Camera

KINDS = ("replay", "replay-dali", "v4l2", "dali", "gstreamer", "auto", "zmq")


def _devices(spec: str, views: int) -> list[int | str]:
    devices = [int(d) if d.isdigit() else d for d in spec.split(",") if d]
    if len(devices) != views:
        raise ConfigError(f"camera spec lists {len(devices)} device(s); the model takes {views} view(s)")
    return devices


def make_cameras(spec: str, views: int, size: int, episode: Episode | None = None, fps: float | None = None,
                 dali_device: str = "auto") -> list[Camera]:
    """The camera sources for ``spec`` (see the module docstring); not started yet."""
    kind, _, devices = spec.partition(":")
    if kind not in KINDS:
        raise ConfigError(f"unknown camera source {kind!r}; choose from {', '.join(KINDS)}")
    if kind.startswith("replay"):
        if episode is None:
            raise ConfigError(f"camera source {kind!r} needs an episode to replay")
        if kind == "replay":
            from .replay import ReplayCameras

            return [ReplayCameras(episode, views, size, fps=fps)]
        from .dali import DaliCameras, ReplayMjpegStream

        return [DaliCameras([ReplayMjpegStream(episode, v, fps=fps) for v in range(views)], size, dali_device)]
    if kind == "zmq":
        from .. import protocol as P
        from .network import ZmqCameras

        return [ZmqCameras(devices or P.CAMERA_ENDPOINT, views, size)]
    if kind == "v4l2":
        from .opencv import OpenCVCamera

        return [OpenCVCamera(d, size) for d in _devices(devices, views)]
    if kind in ("auto", "gstreamer"):
        from .gstreamer import DecoderChoice, _probe_gstreamer, auto_cameras

        choice = None
        if kind == "gstreamer":
            ok, detail = _probe_gstreamer()
            if not ok:
                raise ConfigError(f"camera source 'gstreamer' unavailable here: {detail}")
            choice = DecoderChoice("gstreamer", detail)
        return auto_cameras(_devices(devices, views), size, dali_device, choice)
    from .dali import DaliCameras, V4L2MjpegStream

    return [DaliCameras([V4L2MjpegStream(d) for d in _devices(devices, views)], size, dali_device)]
