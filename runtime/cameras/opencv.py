"""V4L2 cameras through OpenCV: MJPG, a one-frame driver buffer, driver timestamps."""

from __future__ import annotations

import time

import cv2

from vpp_edge.preprocess import prepare_frame

from .base import Camera, Frame
from .factory import CAMERAS, CameraRequest


class OpenCVCamera(Camera):
    """One V4L2 device (``/dev/videoN`` or its index)."""

    def __init__(self, device: int | str, size: int, width: int = 640, height: int = 480, fps: float = 30.0,
                 reopen_after: int = 30):
        super().__init__(f"v4l2:{device}")
        self.device, self.size, self.width, self.height, self.fps = device, size, width, height, fps
        self.reopen_after = reopen_after
        self.decode_ms: float | None = None  # the latest frame's retrieve (decode) time

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.device, cv2.CAP_V4L2)
        if not cap.isOpened():
            raise RuntimeError(f"cannot open V4L2 device {self.device!r}")
        cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"MJPG"))
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # never hand out an old buffered frame
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        cap.set(cv2.CAP_PROP_FPS, self.fps)
        return cap

    def capture_loop(self) -> None:
        cap = self._open()
        failures, index = 0, 0
        try:
            while not self._stop.is_set():
                ok = cap.grab()  # waits for the next frame
                received = time.monotonic()
                ok, bgr = cap.retrieve() if ok else (False, None)  # decodes it (GStreamer: already decoded)
                self.decode_ms = (time.monotonic() - received) * 1e3
                if not ok:
                    failures += 1
                    self.error = f"read failed {failures} time(s)"
                    if failures >= self.reopen_after:  # unplugged and replugged: try again
                        cap.release()
                        self._stop.wait(0.5)
                        cap = self._open()
                        failures = 0
                    continue
                failures, self.error = 0, None
                # V4L2 buffers carry a CLOCK_MONOTONIC driver timestamp (ms); use it when sane.
                driver_ms = cap.get(cv2.CAP_PROP_POS_MSEC)
                stamp = driver_ms / 1e3 if 0 < received - driver_ms / 1e3 < 1.0 else received
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                self._publish(Frame(prepare_frame(rgb, self.size)[None], stamp, index))
                index += 1
        finally:
            cap.release()



@CAMERAS.register("v4l2")
def _v4l2(req: CameraRequest) -> list[Camera]:
    return [OpenCVCamera(d, req.size) for d in req.devices()]
