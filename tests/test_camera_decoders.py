"""Camera decoder selection for the robot (`--cameras auto:DEVICES`): DALI, else GStreamer
(hardware JPEG decode on a Jetson, `jpegdec` elsewhere), else OpenCV on the CPU. No
fakes: the probes look at this machine; the GStreamer capture runs where OpenCV has
GStreamer and skips with the reason elsewhere. No torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from vpp_edge.errors import ConfigError
from vpp_edge.runtime.cameras import gstreamer as gst
from vpp_edge.runtime.cameras.factory import make_cameras
from vpp_edge.runtime.cameras.opencv import OpenCVCamera


def test_auto_takes_the_first_decoder_that_works_and_says_why():
    probes = {"dali": lambda: (False, "dali: nvidia.dali not importable"),
              "gstreamer": lambda: (True, "jpegdec"), "opencv": lambda: (True, "CPU decode")}
    choice = gst.choose_decoder(probes)
    assert (choice.kind, choice.detail) == ("gstreamer", "jpegdec")
    assert choice.line() == "camera decoding: gstreamer (jpegdec); not dali: nvidia.dali not importable"
    with pytest.raises(RuntimeError, match="no camera decoder available: a; b"):
        gst.choose_decoder({"x": lambda: (False, "a"), "y": lambda: (False, "b")})
    assert list(gst.DECODER_PROBES) == ["dali", "gstreamer", "opencv"]


def test_this_machine_gets_a_decoder_and_the_probes_agree_with_opencv():
    choice = gst.choose_decoder()  # the real probes
    ok, detail = gst._probe_gstreamer()
    assert ok == (gst.opencv_has_gstreamer() and gst.gst_decoder() is not None)
    if not gst.opencv_has_gstreamer():
        assert f"gstreamer: cv2 {cv2.__version__} from {cv2.__file__}" in detail and "GStreamer: no)" in detail
    assert choice.kind in gst.DECODER_PROBES
    cams = gst.auto_cameras([0, 2], 32, choice=gst.DecoderChoice("opencv", "CPU decode"))
    assert [type(c) for c in cams] == [OpenCVCamera, OpenCVCamera]  # nothing opened before start()


def test_hardware_decoders_are_preferred_and_the_pipeline_keeps_only_the_newest_frame():
    assert gst.gst_decoder(lambda name: name in ("jpegdec", "nvjpegdec"))[0] == "nvjpegdec"
    assert gst.gst_decoder(lambda name: True)[0] == "nvv4l2decoder"
    assert gst.gst_decoder(lambda name: False) is None
    cam = gst.GStreamerCamera("/dev/video2", 32, gst.GST_DECODERS[0])
    assert cam.pipeline == ("v4l2src device=/dev/video2 ! image/jpeg,width=640,height=480,framerate=30/1 ! "
                            "nvv4l2decoder mjpeg=1 ! nvvidconv ! video/x-raw,format=BGRx ! "
                            "videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false")
    if not gst.opencv_has_gstreamer():
        with pytest.raises(ConfigError, match="camera source 'gstreamer' unavailable here: gstreamer: cv2 "):
            make_cameras("gstreamer:/dev/video0", 1, 32)
    assert len(make_cameras("auto:/dev/video0,/dev/video2", 2, 32)) in (1, 2)  # DALI: one camera for all views


CAPTURE = """
import json, sys, time
from vpp_edge.runtime.cameras import gstreamer as gst
source = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=640,height=480,framerate=30/1 ! jpegenc"
choice = gst.choose_decoder({"gstreamer": gst._probe_gstreamer})
cam = gst.GStreamerCamera("test", 32, ("jpegdec", "jpegdec"), source=source).start()
deadline = time.monotonic() + 20
while cam._latest is None and cam.failure is None and time.monotonic() < deadline:
    time.sleep(0.05)
frame = cam.latest(max_age_s=5.0)
cam.stop()
print(json.dumps({"choice": choice.detail, "shape": list(frame.image.shape), "dtype": str(frame.image.dtype),
                  "decode_ms": cam.decode_ms, "failure": cam.failure}))
