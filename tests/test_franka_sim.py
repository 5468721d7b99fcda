"""Franka bridge against franky-sim (the libfranka-protocol simulator, MuJoCo), driven
over ZeroMQ from a test client exactly as the runtime drives it."""

import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from vpp_edge.firmware_bridge.bridge import Bridge
from vpp_edge.firmware_bridge.config import bridge_config_from_dict, load_bridge_config
from vpp_edge.firmware_bridge.factory import make_driver

from vpp_edge.runtime.transport import recv

from .test_bridge import ANY, Client, wait_until

# franky-sim pins its own MuJoCo (4.x), MetaWorld another (3.3): the simulator lives in
# its own virtual environment (make franky-sim) and runs as a separate process anyway.
_REPO = Path(__file__).resolve().parents[1]
FRANKY_SIM = (os.environ.get("FRANKY_SIM") or shutil.which("franky-sim")
              or next((str(p) for p in [_REPO / ".venv-franky-sim" / "bin" / "franky-sim"] if p.is_file()), None))

pytestmark = [
    pytest.mark.slow,
    # Opt-in: franky's asynchronous re-planning blocks intermittently against franky-sim
    # (a servo-thread move() that never returns); the driver is experimental until fixed.
    pytest.mark.skipif(os.environ.get("VPP_FRANKY_SIM") != "1",
                       reason="Franka driver is experimental: set VPP_FRANKY_SIM=1 to run against franky-sim"),
    pytest.mark.skipif(importlib.util.find_spec("franky") is None or FRANKY_SIM is None,
                       reason="franky-control or franky-sim not installed (make franky-sim)"),
]


@pytest.fixture(scope="module")
def franky_sim(tmp_path_factory):
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
def rig(franky_sim):
    base = load_bridge_config("panda")
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in base.__dict__.items()}
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
    start = ee(client)
    delta = np.array([0.015, 0.0, -0.01, 0.0, 0.0, 0.0, 0.0])
    client.target(delta)
    client.target(delta)  # two steps: +30 mm in x, -20 mm in z

    def reached():
        client.target(np.zeros(7))  # keep the link alive, no further motion
        return np.allclose(ee(client)[:3], start[:3] + [0.03, 0.0, -0.02], atol=0.004)

    assert wait_until(reached, timeout=15), f"end-effector at {ee(client)[:3]}, wanted {start[:3] + [0.03, 0, -0.02]}"
    assert bridge.counts["accepted"] >= 2 and bridge.counts.get("rejected", 0) == 0


def test_limits_and_watchdog(rig):
    bridge, driver, client = rig
    client.target(np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.4]))  # gripper beyond 1: refused
    assert wait_until(lambda: bridge.counts["rejected_out_of_limits"] == 1)
    client.target(np.array([0.01, 0, 0, 0, 0, 0, 0]))
    assert wait_until(lambda: bridge.mode == "hold"), (bridge.mode, dict(bridge.counts))
    assert wait_until(lambda: bridge.mode == "stopped", timeout=5)
    still = ee(client)
    time.sleep(0.5)
    assert np.allclose(ee(client)[:3], still[:3], atol=0.002), "stopped means still"
