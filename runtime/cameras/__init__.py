"""Camera sources: each keeps its newest timestamped frame; the runtime never reuses a
stale frame silently (frame age is checked against the robot's threshold)."""

from .base import Camera, Frame, StaleFrameError
from .replay import ReplayCameras

__all__ = ["Camera", "Frame", "ReplayCameras", "StaleFrameError"]
