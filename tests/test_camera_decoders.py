"""Camera decoder selection for the robot (`--cameras auto:DEVICES`): DALI, else GStreamer
(hardware JPEG decode on a Jetson, `jpegdec` elsewhere), else OpenCV on the CPU. No
fakes: the probes look at this machine; the GStreamer capture runs where OpenCV has
GStreamer and skips with the reason elsewhere. No torch."""

from __future__ import annotations

import time

import numpy as np
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
        assert "built without GStreamer" in detail
    assert choice.kind in gst.DECODER_PROBES
    cams = gst.auto_cameras([0, 2], 32, choice=gst.DecoderChoice("opencv", "CPU decode"))
    assert [type(c) for c in cams] == [OpenCVCamera, OpenCVCamera]  # nothing opened before start()


def test_hardware_decoders_are_preferred_and_the_pipeline_keeps_only_the_newest_frame():
    assert gst.gst_decoder(lambda name: name in ("jpegdec", "nvjpegdec"))[0] == "nvjpegdec"
    assert gst.gst_decoder(lambda name: True)[0] == "nvv4l2decoder"
    assert gst.gst_decoder(lambda name: False) is None
    cam = gst.GStreamerCamera("/dev/video2", 32, gst.GST_DECODERS[0])
    assert cam.pipeline == ("v4l2src device=/dev/video2 ! image/jpeg,width=640,height=480,framerate=30/1 ! "
                            "jpegparse ! nvv4l2decoder mjpeg=1 ! nvvidconv ! video/x-raw,format=BGRx ! "
                            "videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false")
    if not gst.opencv_has_gstreamer():
        with pytest.raises(ConfigError, match="camera source 'gstreamer' unavailable here: gstreamer: OpenCV"):
            make_cameras("gstreamer:/dev/video0", 1, 32)
    assert len(make_cameras("auto:/dev/video0,/dev/video2", 2, 32)) in (1, 2)  # DALI: one camera for all views


def test_gstreamer_software_decode_delivers_model_frames():
    """MJPEG from `videotestsrc ! jpegenc` through `jpegdec` and OpenCV's GStreamer backend."""
    if not gst.opencv_has_gstreamer():
        pytest.skip("this OpenCV is built without GStreamer (Debian's python3-opencv and JetPack's have it)")
    if not gst.gst_element("jpegdec"):
        pytest.skip("GStreamer's jpegdec is missing (gstreamer1.0-plugins-good)")
    source = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=640,height=480,framerate=30/1 ! jpegenc"
    cam = gst.GStreamerCamera("test", 32, ("jpegdec", "jpegdec"), source=source).start()
    try:
        deadline = time.monotonic() + 20
        while cam._latest is None and cam.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        frame = cam.latest(max_age_s=5.0)
        assert frame.image.shape == (1, 32, 32, 3) and frame.image.dtype == np.uint8
        assert cam.decode_ms is not None
    finally:
        cam.stop()
