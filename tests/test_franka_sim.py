"""Franka bridge against franky-sim (the libfranka-protocol simulator, MuJoCo), driven
over ZeroMQ from a test client exactly as the runtime drives it."""

import functools
import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from vpp_edge.firmware_bridge.bridge import NET_THREAD, SERVO_THREAD, Bridge
from vpp_edge.firmware_bridge.config import bridge_config_from_dict, load_bridge_config
from vpp_edge.firmware_bridge.factory import make_driver
from vpp_edge.runtime.engines.onnxruntime import OrtEngine
from vpp_edge.runtime.realtime import thread_policies
from vpp_edge.runtime.transport import recv

from .conftest import drive
from .test_bridge import ANY, Client, wait_until

# franky-sim pins its own MuJoCo (4.x), MetaWorld another (3.3): the simulator lives in
# its own virtual environment (make franky-sim) and runs as a separate process anyway.
_REPO = Path(__file__).resolve().parents[1]
FRANKY_SIM = (os.environ.get("FRANKY_SIM") or shutil.which("franky-sim")
              or next((str(p) for p in [_REPO / ".venv-franky-sim" / "bin" / "franky-sim"] if p.is_file()), None))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("franky") is None or FRANKY_SIM is None,
                       reason="franky-control or franky-sim not installed (make franky-sim)"),
]


@pytest.fixture
def franky_sim(tmp_path_factory):
    """A fresh simulator per test (a few seconds to start): no test inherits the pose, a
    reflex or a half-finished gripper command that another test left behind."""
    exe = FRANKY_SIM
    log = tmp_path_factory.mktemp("franky") / "sim.log"
    # Output goes to a file: an unread pipe would fill up and freeze the simulator.
    with open(log, "w") as out:
        proc = subprocess.Popen([exe, "-s", "mujoco"], stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    host = None
    while time.monotonic() < deadline and host is None:
        for line in log.read_text().splitlines():
            if "Connect to the server using" in line:
                host = line.split("'")[1]
        if proc.poll() is not None:
            pytest.fail("franky-sim exited: " + log.read_text())
        time.sleep(0.2)
    if host is None:
        proc.kill()
        pytest.fail("franky-sim did not start within 60 s: " + log.read_text())
    yield host
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def rig(franky_sim, request):
    """(Bridge, driver, client) on the Franka bridge config; ``request.param`` (indirect
    parametrisation) overrides bridge settings."""
    base = load_bridge_config("panda")
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in base.__dict__.items()}
    data.update(getattr(request, "param", {}))
    cfg = bridge_config_from_dict({**data, "driver": {**base.driver, "robot_ip": franky_sim, "realtime": False}})
    ctx = zmq.Context()
    driver = make_driver(cfg)
    bridge = Bridge(driver, cfg, ANY, ctx).start()
    client = Client(bridge, ctx)
    yield bridge, driver, client
    bridge.close()
    ctx.destroy(linger=0)


def ee(client):
    """The end-effector pose from the bridge's state stream (never call the driver from here:
    franky is not safe to call from two threads)."""
    state = None
    while state is None:
        state = recv(client.state)
    return state.ee_pose


def test_arm_reaches_targets_within_tolerance(rig):
    bridge, driver, client = rig
    # libfranka made the connecting thread SCHED_FIFO 99 (and so every thread it started after):
    # the driver puts it back, and only libfranka's own control thread runs real-time.
    policies = thread_policies()
    assert policies["MainThread"] == policies[NET_THREAD] == policies[SERVO_THREAD] == "SCHED_OTHER", policies
    start = ee(client)
    delta = np.array([0.015, 0.0, -0.01, 0.0, 0.0, 0.0, 0.0])
    client.target(delta)
    client.target(delta)  # two steps: +30 mm in x, -20 mm in z

    def reached():
        client.target(np.zeros(7))  # keep the link alive, no further motion
        return np.allclose(ee(client)[:3], start[:3] + [0.03, 0.0, -0.02], atol=0.004)

    assert wait_until(reached, timeout=15), (f"end-effector at {ee(client)[:3]}, wanted {start[:3] + [0.03, 0, -0.02]}",
                                             dict(bridge.counts), bridge.mode, bridge._target, bridge._interp.p)
    assert bridge.counts["accepted"] >= 2 and bridge.counts.get("rejected", 0) == 0


def test_limits_and_watchdog(rig):
    bridge, driver, client = rig
    client.target(np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]))  # gripper half closed (absolute)
    client.target(np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.4]))  # beyond 1, within max_step: refused
    assert wait_until(lambda: bridge.counts["rejected_out_of_limits"] == 1)
    client.target(np.array([0.01, 0, 0, 0, 0, 0, 0]))
    assert wait_until(lambda: bridge.mode == "hold"), (bridge.mode, dict(bridge.counts))
    assert wait_until(lambda: bridge.mode == "stopped", timeout=5)
    still = ee(client)
    time.sleep(0.5)
    assert np.allclose(ee(client)[:3], still[:3], atol=0.002), "stopped means still"


