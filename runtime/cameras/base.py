"""The camera interface shared by OpenCV, DALI and replay sources."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from vpp_edge.errors import VPPError

from ..threads import describe


class StaleFrameError(VPPError):
    """A camera's newest frame is older than allowed (unplugged, stalled, or never started)."""


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # uint8 [V, S, S, 3]: every view the source owns, cropped/resized for the model
    stamp: float  # monotonic capture time (s)
    index: int  # frame counter of the source


class Camera(ABC):
    """A capture thread that keeps only the newest frame (no queue, no backlog)."""

    def __init__(self, name: str):
        self.name = name
        self._latest: Frame | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # the latest problem (may clear when frames resume)
        self.failure: str | None = None  # the capture thread died: the runtime must end
        self.dropped = 0  # frames refused (malformed, empty, wrong view count)

    @property
    def delivered(self) -> bool:
        """Whether the source has produced at least one frame since it was created."""
        with self._lock:
            return self._latest is not None

    def start(self) -> "Camera":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _publish(self, frame: Frame) -> None:
        with self._lock:
            self._latest = frame

    def _run(self) -> None:
        try:
            self.capture_loop()
        except Exception as exc:  # reported through frame age, .error, and .failure for the liveness check
            self.error = f"{type(exc).__name__}: {exc}"
            self.failure = describe(self._thread.name if self._thread else self.name, exc)

    def _drop(self, why: str) -> None:
        """A frame refused: counted and reported, the capture goes on."""
        self.dropped += 1
        self.error = why

    @abstractmethod
    def capture_loop(self) -> None:
        """Grab frames until ``self._stop`` is set, calling ``self._publish``."""

    def latest(self, max_age_s: float, now: float | None = None) -> Frame:
        """The newest frame, or :class:`StaleFrameError` if it is older than ``max_age_s``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            frame = self._latest
        if frame is None:
            raise StaleFrameError(f"camera '{self.name}' has produced no frame" + (f" ({self.error})" if self.error else ""))
        age = now - frame.stamp
        if age > max_age_s:
            raise StaleFrameError(f"camera '{self.name}' frame is {age * 1e3:.0f} ms old (limit "
                                  f"{max_age_s * 1e3:.0f} ms)" + (f"; {self.error}" if self.error else ""))
        return frame
