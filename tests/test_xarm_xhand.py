"""xArm + XHand driver through the bridge over real sockets, against SDK fakes
(tests/fakes: no simulator exists for either device)."""

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from vpp_edge.errors import MissingDependencyError
from vpp_edge.firmware_bridge.bridge import Bridge
from vpp_edge.firmware_bridge.config import bridge_config_from_dict, load_bridge_config
from vpp_edge.firmware_bridge.factory import make_driver
from vpp_edge.firmware_bridge.xarm_xhand import DriverError, XArmXHandDriver

from .conftest import drive
from .test_bridge import ANY, Client, wait_until

FAKES = Path(__file__).with_name("fakes")


@pytest.fixture
def sdk(monkeypatch):
    for name in list(sys.modules):
        if name.split(".")[0] in ("xarm", "xhand_controller"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(FAKES))
    import xarm.wrapper as arm_sdk
    import xhand_controller.xhand_control as hand_sdk

    arm_sdk.INSTANCES.clear()
    hand_sdk.INSTANCES.clear()
    return arm_sdk, hand_sdk


def config(**changes):
    base = load_bridge_config("xarm_xhand")
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in base.__dict__.items()}
    return bridge_config_from_dict({**data, **changes})


@pytest.fixture
def rig(sdk):
    ctx = zmq.Context()
    cfg = config()
    bridge = Bridge(make_driver(cfg), cfg, ANY, ctx).start()
    client = Client(bridge, ctx)
    yield bridge, sdk[0].INSTANCES[0], sdk[1].INSTANCES[0], client
    bridge.close()
    ctx.destroy(linger=0)


def test_startup_sequence_and_hand_gains(rig):
    bridge, arm, hand, _ = rig
    names = [c[0] for c in arm.calls]
    assert names[:5] == ["clean_error", "clean_warn", "motion_enable", "set_mode", "set_state"]
    assert arm.calls[3][1] == (1,) and arm.calls[4][1] == (0,), "servo mode, ready state"
    assert hand.opened == ("/dev/ttyUSB0", 3000000)
    assert np.allclose(bridge._interp.p[:3], [0.4, 0.0, 0.3]), "start from the measured pose (mm -> m)"


def test_targets_stream_as_bounded_servo_steps(rig):
    bridge, arm, hand, client = rig
    target = np.zeros(18)
    target[0] = 0.015  # +15 mm in x (delta)
    target[6:] = 0.3  # finger joints (absolute)
    client.target(target)

    def arrived():
        keep = np.zeros(18)
        keep[6:] = 0.3
        client.target(keep)
        return abs(arm.pose[0] - 415.0) < 1e-6 and np.allclose(hand.positions, 0.3)

    assert wait_until(arrived)
    poses = np.array([c[1][0] for c in arm.calls if c[0] == "set_servo_cartesian"])
    cfg = bridge.cfg
    step_mm = np.abs(np.diff(poses[:, :3], axis=0))
    assert step_mm.max() <= cfg.max_vel[0] / cfg.servo_hz * 1000 + 1e-6, "bounded step at <= 250 Hz"
    sent = hand.sent[-1][1]
    assert all(f[1] == 100 and f[2] == 300 and f[3] == 3 for f in sent), "kp, torque limit, position mode"
    n_servo = len(poses)
    assert len(hand.sent) == pytest.approx(n_servo / 2, abs=2), "hand commands at servo_hz / hand_every"


def test_arm_fault_latches_estop_and_reset_resumes(rig):
    bridge, arm, hand, client = rig
    arm.error_code = 22
    assert wait_until(lambda: bridge.mode == "estop")
    assert ("emergency_stop", ()) in arm.calls
    kinds = [k for k, _ in client.drain_events()]
    assert "driver_error" in kinds
    arm.error_code = 0
    arm.calls.clear()
    assert client.command("reset").ok
    assert wait_until(lambda: ("set_mode", (1,)) in arm.calls and ("set_state", (0,)) in arm.calls)


def test_watchdog_stop_and_resume_on_new_targets(rig):
    bridge, arm, hand, client = rig
    target = np.zeros(18)
    client.target(target)
    assert wait_until(lambda: bridge.mode == "stopped", timeout=4)
    assert ("set_state", (4,)) in arm.calls
    arm.calls.clear()
    client.target(target)
    assert wait_until(lambda: ("set_state", (0,)) in arm.calls)
    assert bridge.mode == "tracking"


def test_startup_failures_and_limits_are_clear(sdk):
    arm_sdk, hand_sdk = sdk
    original = arm_sdk.XArmAPI.__init__

    def failing(self, *a, **k):
        original(self, *a, **k)
        self.fail["set_mode"] = 1

    arm_sdk.XArmAPI.__init__ = failing
    try:
        with pytest.raises(DriverError, match=r"set_mode\(1\) \(servo\) failed with code 1"):
            XArmXHandDriver({}, 100).connect()
    finally:
        arm_sdk.XArmAPI.__init__ = original
    with pytest.raises(DriverError, match="exceeds the xArm streaming limit"):
        XArmXHandDriver({}, 500)


def test_missing_sdk_is_reported(monkeypatch):
    for name in list(sys.modules):
        if name.split(".")[0] in ("xarm", "xhand_controller"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "fakes" not in p])
    with pytest.raises(MissingDependencyError, match="xArm driver needs the optional package 'xarm'"):
        XArmXHandDriver({}, 100).connect()
    time.sleep(0)


def test_runtime_drives_arm_and_hand_fakes(rig, exported_xhand, demo_episode, tmp_path):
    """runtime (replay cameras, ONNX Runtime, 18-action model) -> bridge -> xArm/XHand SDK fakes."""
    bridge, arm, hand, client = rig
    drive(bridge, exported_xhand, "xarm_xhand", demo_episode, client.cmd.context, tmp_path, min_accepted=20)
    servo = [c[1] for c in arm.calls if c[0] == "set_servo_cartesian"]
    assert len(servo) > 50, "the arm streamed servo targets"
    fingers = np.array([[f[4] for f in sent] for _, sent in hand.sent])
    assert len(fingers) > 50 and np.ptp(fingers, axis=0).max() > 0.01, "the fingers followed the policy"
    low, high = bridge.cfg.vec("setpoint_low")[6:], bridge.cfg.vec("setpoint_high")[6:]
    assert np.all(fingers >= low - 1e-9) and np.all(fingers <= high + 1e-9)