"""


def _opencv_with_gstreamer() -> str | None:
    """A Python whose OpenCV has GStreamer: this one, else the system's (Debian's python3-opencv)."""
    for python in (sys.executable, "/usr/bin/python3"):
        code = "import cv2, re, sys; sys.exit(0 if re.search(r'GStreamer:\\s*YES', cv2.getBuildInformation()) else 1)"
        try:
            if subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0:
                return python
        except OSError:
            continue
    return None


def _code_tree(dest: Path) -> Path:
    """vpp_edge's packages laid out as they install (pyproject's package-dir), by symlinks."""
    from vpp_edge.deploy.bundle import code_packages

    for package, folder in code_packages([]):
        target = dest.joinpath(*package.split("."))
        if package == "vpp_edge":
            target.mkdir(parents=True)
            for entry in folder.iterdir():
                (target / entry.name).symlink_to(entry)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(folder)
    return dest


def test_gstreamer_software_decode_delivers_model_frames(tmp_path):
    """MJPEG from `videotestsrc ! jpegenc` through `jpegdec` and OpenCV's GStreamer backend
    (the Jetson path with a software decoder), in a Python whose OpenCV has GStreamer."""
    python = _opencv_with_gstreamer()
    if python is None:
        pytest.skip("no OpenCV built with GStreamer here (Debian's python3-opencv and JetPack's have it)")
    if not gst.gst_element("jpegdec"):
        pytest.skip("GStreamer's jpegdec is missing (gstreamer1.0-plugins-good, gstreamer1.0-tools)")
    env = {**os.environ, "PYTHONPATH": str(_code_tree(tmp_path / "code")), "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([python, "-c", CAPTURE], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["choice"] == "nvv4l2decoder" if gst.gst_element("nvv4l2decoder") else result["choice"] == "jpegdec"
    assert result["shape"] == [1, 32, 32, 3] and result["dtype"] == "uint8" and result["failure"] is None
    assert result["decode_ms"] is not None


AUTO_IN_VENV = """
import json
from vpp_edge.runtime.cameras import gstreamer as gst
from vpp_edge.runtime.cameras.cv2_probe import probe
choice = gst.choose_decoder()
print(json.dumps({"kind": choice.kind, "detail": choice.detail, "cv2": probe()}))
"""


def test_auto_picks_gstreamer_with_the_system_opencv_seen_through_a_venv(tmp_path):
    """The robot's arrangement with a real OpenCV: a venv made with --system-site-packages and
    no OpenCV of its own imports the system's (Debian's python3-opencv here, JetPack's on a
    Jetson), which has GStreamer, so `--cameras auto` takes GStreamer; the deploy check and
    the probe say which cv2 it is."""
    from vpp_edge.deploy import checks

    system = "/usr/bin/python3"
    facts = checks.opencv_facts(system) if Path(system).exists() else {}
    if not facts.get("gstreamer"):
        pytest.skip(f"{system} has no OpenCV built with GStreamer (Debian's python3-opencv, JetPack's)")
    if not gst.gst_element("jpegdec"):
        pytest.skip("GStreamer's jpegdec is missing (gstreamer1.0-plugins-good, gstreamer1.0-tools)")
    venv = tmp_path / "venv"
    subprocess.run([system, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = str(venv / "bin" / "python")
    env = {**os.environ, "PYTHONPATH": str(_code_tree(tmp_path / "code")), "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([python, "-c", AUTO_IN_VENV], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["cv2"] == {**facts, "venv": False} and result["cv2"]["distribution"] is None  # apt's, no pip metadata
    assert result["kind"] == "gstreamer" and result["detail"] in [n for n, _ in gst.GST_DECODERS], result
    line = checks.check_opencv({"opencv": {"require_gstreamer": True}}, python).line()
    assert line == f"[ok  ] OpenCV          cv2 {facts['version']} from {facts['file']} (system site-packages, " \
                   f"GStreamer: yes) in {python}"
