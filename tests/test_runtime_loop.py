"""The whole loop over real ZeroMQ sockets: replay cameras -> ONNX Runtime -> plan ->
safety -> sim bridge, and the faults it must survive (bridge gone, camera gone, NaN)."""

import threading

import numpy as np
import pytest
import zmq

from vpp_edge.firmware_bridge.bridge import Bridge, Endpoints
from vpp_edge.firmware_bridge.config import load_bridge_config
from vpp_edge.firmware_bridge.driver import KinematicSimDriver
from vpp_edge.runtime.engines.onnxruntime import OrtEngine

from .conftest import closed_loop

pytestmark = pytest.mark.slow
ANY = Endpoints("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")


@pytest.fixture
def loop_rig(exported, demo_episode, tmp_path):
    ctx = zmq.Context()
    driver = KinematicSimDriver(7)
    bridge = Bridge(driver, load_bridge_config("sim"), ANY, ctx).start()
    opened = []

    def make(engine_cls=OrtEngine, loop_camera=True, fps=20.0, smoothing="crossfade"):
        runtime, metrics, link = closed_loop(exported[0], "sim", bridge, demo_episode, ctx, tmp_path,
                                             engine_cls=engine_cls, loop_camera=loop_camera, fps=fps,
                                             smoothing=smoothing)
        opened.append((metrics, link))
        return runtime

    yield make, bridge, driver, lambda: opened[-1][0], tmp_path
    for metrics, link in opened:
        metrics.close()
        link.close()
    bridge.close()
    ctx.destroy(linger=0)


def test_closed_loop_moves_the_sim_robot_within_limits(loop_rig):
    make, bridge, driver, last_metrics, tmp_path = loop_rig
    runtime = make()
    summary = runtime.run()
    counts = summary["counts"]
    assert counts["chunks"] >= 3 and bridge.counts["accepted"] >= 5
    assert summary["latency_ms"]["tvp_ms"]["n"] == summary["latency_ms"]["end_to_end_ms"]["n"] >= 3
    assert summary["latency_ms"]["jitter_ms"]["n"] >= 25
    history = np.stack(driver.history)
    cfg = bridge.cfg
    assert np.all(history >= cfg.vec("setpoint_low") - 1e-9) and np.all(history <= cfg.vec("setpoint_high") + 1e-9)
    assert np.any(np.abs(history[-1] - history[0]) > 0), "the robot moved"
    assert "starvation" not in counts or counts["starvation"] < counts["chunks"], "inference keeps ahead"
    last_metrics().close()
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    assert any('"record": "chunk"' in line for line in lines)


def test_runtime_survives_the_bridge_going_away(loop_rig):
    make, bridge, driver, _, _ = loop_rig
    runtime = make()
    threading.Timer(1.0, bridge.close).start()
    summary = runtime.run()  # no exception: the control loop keeps its rate and counts
    assert summary["counts"]["chunks"] >= 3
    assert summary["latency_ms"]["jitter_ms"]["n"] >= 25


def test_a_camera_that_stops_is_reported_and_the_robot_holds(loop_rig):
    make, bridge, driver, _, _ = loop_rig
    runtime = make(loop_camera=False, fps=20.0)  # 20 frames: the stream ends after 1 s
    summary = runtime.run()
    assert summary["counts"]["stale_observation"] >= 1
    assert summary["safety"].get("hold", 0) > 0, "no fresh chunks -> the watchdog holds"
    # Alive but unable to act: its heartbeats say so, and the bridge holds (then stops) as for a dead runtime.
    assert bridge.counts["heartbeats_starved"] > 0 and bridge.counts["event_watchdog_hold"] >= 1


def test_nan_from_the_engine_reaches_nothing(loop_rig):
    make, bridge, driver, _, _ = loop_rig

    class NaNEngine(OrtEngine):  # fault injection at the engine boundary
        def run(self, graph, feeds):
            out = super().run(graph, feeds)
            return {k: np.full_like(v, np.nan) for k, v in out.items()} if graph.startswith("action") else out

    summary = make(NaNEngine).run()
    assert summary["counts"]["engine_invalid"] >= 3 and summary["counts"].get("chunks", 0) == 0
    assert bridge.counts["accepted"] == 0 and driver.history == [] or np.allclose(np.stack(driver.history), 0)


def test_instruction_changes_at_run_time(loop_rig):
    make, bridge, driver, _, _ = loop_rig
    runtime = make()
    calls = []
    run = runtime.policy.engine.run
    runtime.policy.engine.run = lambda g, f: calls.append(g) or run(g, f)
    threading.Timer(1.0, runtime.set_instruction, args=("open the drawer",)).start()
    runtime.run()
    assert calls.count("text") == 1 and runtime.policy.instruction == "open the drawer"


def test_closed_loop_with_real_time_chunking(loop_rig):
    """The sampler is handed what the robot executes from each observation's tick on: the
    observation is usually older than the tick the control loop just executed, so without the
    executed actions nothing lined up and RTC ran as `none`."""
    make, bridge, driver, _, _ = loop_rig
    runtime = make(smoothing="rtc")
    infer, prefixes = runtime.policy.infer, []
    runtime.worker.policy.infer = lambda frames, prefix=None, **kw: (prefixes.append(prefix)
                                                                       or infer(frames, prefix=prefix, **kw))
    summary = runtime.run()
    assert summary["counts"]["chunks"] >= 3 and bridge.counts["accepted"] >= 5
    continued = [p for p in prefixes[1:] if p is not None and len(p)]
    assert len(continued) >= len(prefixes[1:]) // 2, f"{len(continued)} of {len(prefixes) - 1} inferences continued the plan"


def test_injected_latency_makes_every_inference_slower(loop_rig):
    """The measurement mode (RuntimeConfig.inject_latency_ms): chunks arrive at least that late."""
    from vpp_edge.runtime.build import run_options
    from vpp_edge.runtime.config import RuntimeConfig

    assert run_options(RuntimeConfig(inject_latency_ms=300)).inject_latency_s == pytest.approx(0.3)
    make, bridge, driver, last_metrics, _ = loop_rig
    runtime = make()
    runtime.worker.inject_latency_s = 0.3
    summary = runtime.run()
    e2e = list(last_metrics().series["end_to_end_ms"])
    assert len(e2e) >= 2 and min(e2e) >= 300.0, "each chunk is finished 300 ms after its observation at the earliest"
    assert summary["action_jerk"]["mean"] >= 0.0 and summary["boundary_jump"]["max"] >= 0.0


def test_an_absent_v4l2_camera_is_reported_not_used():
    import time as _time

    from vpp_edge.runtime.cameras.base import StaleFrameError
    from vpp_edge.runtime.cameras.opencv import OpenCVCamera

    cam = OpenCVCamera("/dev/video-does-not-exist", 256).start()
    _time.sleep(0.5)
    cam.stop()
    with pytest.raises(StaleFrameError, match="has produced no frame.*cannot open V4L2 device"):
        cam.latest(max_age_s=0.5)
