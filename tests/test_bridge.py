"""Bridge over real ZeroMQ sockets: tracking with limits, watchdog, e-stop latch,
rejection of everything invalid, and fuzzing."""

import random
import time

import numpy as np
import pytest
import zmq

from vpp_edge.firmware_bridge.bridge import Bridge, Endpoints
from vpp_edge.firmware_bridge.config import BridgeConfigError, bridge_config_from_dict, load_bridge_config
from vpp_edge.firmware_bridge.driver import KinematicSimDriver
from vpp_edge.firmware_bridge.servo import LimitedInterpolator
from vpp_edge.runtime import protocol as P
from vpp_edge.runtime.transport import make_socket, recv, send

ANY = Endpoints("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")


def config(**changes):
    base = load_bridge_config("sim")
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in base.__dict__.items()}
    return bridge_config_from_dict({**data, "hold_after_s": 0.3, "stop_after_s": 0.8, **changes})


class Client:
    """What the runtime holds: PUSH for targets, SUB for events, DEALER for commands."""

    def __init__(self, bridge, ctx):
        ends = bridge.bound()
        self.push = make_socket(ctx, zmq.PUSH, ends.action, bind=False, timeout_ms=500)
        self.events = make_socket(ctx, zmq.SUB, ends.events, bind=False, timeout_ms=50)
        self.state = make_socket(ctx, zmq.SUB, ends.state, bind=False, timeout_ms=500, conflate=True)
        self.cmd = make_socket(ctx, zmq.DEALER, ends.command, bind=False, timeout_ms=1000)
        self.seq = 0
        time.sleep(0.2)  # subscriptions take effect

    def target(self, action):
        self.seq += 1
        chunk = P.ActionChunk(seq=self.seq, stamp=P.now(), obs_stamp=P.now(), dt=0.02,
                              actions=np.asarray([action], np.float32))
        assert send(self.push, chunk)

    def heartbeat(self, stamp=None):
        self.seq += 1
        assert send(self.push, P.Heartbeat(seq=self.seq, stamp=P.now() if stamp is None else stamp, sender="test"))

    def command(self, name):
        self.seq += 1
        assert send(self.cmd, P.CommandMsg(seq=self.seq, stamp=P.now(), command=name))
        reply = recv(self.cmd)
        assert isinstance(reply, P.Reply) and reply.request_seq == self.seq
        return reply

    def drain_events(self):
        kinds = []
        while (m := recv(self.events)) is not None:
            kinds.append((m.kind, m.detail))
        return kinds


@pytest.fixture
def rig():
    ctx = zmq.Context()
    driver = KinematicSimDriver(7)
    bridge = Bridge(driver, config(), ANY, ctx).start()
    client = Client(bridge, ctx)
    yield bridge, driver, client
    bridge.close()
    ctx.destroy(linger=0)


