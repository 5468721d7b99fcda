"""Camera sources: DALI decoding of MJPEG streams (CPU pipeline here) against the OpenCV
reference geometry, stall detection, and the replay source."""

import time

import cv2
import numpy as np
import pytest

from vpp_edge.episodes import list_episodes, load_episode
from vpp_edge.preprocess import prepare_frame
from vpp_edge.runtime.cameras import StaleFrameError

dali = pytest.importorskip("nvidia.dali", reason="nvidia-dali-cuda120 is not installed (make install pins it)")

from vpp_edge.runtime.cameras.dali import DaliCameras, DaliDecoder, ReplayMjpegStream  # noqa: E402


def _wait_frame(cam, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return cam.latest(max_age_s=1.0)
        except StaleFrameError:
            time.sleep(0.02)
    raise AssertionError(f"no frame from {cam.name}: {cam.error}")


def test_dali_cpu_decode_matches_the_model_preprocessing_on_real_frames(samples_dir):
    episode = load_episode(list_episodes(samples_dir / "xhand")[0])
    images = [episode.frames(v, [40])[0] for v in range(episode.num_views)]
    jpegs = [np.frombuffer(cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR),
                                        [cv2.IMWRITE_JPEG_QUALITY, 95])[1], np.uint8) for im in images]
    decoder = DaliDecoder(size=128, views=len(jpegs), device="cpu")
    out = decoder.decode(jpegs)
    assert out.shape == (len(jpegs), 128, 128, 3) and out.dtype == np.uint8
    for view, jpeg in enumerate(jpegs):
        reference = prepare_frame(cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), 128)
        diff = np.abs(out[view].astype(np.int16) - reference.astype(np.int16))
        # Same crop and scale; DALI's and OpenCV's anti-aliasing filters differ slightly.
        assert diff.mean() < 3.0, f"view {view}: mean abs diff {diff.mean():.2f}"
        assert np.corrcoef(out[view].ravel(), reference.ravel())[0, 1] > 0.99
    with pytest.raises(ValueError, match="expected 3 JPEG"):
        decoder.decode(jpegs[:2])


def test_dali_cameras_stream_all_views_and_report_a_stalled_one(demo_episode):
    episode = load_episode(demo_episode)
    streams = [ReplayMjpegStream(episode, 0, fps=30.0), ReplayMjpegStream(episode, 1, fps=30.0, loop=False)]
    cams = DaliCameras(streams, size=64, device="cpu", max_view_age_s=0.2).start()
    try:
        first = _wait_frame(cams)
        assert first.image.shape == (2, 64, 64, 3)
        # The two views differ (different cameras), and each decodes to its own source frame.
        assert np.abs(first.image[0].astype(int) - first.image[1].astype(int)).mean() > 1.0
        # View 1 ends after its recording (loop=False): the combined camera must go stale,
        # never keep serving the last decoded frame as if it were new.
        length = len(streams[1].jpegs) / 30.0
        time.sleep(length + 0.6)
        with pytest.raises(StaleFrameError):
            cams.latest(max_age_s=0.3)
        assert "replay-mjpeg" in (cams.error or "")
    finally:
        cams.stop()


def test_camera_specs_are_checked(demo_episode):
    from vpp_edge.errors import ConfigError
    from vpp_edge.runtime import protocol as P
    from vpp_edge.runtime.cameras.factory import make_cameras

    with pytest.raises(ConfigError, match="unknown camera source 'usb'.*replay, replay-dali, v4l2, dali, gstreamer, auto, zmq"):
        make_cameras("usb:0", 2, 64)
    with pytest.raises(ConfigError, match="lists 1 device.*takes 2 view"):
        make_cameras("v4l2:/dev/video0", 2, 64)
    with pytest.raises(ConfigError, match="needs an episode"):
        make_cameras("replay", 2, 64)
    (cam,) = make_cameras("zmq", 2, 64)
    assert cam.endpoint == P.CAMERA_ENDPOINT
    (cam,) = make_cameras("replay-dali", 2, 64, load_episode(demo_episode), dali_device="cpu")
    assert [s.name.split(":")[-1] for s in cam.streams] == ["0", "1"] and cam.decoder.device == "cpu"