def test_speed_stays_within_the_configured_limit(rig):
    """Three maximal steps at once: the bridge's interpolator spreads them out, so the
    measured end-effector speed never exceeds max_vel (plus impedance overshoot margin)."""
    bridge, driver, client = rig
    max_vel = bridge.cfg.vec("max_vel")[0]
    start = ee(client)
    for _ in range(3):
        client.target(np.array([0.02, 0, 0, 0, 0, 0, 0]))
    samples = []
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        state = recv(client.state)
        if state is not None:
            samples.append((state.stamp, state.ee_pose[0]))
        client.target(np.zeros(7))
    t, x = np.array(samples).T
    speed = np.abs(np.diff(x) / np.maximum(np.diff(t), 1e-3))
    assert x[-1] - start[0] > 0.05, "the arm moved the 60 mm"
    assert speed.max() <= 1.25 * max_vel, f"peak {speed.max():.3f} m/s over the {max_vel} m/s limit"


def test_estop_latches_and_reset_resumes_tracking(rig):
    bridge, driver, client = rig
    assert client.command("estop").ok
    assert wait_until(lambda: driver._motion is None), "the servo thread ended the controller"
    client.target(np.array([0.01, 0, 0, 0, 0, 0, 0]))
    assert wait_until(lambda: bridge.counts["rejected_estopped"] == 1)
    assert client.command("reset").ok
    start = ee(client)
    client.target(np.array([0.0, 0.01, 0.0, 0, 0, 0, 0]))

    def moved():
        client.target(np.zeros(7))
        return abs(ee(client)[1] - (start[1] + 0.01)) < 0.004

    assert wait_until(moved, timeout=10), "a fresh tracker follows targets after the reset"


# A workspace box around franky-sim's start pose (0.555, 0, 0.521) whose every corner, in
# every orientation in it, the arm reaches with a bent elbow. The random test policy pushes
# the setpoint to the box's faces; near the reach limit (x 0.65, z 0.62 from here) the
# elbow straightens, an impedance controller cannot bend it back out of that singularity,
# the arm stays 10 cm short and the bridge's tracking guard latches the e-stop.
REACHABLE_BOX = {"setpoint_low": [0.45, -0.10, 0.40, -0.25, -0.25, -0.25, 0.0],
                 "setpoint_high": [0.60, 0.10, 0.55, 0.25, 0.25, 0.25, 1.0]}


@pytest.mark.parametrize("rig", [REACHABLE_BOX], indirect=True)
def test_runtime_drives_the_arm_in_franky_sim(rig, exported, demo_episode, tmp_path):
    """runtime (replay cameras, ONNX Runtime, panda robot config) -> bridge -> franky-sim."""
    bridge, driver, client = rig
    start = ee(client)
    # Here franky's 1 kHz torque loop shares one process and two cores with the runtime (on
    # the robot they are separate processes): two ONNX Runtime threads in this process let
    # the simulated arm drift 7-12 cm off a setpoint stream it tracks within 2 cm otherwise,
    # and the tracking guard e-stops. One thread makes a CPU predict step ~250 ms, longer
    # than a 10-action chunk at the config's 50 Hz, so the loop runs at 20 Hz, as on a CPU.
    # The random policy pushes past the box's faces: the bridge refuses most targets.
    drive(bridge, exported[0], "panda", demo_episode, client.cmd.context, tmp_path, min_accepted=5,
          control_hz=20.0, engine_cls=functools.partial(OrtEngine, threads=1))
    now = ee(client)
    low, high = bridge.cfg.vec("setpoint_low"), bridge.cfg.vec("setpoint_high")
    assert np.all(now[:3] >= low[:3] - 0.005) and np.all(now[:3] <= high[:3] + 0.005)
    assert np.abs(now[:3] - start[:3]).max() > 0.002, "the policy's actions moved the simulated arm"


def test_gripper_grasps_and_opens_without_stalling_the_servo_loop(rig):
    bridge, driver, client = rig
    stamps, seen = [], []  # state stamps; measured closures, for the failure message

    def closure_reaches(value):
        client.target(np.array([0, 0, 0, 0, 0, 0, value]))
        state = recv(client.state)
        if state is None:
            return False
        stamps.append(state.stamp)
        seen.append(state.ee_pose[6])
        return abs(state.ee_pose[6] - value) < 0.1

    assert wait_until(lambda: closure_reaches(1.0), timeout=10), \
        ("a closure of 1 grasps: the fingers close", seen[-3:], dict(bridge.counts))
    assert wait_until(lambda: closure_reaches(0.0), timeout=10), \
        ("a closure of 0 opens the gripper fully", seen[-3:], dict(bridge.counts))
    assert np.max(np.diff(stamps)) < 0.25, "state kept flowing while the fingers moved (no servo stall)"
    assert bridge.mode == "tracking" and not bridge.counts["event_driver_error"] and not bridge.counts["event_driver_warning"]
