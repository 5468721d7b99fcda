"""V4L2 MJPEG cameras decoded by GStreamer through OpenCV (``cv2.CAP_GSTREAMER``), and the
choice of the camera decoder on the robot (``--cameras auto:DEVICES``).

On a Jetson, JetPack's own OpenCV is built with GStreamer and JetPack ships hardware JPEG
decoding as GStreamer elements (``nvv4l2decoder mjpeg=1``, ``nvjpegdec``): the CPU only
moves compressed frames and the final BGR image. PyPI's ``opencv-python-headless`` has no
GStreamer: the deploy agent therefore leaves it out of the robot's venv when the system's
cv2 (seen through ``--system-site-packages``) imports there and has GStreamer, and installs
it from the wheelhouse only as the fallback (deploy profiles' ``opencv``; docs/deploy.md).
The probe says which cv2 is imported, and when a venv's OpenCV shadows the system's.

``auto`` takes, in this order, the first decoder that works here (a registry, in data):
DALI (``nvidia.dali`` importable), GStreamer (OpenCV built with it and a JPEG decoder
element present: hardware first, ``jpegdec`` in software last), else OpenCV on the CPU.
The choice and the reason the others were passed over are logged; each camera reports
its decode latency (``decode_ms``) where it can be separated from waiting for a frame.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2

from vpp_edge.errors import ConfigError

from .base import Camera
from .cv2_probe import describe, has_gstreamer, summary
from .factory import CAMERAS, CameraRequest
from .opencv import OpenCVCamera

log = logging.getLogger(__name__)

# GStreamer JPEG decoders, preferred first: (element, pipeline fragment from image/jpeg to raw video)
GST_DECODERS = (
    ("nvv4l2decoder", "nvv4l2decoder mjpeg=1 ! nvvidconv ! video/x-raw,format=BGRx"),  # Jetson NVJPG engine
    ("nvjpegdec", "nvjpegdec ! video/x-raw"),  # Jetson, nvJPEG
    ("jpegdec", "jpegdec"),  # libjpeg on the CPU (gstreamer1.0-plugins-good)
)


# Where a distribution's OpenCV bindings live (JetPack: python3.10/dist-packages/cv2; Debian:
# python3/dist-packages/cv2.cpython-*.so): looked at only to explain a shadowed system cv2.
SYSTEM_CV2_GLOB = "python3*/dist-packages/cv2*"


def opencv_has_gstreamer() -> bool:
    """Whether this OpenCV was built with the GStreamer video I/O backend."""
    return has_gstreamer(cv2.getBuildInformation())


def shadowed_system_cv2(lib: Path = Path("/usr/lib")) -> list[str]:
    """The system's OpenCV bindings that are not the imported cv2 (a venv's OpenCV comes first)."""
    return sorted(str(p) for p in lib.glob(SYSTEM_CV2_GLOB) if not str(cv2.__file__).startswith(str(p)))


def gst_element(name: str, inspect: str = "gst-inspect-1.0") -> bool:
    """Whether GStreamer here has element ``name`` (``gst-inspect-1.0 NAME`` exits 0)."""
    tool = shutil.which(inspect)
    if tool is None:
        return False
    try:
        return subprocess.run([tool, name], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def gst_decoder(has_element: Callable[[str], bool] = gst_element) -> tuple[str, str] | None:
    """The preferred JPEG decoder element present here, as (name, pipeline fragment)."""
    return next(((n, f) for n, f in GST_DECODERS if has_element(n)), None)


def gst_pipeline(source: str, width: int, height: int, fps: float, decoder: str) -> str:
    """An appsink pipeline: ``source`` (e.g. ``v4l2src device=/dev/video0``) giving MJPEG,
    ``decoder``, BGR out; the sink keeps only the newest frame (no queue of old frames)."""
    return (f"{source} ! image/jpeg,width={width},height={height},framerate={int(round(fps))}/1 ! "
            f"{decoder} ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false")


class GStreamerCamera(OpenCVCamera):
    """One V4L2 MJPEG device decoded by a GStreamer pipeline (hardware on a Jetson)."""

    def __init__(self, device: int | str, size: int, decoder: tuple[str, str], source: str | None = None, **kwargs):
        super().__init__(device, size, **kwargs)
        self.name = f"gstreamer:{device}"
        self.decoder_name = decoder[0]
        dev = f"/dev/video{device}" if isinstance(device, int) else device
        self.pipeline = gst_pipeline(source or f"v4l2src device={dev}", self.width, self.height, self.fps, decoder[1])

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.pipeline, cv2.CAP_GSTREAMER)
        if not cap.isOpened():
            raise RuntimeError(f"GStreamer pipeline did not start: {self.pipeline}")
        return cap


@dataclass(frozen=True)
class DecoderChoice:
    """Which decoder ``auto`` picked, and why each one before it was passed over."""

    kind: str  # dali | gstreamer | opencv
    detail: str
    passed_over: tuple[str, ...] = ()

    def line(self) -> str:
        skipped = "; ".join(self.passed_over)
        return f"camera decoding: {self.kind} ({self.detail})" + (f"; not {skipped}" if skipped else "")


def _probe_dali() -> tuple[bool, str]:
    from vpp_edge.extras import is_available

    return (True, "nvidia.dali") if is_available("nvidia.dali") else (False, "dali: nvidia.dali not importable")


def _probe_gstreamer(has_element: Callable[[str], bool] = gst_element) -> tuple[bool, str]:
    facts = describe(cv2)
    if not facts["gstreamer"]:
        shadowed = shadowed_system_cv2()
        hint = (f"; the system's OpenCV at {shadowed[0]} is not the one imported (JetPack's has GStreamer): "
                "`vpp deploy` uses it when it imports in the venv (see the env step's 'OpenCV' line), "
                "by hand: pip uninstall opencv-python-headless in the venv" if shadowed else "")
        return False, f"gstreamer: {summary(facts)}{hint}"
    found = gst_decoder(has_element)
    if found is None:
        return False, f"gstreamer: no JPEG decoder element ({', '.join(n for n, _ in GST_DECODERS)}); {summary(facts)}"
    log.info("gstreamer decoding through %s", summary(facts))
    return True, found[0]


# name -> availability probe, in preference order
DECODER_PROBES: dict[str, Callable[[], tuple[bool, str]]] = {
    "dali": _probe_dali,
    "gstreamer": _probe_gstreamer,
    "opencv": lambda: (True, "CPU decode"),
}


def choose_decoder(probes: dict[str, Callable[[], tuple[bool, str]]] | None = None) -> DecoderChoice:
    """The first decoder in ``probes`` (default :data:`DECODER_PROBES`) that works here."""
    passed: list[str] = []
    for kind, probe in (probes or DECODER_PROBES).items():
        ok, detail = probe()
        if ok:
            choice = DecoderChoice(kind, detail, tuple(passed))
            log.info("%s", choice.line())
            return choice
        passed.append(detail)
    raise RuntimeError("no camera decoder available: " + "; ".join(passed))


def auto_cameras(devices: list[int | str], size: int, dali_device: str = "auto",
                 choice: DecoderChoice | None = None) -> list[Camera]:
    """Cameras for ``devices`` with the decoder :func:`choose_decoder` picks."""
    choice = choice or choose_decoder()
    if choice.kind == "dali":
        from .dali import DaliCameras, V4L2MjpegStream

        return [DaliCameras([V4L2MjpegStream(d) for d in devices], size, dali_device)]
    if choice.kind == "gstreamer":
        decoder = next(d for d in GST_DECODERS if d[0] == choice.detail)
        return [GStreamerCamera(d, size, decoder) for d in devices]
    return [OpenCVCamera(d, size) for d in devices]



@CAMERAS.register("auto")
def _auto(req: CameraRequest) -> list[Camera]:
    return auto_cameras(req.devices(), req.size, req.dali_device)


@CAMERAS.register("gstreamer")
def _gstreamer(req: CameraRequest) -> list[Camera]:
    ok, detail = _probe_gstreamer()
    if not ok:
        raise ConfigError(f"camera source 'gstreamer' unavailable here: {detail}")
    return auto_cameras(req.devices(), req.size, req.dali_device, DecoderChoice("gstreamer", detail))
