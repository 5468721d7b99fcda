"""Cameras streamed over ZeroMQ (a simulator bridge's rendered views, or any camera
server speaking the protocol's ``camera`` message): latest-only, timestamped at capture."""

from __future__ import annotations

import cv2
import numpy as np
import zmq

from vpp_edge.preprocess import prepare_frame

from .. import protocol as P
from ..transport import make_socket, recv
from .base import Camera, Frame
from .factory import CAMERAS, CameraRequest


class ZmqCameras(Camera):
    """All views from one ``CameraFrames`` stream, prepared for the model."""

    def __init__(self, endpoint: str, views: int, size: int, context: zmq.Context | None = None,
                 not_before: float = 0.0):
        super().__init__(f"zmq:{endpoint}")
        self.endpoint, self.views, self.size = endpoint, views, size
        self.not_before = not_before  # ignore frames taken earlier (e.g. before a simulator reset)
        self._ctx = context or zmq.Context.instance()

    def capture_loop(self) -> None:
        sock = make_socket(self._ctx, zmq.SUB, self.endpoint, bind=False, conflate=True, timeout_ms=100)
        try:
            while not self._stop.is_set():
                try:
                    msg = recv(sock)
                except P.ProtocolError as exc:
                    self._drop(f"bad camera message: {exc}")
                    continue
                if not isinstance(msg, P.CameraFrames) or msg.stamp < self.not_before:
                    continue
                if msg.images.shape[0] < self.views:
                    self._drop(f"stream has {msg.images.shape[0]} view(s), the model needs {self.views}")
                    continue
                try:  # the stream is untrusted: a frame the preprocessing cannot take is dropped, not fatal
                    images = np.stack([prepare_frame(view, self.size) for view in msg.images[: self.views]])
                except (ValueError, cv2.error) as exc:
                    self._drop(f"camera frame refused: {exc}")
                    continue
                self.error = None
                self._publish(Frame(images, msg.stamp, msg.index))
        finally:
            sock.close(linger=0)



@CAMERAS.register("zmq")
def _zmq(req: CameraRequest) -> list[Camera]:
    return [ZmqCameras(req.arg or P.CAMERA_ENDPOINT, req.views, req.size)]