def wait_until(cond, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_tracks_targets_smoothly_without_jumps(rig):
    bridge, driver, client = rig
    target = np.array([0.1, -0.05, 0.02, 0.0, 0.0, 0.1, 1.0])
    client.target(target)  # deltas for xyz/rpy, absolute gripper

    def reached():  # keep the link alive as the runtime does every control tick (zero deltas)
        client.target(np.array([0, 0, 0, 0, 0, 0, 1.0]))
        return np.allclose(driver.setpoint, target, atol=1e-9)

    assert wait_until(reached)
    steps = np.abs(np.diff(np.stack(driver.history), axis=0))
    cfg = bridge.cfg
    assert np.all(steps <= cfg.vec("max_vel") / cfg.servo_hz + 1e-9), "never faster than max_vel"
    assert np.count_nonzero(steps[:, 0]) > 5, "the move is spread over many servo ticks"
    state = recv(client.state)
    assert isinstance(state, P.RobotState) and state.mode == "tracking" and state.last_chunk_seq > 1


def test_watchdog_holds_then_stops(rig):
    bridge, driver, client = rig
    client.target(np.array([0.05, 0, 0, 0, 0, 0, 0]))
    assert wait_until(lambda: bridge.mode == "hold")
    assert wait_until(lambda: bridge.mode == "stopped") and driver.stopped
    kinds = [k for k, _ in client.drain_events()]
    assert kinds.index("watchdog_hold") < kinds.index("watchdog_stop")
    client.target(np.zeros(7))
    assert wait_until(lambda: bridge.mode == "tracking"), "a fresh target resumes tracking"


def test_heartbeats_keep_a_starved_runtime_in_hold_not_stop(rig):
    bridge, driver, client = rig
    client.target(np.array([0.05, 0, 0, 0, 0, 0, 0]))
    assert wait_until(lambda: bridge.mode == "hold")
    end = time.monotonic() + 2 * bridge.cfg.stop_after_s
    while time.monotonic() < end:  # alive, no new target: hold indefinitely, never stop
        client.heartbeat()
        time.sleep(0.05)
    assert bridge.mode == "hold" and not driver.stopped and bridge.counts["heartbeats"] > 10
    client.heartbeat(stamp=P.now() - 5.0)  # one queued while the link was down proves nothing
    assert wait_until(lambda: bridge.counts["rejected_stale_heartbeat"] == 1)
    assert wait_until(lambda: bridge.mode == "stopped") and driver.stopped, "heartbeats stopped: stop"


def test_estop_latches_until_reset(rig):
    bridge, driver, client = rig
    assert client.command("estop").ok and bridge.mode == "estop"
    assert wait_until(lambda: driver.stopped), "the servo thread triggers the hardware e-stop within a tick"
    before = driver.setpoint.copy()
    client.target(np.array([0.05, 0, 0, 0, 0, 0, 0]))
    assert wait_until(lambda: bridge.counts["rejected_estopped"] == 1)
    time.sleep(0.05)
    assert np.array_equal(driver.setpoint, before)
    enable = client.command("enable")
    assert not enable.ok and "reset" in enable.reason
    reset = client.command("reset")
    assert reset.ok and reset.status["estopped"] is False
    client.target(np.array([0.05, 0, 0, 0, 0, 0, 0]))
    assert wait_until(lambda: driver.setpoint[0] == pytest.approx(0.05))
    assert client.command("status").status["accepted"] == 1


class DriftingDriver(KinematicSimDriver):
    """Measures ``offset`` away from its setpoint: a robot that no longer follows."""

    offset = np.zeros(7)

    def read_state(self):
        return self.setpoint.copy(), self.setpoint + self.offset


def test_a_robot_that_leaves_its_setpoint_latches_the_estop():
    ctx = zmq.Context()
    driver = DriftingDriver(7)
    bridge = Bridge(driver, config(), ANY, ctx).start()
    try:
        client = Client(bridge, ctx)
        client.target(np.array([0.02, 0, 0, 0, 0, 0, 0]))
        assert wait_until(lambda: driver.setpoint[0] == pytest.approx(0.02))
        driver.offset = np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.5])  # unchecked dimensions (.inf)
        time.sleep(0.2)
        assert bridge.mode != "estop" and not driver.stopped
        driver.offset = np.array([0.0, 0.03, 0.0, 0.0, 0.0, 0.0, 0.0])  # within 0.05
        time.sleep(0.2)
        assert bridge.mode != "estop"
        driver.offset = np.array([0.0, 0.08, 0.0, 0.0, 0.0, 0.0, 0.0])
        assert wait_until(lambda: bridge.mode == "estop") and driver.stopped
        assert any(k == "tracking_error" and "dimension 1" in d for k, d in client.drain_events())
        client.target(np.array([0.01, 0, 0, 0, 0, 0, 0]))
        assert wait_until(lambda: bridge.counts["rejected_estopped"] == 1), "latched until a reset"
    finally:
        bridge.close()
        ctx.destroy(linger=0)


@pytest.mark.parametrize(
    "action, reason",
    [
        (np.zeros(6), "wrong_dim"),
        (np.array([0.5, 0, 0, 0, 0, 0, 0]), "step_too_large"),
        (np.array([0, 0, 0, 0, 0, 0, -0.5]), "out_of_limits"),
    ],
)
def test_invalid_targets_are_rejected_with_a_reason(rig, action, reason):
    bridge, driver, client = rig
    client.target(action)
    assert wait_until(lambda: bridge.counts[f"rejected_{reason}"] == 1)
    assert bridge.counts["accepted"] == 0 and bridge.mode == "idle"
    assert wait_until(lambda: any(k == "rejected" and reason in d for k, d in client.drain_events()))


