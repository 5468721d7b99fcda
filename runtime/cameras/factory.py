"""Camera sources by kind: a registry (:data:`CAMERAS`) of builders, one per kind, each in
its camera's module, and :func:`make_cameras` that reads a spec and asks the registry.

``replay``                      the episode's views, pre-decoded (the default; no camera needed)
``replay-dali``                 the episode's views as MJPEG streams, decoded by DALI
``v4l2:/dev/video0,/dev/video2`` V4L2 cameras decoded by OpenCV (one per view, in view order)
``dali:/dev/video0,/dev/video2`` V4L2 MJPEG cameras decoded together by DALI
``gstreamer:/dev/video0,...``    V4L2 MJPEG cameras decoded by a GStreamer pipeline (Jetson: hardware)
``auto:/dev/video0,/dev/video2`` the best decoder here: DALI, else GStreamer, else OpenCV (gstreamer.py)
``zmq[:ENDPOINT]``               views streamed by a simulator bridge (default tcp://127.0.0.1:5705)

Devices may also be given per view name of the model's preset (``{static: /dev/video0,
gripper: /dev/video2}`` in a runtime config): they are bound by name, not by position.

A new kind is one module with a builder decorated ``@CAMERAS.register("kind")`` taking a
:class:`CameraRequest` and returning the (unstarted) cameras, plus its line in
``CAMERAS``' built-ins below (or an import of that module before the runtime is built).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from vpp_edge.episodes import Episode
from vpp_edge.errors import ConfigError
from vpp_edge.registry import Registry

from .base import Camera

CameraBuilder = Callable[["CameraRequest"], "list[Camera]"]

CAMERAS: Registry[CameraBuilder] = Registry("camera source", {
    "replay": "vpp_edge.runtime.cameras.replay",
    "replay-dali": "vpp_edge.runtime.cameras.dali",
    "v4l2": "vpp_edge.runtime.cameras.opencv",
    "dali": "vpp_edge.runtime.cameras.dali",
    "gstreamer": "vpp_edge.runtime.cameras.gstreamer",
    "auto": "vpp_edge.runtime.cameras.gstreamer",
    "zmq": "vpp_edge.runtime.cameras.network",
})
KINDS = tuple(CAMERAS.names())  # the built-in kinds


@dataclass(frozen=True)
class CameraRequest:
    """What a camera builder gets: ``arg`` is the spec's text after ``kind:`` (devices in view
    order, comma-separated, or an endpoint), and the model's views and image size."""

    kind: str
    arg: str
    views: int
    size: int
    episode: Episode | None = None
    fps: float | None = None
    dali_device: str = "auto"

    def devices(self) -> list[int | str]:
        """One device per view (``/dev/video0`` or a V4L2 index); a count that differs is an error."""
        devices = [int(d) if d.isdigit() else d for d in self.arg.split(",") if d]
        if len(devices) != self.views:
            raise ConfigError(f"camera spec lists {len(devices)} device(s); the model takes {self.views} view(s)")
        return devices

    def need_episode(self) -> Episode:
        if self.episode is None:
            raise ConfigError(f"camera source {self.kind!r} needs an episode to replay")
        return self.episode


def devices_by_view(devices: Mapping[str, object], view_names: Sequence[str]) -> str:
    """Per-view devices (``{view name: device}``) as the spec's comma list in the preset's view
    order; names that are not the preset's views (or views left without one) are refused."""
    given, wanted = set(map(str, devices)), list(view_names)
    if given != set(wanted):
        raise ConfigError(f"cameras are bound to the model's views by name: got {sorted(given)}, the preset's views "
                          f"are {wanted} (missing {sorted(set(wanted) - given)}, unknown {sorted(given - set(wanted))})")
    return ",".join(str(devices[name]) for name in wanted)


def make_cameras(spec: str, views: int, size: int, episode: Episode | None = None, fps: float | None = None,
                 dali_device: str = "auto") -> list[Camera]:
    """The camera sources for ``spec`` (``kind[:arg]``, see the module docstring); not started yet."""
    kind, _, arg = spec.partition(":")
    return CAMERAS.get(kind)(CameraRequest(kind, arg, views, size, episode, fps, dali_device))