def test_fuzzed_frames_are_counted_and_never_forwarded(rig):
    bridge, driver, client = rig
    rng = random.Random(1)
    good = P.to_wire(P.ActionChunk(seq=1, stamp=0.0, obs_stamp=0.0, dt=0.02, actions=np.full((1, 7), 0.01,
                                                                                          np.float32)))
    n = 3000
    for _ in range(n):
        frame = bytearray(good if rng.random() < 0.7 else rng.randbytes(rng.randrange(1, 200)))
        for _ in range(rng.randint(1, 6)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        if frame == bytearray(good):
            frame[-1] ^= 0xFF
        client.push.send(bytes(frame))
    assert wait_until(lambda: bridge.counts["received"] == n, timeout=20)
    status = client.command("status").status
    accepted = status.get("accepted", 0)
    assert status["rejected"] + accepted == n
    # A mutation may still be a valid, in-limit message; anything else is rejected.
    assert accepted < 0.05 * n
    if accepted == 0:
        assert np.allclose(driver.setpoint, 0.0)
    assert bridge._threads[0].is_alive() and bridge._threads[1].is_alive()


def test_malformed_command_gets_a_negative_reply(rig):
    bridge, driver, client = rig
    client.cmd.send(b"\x00garbage")
    reply = recv(client.cmd)
    assert isinstance(reply, P.Reply) and not reply.ok and "msgpack" in reply.reason


def test_interpolator_never_jumps_and_settles():
    interp = LimitedInterpolator(np.zeros(2), max_vel=np.array([1.0, 1.0]), max_acc=np.array([10.0, 10.0]), dt=0.01)
    path = np.stack([interp.step(np.array([0.5, -0.2])) for _ in range(200)])
    v = np.diff(path, axis=0) / 0.01
    assert np.all(np.abs(v) <= 1.0 + 1e-9) and np.all(np.abs(np.diff(v, axis=0)) <= 10 * 0.01 + 1e-6)
    assert np.allclose(path[-1], [0.5, -0.2])


def test_interpolator_never_leaves_the_bounds_on_a_reversal():
    interp = LimitedInterpolator(np.array([0.0]), np.array([4.0]), np.array([10.0]), 0.005,
                                 low=np.array([0.0]), high=np.array([1.0]))
    path = [interp.step(np.array([1.0]))[0] for _ in range(60)]  # racing towards the upper bound
    path += [interp.step(np.array([0.0]))[0] for _ in range(200)]  # reverse at speed
    assert max(path) <= 1.0 and min(path) >= 0.0


def test_bridge_configs():
    assert load_bridge_config("sim").dim == 7
    with pytest.raises(BridgeConfigError, match="unknown bridge robot"):
        load_bridge_config("hal9000")
    with pytest.raises(BridgeConfigError, match="hold_after_s < stop_after_s"):
        config(hold_after_s=2.0)


@pytest.mark.parametrize("robot", ["sim", "metaworld", "panda", "xarm_xhand"])
def test_runtime_limits_fit_inside_the_bridge_limits(robot):
    """Whatever the runtime's safety gate lets through, the bridge accepts: delta actions no
    larger than one accepted step, absolute ones inside the setpoint bounds."""
    from vpp_edge.runtime.robot_config import load_robot_config

    rt, br = load_robot_config(robot), load_bridge_config(robot)
    delta = np.asarray(br.delta_dims, bool)
    biggest = np.maximum(np.abs(rt.low), np.abs(rt.high))
    assert rt.action_dim == br.dim
    assert np.all(biggest[delta] <= br.vec("max_step")[delta] + 1e-12)
    assert np.all(rt.low[~delta] >= br.vec("setpoint_low")[~delta])
    assert np.all(rt.high[~delta] <= br.vec("setpoint_high")[~delta])
    assert np.all(rt.delta[~delta] <= br.vec("max_step")[~delta])


def test_handshake_checks_schema_and_action_shape(rig):
    from vpp_edge.runtime.link import BridgeLink

    bridge, driver, client = rig
    ends = bridge.bound()
    link = BridgeLink(ends.action, ends.state, ends.events, ends.command)
    try:
        assert link.handshake("sim", 7) == {"robot": "sim", "dim": 7, "version": P.PROTOCOL_VERSION,
                                            "delta_dims": [True] * 6 + [False]}
        with pytest.raises(P.ProtocolError, match="takes 7 actions, the runtime sends 18"):
            link.handshake("xarm_xhand", 18)
    finally:
        link.close()
