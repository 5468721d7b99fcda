"""Bridge over real ZeroMQ sockets: tracking with limits, watchdog, e-stop latch,
rejection of everything invalid (malformed, replayed, reordered, stale, future, other
sessions), motion per second, thread failures, and fuzzing."""

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
from vpp_edge.runtime.threads import ThreadFailure
from vpp_edge.runtime.transport import make_socket, recv, send

ANY = Endpoints("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")


def config(**changes):
    base = load_bridge_config("sim")
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in base.__dict__.items()}
    return bridge_config_from_dict({**data, "hold_after_s": 0.3, "stop_after_s": 0.8, **changes})


class Client:
    """What the runtime holds: PUSH for targets, SUB for events, DEALER for commands; it
    says hello (role ``role``) so that its session owns the action link."""

    def __init__(self, bridge, ctx, role="runtime"):
        ends = bridge.bound()
        self.push = make_socket(ctx, zmq.PUSH, ends.action, bind=False, timeout_ms=500)
        self.events = make_socket(ctx, zmq.SUB, ends.events, bind=False, timeout_ms=50)
        self.state = make_socket(ctx, zmq.SUB, ends.state, bind=False, timeout_ms=500, conflate=True)
        self.cmd = make_socket(ctx, zmq.DEALER, ends.command, bind=False, timeout_ms=1000)
        self.seq = 0
        self.session = random.getrandbits(63)
        if role is not None:
            assert self.request(P.Hello(**self.next(), role=role, robot="sim", action_dim=7)).ok
        time.sleep(0.2)  # subscriptions take effect

    def next(self, **changes):
        """seq, stamp and session of the next message (``changes`` override them)."""
        self.seq += 1
        return {"seq": self.seq, "stamp": P.now(), "session": self.session, **changes}

    def chunk(self, action, **changes):
        return P.ActionChunk(**self.next(**changes), obs_stamp=P.now(), dt=0.02,
                             actions=np.asarray([action], np.float32))

    def target(self, action, **changes):
        assert send(self.push, self.chunk(action, **changes))

    def heartbeat(self, mode="idle", **changes):
        assert send(self.push, P.Heartbeat(**self.next(**changes), sender="test", mode=mode))

    def request(self, msg):
        assert send(self.cmd, msg)
        reply = recv(self.cmd)
        assert isinstance(reply, P.Reply) and reply.request_seq == msg.seq
        return reply

    def command(self, name, **changes):
        return self.request(P.CommandMsg(**self.next(**changes), command=name))

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


def test_idle_heartbeats_keep_the_robot_holding_not_stopped(rig):
    bridge, driver, client = rig
    client.target(np.array([0.05, 0, 0, 0, 0, 0, 0]))
    assert wait_until(lambda: bridge.mode == "hold")
    end = time.monotonic() + 2 * bridge.cfg.stop_after_s
    while time.monotonic() < end:  # alive, not commanding on purpose: hold indefinitely, never stop
        client.heartbeat("idle")
        time.sleep(0.05)
    assert bridge.mode == "hold" and not driver.stopped and bridge.counts["heartbeats_idle"] > 10
    client.heartbeat("idle", stamp=P.now() - 5.0)  # one queued while the link was down proves nothing
    assert wait_until(lambda: bridge.counts["rejected_stale_heartbeat"] == 1)
    assert wait_until(lambda: bridge.mode == "stopped") and driver.stopped, "heartbeats stopped: stop"


def test_a_starved_runtime_is_held_then_stopped_like_a_dead_one(rig):
    bridge, driver, client = rig
    client.target(np.array([0.05, 0, 0, 0, 0, 0, 0]))
    assert wait_until(lambda: bridge.mode == "tracking")

    def starving():  # alive, heartbeats on every tick, but no valid chunk
        client.heartbeat("starved")
        return bridge.mode == "stopped"

    assert wait_until(starving, timeout=5 * bridge.cfg.stop_after_s) and driver.stopped
    kinds = [k for k, _ in client.drain_events()]
    assert kinds.index("watchdog_hold") < kinds.index("watchdog_stop")
    assert bridge.counts["heartbeats_starved"] > 5
    client.target(np.zeros(7))
    assert wait_until(lambda: bridge.mode == "tracking"), "a valid target resumes"


def test_a_runtime_that_says_stop_is_stopped_at_once(rig):
    bridge, driver, client = rig
    client.target(np.array([0.05, 0, 0, 0, 0, 0, 0]))
    assert wait_until(lambda: bridge.mode == "tracking")
    client.heartbeat("stop")
    assert wait_until(lambda: bridge.mode == "stopped") and driver.stopped
    assert ("watchdog_stop", "runtime says stop") in client.drain_events()
    assert "watchdog_hold" not in [k for k, _ in client.drain_events()], "no hold phase: stopped directly"


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
    stale = client.command("reset", stamp=P.now() - 10.0)
    assert not stale.ok and "stale or future" in stale.reason
    stranger = Client(bridge, client.push.context, role=None)  # never said hello
    assert not stranger.command("reset").ok
    assert stranger.command("estop").ok, "stopping commands are obeyed from anyone"
    replay = P.to_wire(P.CommandMsg(**client.next(), command="reset"))
    client.cmd.send(replay)
    reset = recv(client.cmd)
    assert reset.ok and reset.status["estopped"] is False
    assert client.command("estop").ok and bridge.mode == "estop"
    client.cmd.send(replay)  # the same reset again: refused, the e-stop stays latched
    replayed = recv(client.cmd)
    assert not replayed.ok and "replayed or reordered" in replayed.reason and bridge.mode == "estop"
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


# Headers a broken or hostile peer sends: each once crashed the bridge's network thread
# (a dtype that is a list or a map, a shape whose size overflows int64) or must be refused.
NASTY_ARRAYS = [{"dtype": ["float32"]}, {"dtype": {"a": 1}}, {"shape": [2**32, 2**32]}, {"shape": [2**62, 4]},
                {"shape": [1, 7, 1]}, {"dtype": "object"}, {"shape": [True, 7]}, {"name": ["actions"]}]


def test_fuzzed_frames_are_counted_and_never_forwarded(rig):
    """Fresh, in-session frames (so that they reach the checks behind the decoder), mutated
    at random or given nasty headers: every one is counted as accepted or rejected, the
    robot never leaves its limits, and the bridge still answers an e-stop."""
    import msgpack

    bridge, driver, client = rig
    rng = random.Random(1)
    n = 3000
    for k in range(n):
        frames = P.encode(client.chunk(np.full(7, 0.01)))
        if k % 10 == 0:  # structural: a nasty array header
            header = msgpack.unpackb(frames[0])
            header["arrays"] = [{**header["arrays"][0], **NASTY_ARRAYS[(k // 10) % len(NASTY_ARRAYS)]}]
            frames[0] = msgpack.packb(header)
            frame = bytearray(msgpack.packb(frames))
        else:
            frame = bytearray(msgpack.packb(frames))
            for _ in range(rng.randint(1, 6)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
        client.push.send(bytes(frame))
    assert wait_until(lambda: bridge.counts["received"] == n, timeout=20)
    status = client.command("status").status
    accepted = status.get("accepted", 0)
    assert status["rejected"] + accepted == n
    assert status["rejected_malformed"] > n // 2 and status["rejected_malformed"] >= n // 10  # the nasty ones
    # A mutation may still be a valid, in-limit, in-order message; what was accepted kept the robot in limits.
    history = np.stack(driver.history) if driver.history else np.zeros((1, 7))
    cfg = bridge.cfg
    assert np.all(history >= cfg.vec("setpoint_low")) and np.all(history <= cfg.vec("setpoint_high"))
    assert np.all(np.abs(np.diff(history, axis=0)) <= cfg.vec("max_vel") / cfg.servo_hz + 1e-9)
    assert bridge.health() is None and all(t.is_alive() for t in bridge._threads)
    assert client.command("estop").ok and wait_until(lambda: driver.stopped), "still answers an e-stop"


def test_other_sessions_replays_reordering_and_future_stamps_are_refused(rig):
    bridge, driver, client = rig
    step = np.array([0.01, 0, 0, 0, 0, 0, 0])
    first = client.chunk(step)
    later = client.chunk(step)
    client.push.send(P.to_wire(later))
    client.push.send(P.to_wire(first))  # reordered: older than the last accepted
    client.push.send(P.to_wire(later))  # replayed
    client.target(step, session=client.session + 1)  # a session that never said hello
    client.target(step, stamp=P.now() + 1.0)  # from the future
    client.target(step, stamp=P.now() - 10.0)  # stale
    assert wait_until(lambda: bridge.counts["received"] == 6)
    counts = bridge.counts
    assert (counts["accepted"], counts["rejected_replayed"], counts["rejected_wrong_session"],
            counts["rejected_future_stamp"], counts["rejected_stale_target"]) == (1, 2, 1, 1, 1)
    other = Client(bridge, client.push.context)  # a new runtime's hello takes the action link over
    client.target(step)
    other.target(step)
    assert wait_until(lambda: counts["accepted"] == 2 and counts["rejected_wrong_session"] == 2)
    hello = P.Hello(**other.next(session=other.session + 1), role="runtime", robot="sim", action_dim=7)
    assert other.request(hello).ok, "a new session"
    replayed_hello = other.request(hello)
    assert not replayed_hello.ok and "already used" in replayed_hello.reason


def test_a_burst_of_targets_moves_no_faster_than_the_velocity_limit(rig):
    bridge, driver, client = rig
    cfg = bridge.cfg
    start = bridge._target.copy()
    began = time.monotonic()
    for _ in range(50):  # each within max_step, together 50x it
        client.target(np.array([0.2, 0, 0, 0, 0, 0, 0]))
    assert wait_until(lambda: bridge.counts["received"] == 50)
    elapsed = time.monotonic() - began
    moved = abs(bridge._target[0] - start[0])
    assert bridge.counts["rate_limited"] > 0
    assert moved <= cfg.burst()[0] + cfg.max_vel[0] * elapsed + 1e-9 < 50 * cfg.max_step[0]


def _fail_on_call(*_args, **_kwargs):
    raise RuntimeError("injected fault")


@pytest.mark.parametrize("where", ["network", "servo"])
def test_a_failed_thread_latches_the_estop_and_ends_the_process(rig, where, monkeypatch):
    bridge, driver, client = rig
    if where == "network":
        monkeypatch.setattr(bridge, "handle_frame", _fail_on_call)
        client.target(np.zeros(7))
    else:
        monkeypatch.setattr(driver, "servo", _fail_on_call)
    assert wait_until(lambda: bridge.health() is not None) and wait_until(lambda: driver.stopped)
    assert bridge.mode == "estop" and "injected fault" in bridge.health()
    assert wait_until(lambda: any(k == "thread_failed" and "injected fault" in d for k, d in client.drain_events()))
    if where == "servo":  # the network thread still answers, but nothing clears this e-stop
        refused = client.command("reset")
        assert not refused.ok and "bridge failed" in refused.reason and bridge.mode == "estop"
    with pytest.raises(ThreadFailure, match="injected fault.*e-stop latched"):
        bridge.supervise(duration_s=5.0)


def test_malformed_command_gets_a_negative_reply(rig):
    bridge, driver, client = rig
    client.cmd.send(b"\x00garbage")
    reply = recv(client.cmd)
    assert isinstance(reply, P.Reply) and not reply.ok and "msgpack" in reply.reason
    client.cmd.send(P.to_wire(P.Hello(seq=1, stamp=P.now(), role="runtime")).replace(b"hello", b"hullo"))
    assert not recv(client.cmd).ok and bridge.health() is None


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


SHIPPED_ROBOTS = ("metaworld", "panda", "sim", "xarm_xhand", "xbot")


def test_each_robot_is_described_in_one_file_only():
    """vpp_edge/robots/<name>.yaml is the only place a robot's limits, rates and deadlines are
    written: both loaders read that folder, and no other YAML in the packages carries them."""
    from pathlib import Path

    from vpp_edge.firmware_bridge.config import CONFIG_DIR
    from vpp_edge.robot_description import ROBOTS_DIR, known_robots
    from vpp_edge.runtime.robot_config import ROBOT_DIR

    assert ROBOT_DIR == CONFIG_DIR == ROBOTS_DIR and tuple(known_robots()) == SHIPPED_ROBOTS
    repo = Path(__file__).resolve().parents[1]
    facts = ("watchdog_hold_s", "hold_after_s", "hold_s:", "action_low", "setpoint_low", "max_step", "control_hz")
    elsewhere = [p.relative_to(repo).as_posix()
                 for top in ("vpp_edge", "runtime", "firmware_bridge", "deploy", "calibrate", "export", "evaluation")
                 for p in (repo / top).rglob("*.yaml")
                 if p.parent != ROBOTS_DIR and any(f in p.read_text() for f in facts)]
    assert not elsewhere, f"robot facts outside vpp_edge/robots: {elsewhere}"


@pytest.mark.parametrize("robot", SHIPPED_ROBOTS)
def test_runtime_and_bridge_read_one_description(robot, tmp_path):
    """The shared facts come out the same on both sides, and a change written once reaches both."""
    import yaml

    from vpp_edge.robot_description import ROBOTS_DIR
    from vpp_edge.runtime.robot_config import load_robot_config

    rt, br = load_robot_config(robot), load_bridge_config(robot)
    assert rt.name == br.name == robot and rt.action_dim == br.dim
    assert (rt.watchdog_hold_s, rt.watchdog_stop_s) == (br.hold_after_s, br.stop_after_s)

    data = yaml.safe_load((ROBOTS_DIR / f"{robot}.yaml").read_text())
    data["watchdog"] = {"hold_s": 0.25, "stop_s": 0.75}
    data["runtime"]["stale_observation_s"] = 0.2
    data["bridge"]["servo_hz"] = 123
    path = tmp_path / f"{robot}.yaml"
    path.write_text(yaml.safe_dump(data))
    rt, br = load_robot_config(str(path)), load_bridge_config(str(path))
    assert (rt.watchdog_hold_s, rt.watchdog_stop_s) == (br.hold_after_s, br.stop_after_s) == (0.25, 0.75)
    assert rt.stale_observation_s == 0.2 and br.servo_hz == 123


def test_a_description_whose_runtime_limits_exceed_the_bridge_is_refused_by_both(tmp_path):
    """Whatever the runtime's safety gate lets through, the bridge accepts (delta actions no
    larger than one accepted step, absolute ones inside the setpoint bounds): checked when
    either side reads the description, so a robot cannot ship with parts that disagree."""
    import yaml

    from vpp_edge.robot_description import ROBOTS_DIR
    from vpp_edge.runtime.robot_config import ConfigError, load_robot_config

    base = yaml.safe_load((ROBOTS_DIR / "sim.yaml").read_text())
    high = base["runtime"]["action_high"]
    delta_too_big = {**base, "runtime": {**base["runtime"], "action_high": [0.5, *high[1:]]}}  # x: beyond max_step
    gripper_outside = {**base, "runtime": {**base["runtime"], "action_high": [*high[:6], 1.5]}}  # beyond setpoint_high
    for i, data in enumerate((delta_too_big, gripper_outside)):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match="the bridge refuses in dimension"):
            load_robot_config(str(path))
        with pytest.raises(BridgeConfigError, match="the bridge refuses in dimension"):
            load_bridge_config(str(path))
    path.write_text(yaml.safe_dump({**base, "watchdog": {"hold_s": 0.5}}))
    with pytest.raises(BridgeConfigError, match="missing"):
        load_bridge_config(str(path))


def test_handshake_checks_schema_and_action_shape(rig):
    from vpp_edge.runtime.link import BridgeLink

    bridge, driver, client = rig
    ends = bridge.bound()
    link = BridgeLink(ends.action, ends.state, ends.events, ends.command)
    try:
        cfg = bridge.cfg
        assert link.handshake("sim", 7) == {"robot": "sim", "dim": 7, "version": P.PROTOCOL_VERSION,
                                            "delta_dims": [True] * 6 + [False],
                                            "setpoint_low": list(cfg.setpoint_low), "setpoint_high": list(cfg.setpoint_high)}
        assert np.array_equal(link.workspace[1], cfg.vec("setpoint_high")), "the runtime keeps its sums inside"
        with pytest.raises(P.ProtocolError, match="takes 7 actions, the runtime sends 18"):
            link.handshake("xarm_xhand", 18)
    finally:
        link.close()


def test_a_bridge_beyond_loopback_admits_only_allowed_runtime_keys(tmp_path):
    from vpp_edge.cli import main
    from vpp_edge.firmware_bridge.bridge import Security
    from vpp_edge.runtime.link import BridgeLink
    from vpp_edge.runtime.transport import CurveKeys

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    for name in ("bridge", "runtime", "intruder"):
        assert main(["keys", name, "--out", str(keys)]) == 0
    allowed.mkdir()
    (allowed / "runtime.key").write_bytes((keys / "runtime.key").read_bytes())
    ctx = zmq.Context()
    with pytest.raises(P.ProtocolError, match="leaves the machine.*--insecure"):
        Bridge(KinematicSimDriver(7), config(), Endpoints.on("0.0.0.0"), ctx).start()
    with pytest.raises(P.ProtocolError, match="needs the folder of client keys"):
        Security(CurveKeys.load(keys, "bridge"))
    bridge = Bridge(KinematicSimDriver(7), config(), ANY, ctx, Security(CurveKeys.load(keys, "bridge"), str(allowed)))
    bridge.start()
    ends = bridge.bound()
    links = {name: BridgeLink(ends.action, ends.state, ends.events, ends.command, context=ctx, command_timeout_ms=500,
                              curve=CurveKeys.load(keys, name, server="bridge")) for name in ("intruder", "runtime")}
    try:
        with pytest.raises(P.ProtocolError, match="no handshake reply"):
            links["intruder"].handshake("sim", 7)
        assert links["runtime"].handshake("sim", 7)["dim"] == 7
        assert links["runtime"].send_target(np.array([0.01, 0, 0, 0, 0, 0, 0]), P.now(), 0.1)
        assert wait_until(lambda: bridge.counts["accepted"] == 1)
    finally:
        for link in links.values():
            link.close()
        bridge.close()
        ctx.destroy(linger=0)


# --- the bridge owns time: waypoints executed on its clock (issue 19) -----------------------
def _plan(client, targets, start, dt=0.02, **changes):
    """Send absolute ``targets`` for the bridge's times ``start + i * dt``."""
    msg = P.Waypoints(**client.next(**changes), start=start, dt=dt, targets=np.asarray(targets, np.float64))
    assert send(client.push, msg)
    return msg


def test_waypoint_schedule_interpolates_skips_the_past_and_never_jumps():
    from vpp_edge.firmware_bridge.servo import WaypointSchedule

    s = WaypointSchedule(np.zeros(1), now=0.0)
    assert s.plan(np.array([-0.1, 0.1, 0.2]), np.array([[9.0], [1.0], [2.0]]), now=0.0) == 1, "the past one skipped"
    assert s.goal(0.05) == pytest.approx([0.5]) and s.goal(0.15) == pytest.approx([1.5])
    assert s.goal(0.3) == pytest.approx([2.0]) and s.end() == pytest.approx([2.0]), "held after the last"
    # A new plan mid-segment starts from the goal of the moment: no jump, later points replaced.
    s = WaypointSchedule(np.zeros(1), now=0.0)
    s.plan(np.array([0.1, 0.2]), np.array([[1.0], [2.0]]), now=0.0)
    before = s.goal(0.05)
    s.plan(np.array([0.08]), np.array([[-1.0]]), now=0.05)
    assert s.goal(0.05) == pytest.approx(before) and s.end() == pytest.approx([-1.0]) and len(s) == 2
    assert s.goal(0.065) == pytest.approx((before - 1.0) / 2), "from the goal of the moment to the new point"
    # A plan after a dropped one is measured from the last waypoint's time, a rest from now.
    s = WaypointSchedule(np.zeros(1), now=0.0)
    assert s.reference(0.5, now=0.3) == (0.3, pytest.approx([0.0]))
    s.plan(np.array([0.1]), np.array([[1.0]]), now=0.0)
    t_ref, p_ref = s.reference(0.2, now=0.15)
    assert t_ref == pytest.approx(0.1) and p_ref == pytest.approx([1.0])


def test_waypoints_are_executed_on_the_bridges_clock_within_the_limits(rig):
    bridge, driver, client = rig
    start = driver.setpoint.copy()
    ramp = start + np.outer(np.arange(1, 11) * 0.004, np.eye(7)[0])  # 0.2 m/s along x, 10 waypoints
    t0 = P.now() + 0.05
    _plan(client, ramp, t0)
    assert wait_until(lambda: np.allclose(driver.setpoint, ramp[-1], atol=1e-9))
    assert bridge.counts["accepted"] == 1 and bridge.mode == "tracking"
    steps = np.abs(np.diff(np.stack(driver.history), axis=0))
    assert np.all(steps <= bridge.cfg.vec("max_vel") / bridge.cfg.servo_hz + 1e-9)
    assert np.count_nonzero(steps[:, 0]) >= 5, "spread over the plan's time, not one jump"
    assert np.allclose(bridge._target, ramp[-1]), "the state says where the robot is heading"


def test_a_dropped_plan_loses_no_motion_and_is_not_refused():
    ctx = zmq.Context()
    driver = KinematicSimDriver(7)
    bridge = Bridge(driver, config(max_step=[0.02] * 6 + [1.0]), ANY, ctx).start()
    try:
        _dropped_plan(bridge, driver, Client(bridge, ctx))
    finally:
        bridge.close()
        ctx.destroy(linger=0)


def _dropped_plan(bridge, driver, client):
    dt, lead, x = 0.05, 0.1, np.eye(7)[0]
    base = driver.setpoint.copy()
    t0 = P.now()
    for tick in (1, 2, 4, 5):  # the plan of tick 3 is lost (a conflated socket keeps only the newest)
        target = base + x * bridge.cfg.max_step[0] * tick  # each tick moves one full max_step
        _plan(client, [target], t0 + tick * dt + lead, dt=dt)
        time.sleep(max(0.0, t0 + tick * dt - P.now()))
    assert wait_until(lambda: np.allclose(driver.setpoint, base + x * 5 * bridge.cfg.max_step[0], atol=1e-9))
    assert bridge.counts["accepted"] == 4 and bridge.counts["rejected"] == 0, dict(bridge.counts)


def test_late_waypoints_are_skipped_not_jumped_to(rig):
    bridge, driver, client = rig
    start = driver.setpoint.copy()
    far = start + np.eye(7)[0] * 0.01
    _plan(client, [far, far], P.now() - 0.1)  # all in the past: skipped, nothing taken
    assert wait_until(lambda: bridge.counts["waypoints_late"] == 2)
    _plan(client, [far, start], P.now() - 0.01, dt=0.05)  # its first waypoint is past: only the second runs
    assert wait_until(lambda: bridge.counts["accepted"] == 1 and bridge.counts["waypoints_late"] == 3)
    time.sleep(0.15)
    assert np.allclose(np.stack(driver.history or [start]), start), "the robot never went to the late waypoint"
    assert bridge.counts["rejected"] == 0


@pytest.mark.parametrize("changes, reason", [
    ({"targets": np.zeros((1, 6))}, "wrong_dim"),
    ({"targets": [[0.5, 0, 0, 0, 0, 0, 0], [0.0] * 7]}, "step_too_large"),  # a jump inside the plan
    ({"targets": [[0, 0, 0, 0, 0, 0, -0.5]]}, "out_of_limits"),
    ({"dt": 1e-4}, "bad_timing"),
    ({"start_in": 5.0}, "too_far_ahead"),
])
def test_invalid_plans_are_rejected_with_a_reason(rig, changes, reason):
    bridge, driver, client = rig
    plan = {"targets": [driver.setpoint.tolist()], "dt": 0.02, **changes}
    _plan(client, plan["targets"], P.now() + plan.get("start_in", 0.05), dt=plan["dt"])
    assert wait_until(lambda: bridge.counts[f"rejected_{reason}"] == 1), dict(bridge.counts)
    assert bridge.counts["accepted"] == 0 and bridge.mode == "idle"


def test_plans_obey_the_watchdog_and_the_estop(rig):
    bridge, driver, client = rig
    _plan(client, [driver.setpoint + np.eye(7)[0] * 0.01], P.now() + 0.05)
    assert wait_until(lambda: bridge.mode == "hold") and wait_until(lambda: bridge.mode == "stopped")
    assert client.command("estop").ok and wait_until(lambda: driver.stopped)
    _plan(client, [driver.setpoint], P.now() + 0.05)
    assert wait_until(lambda: bridge.counts["rejected_estopped"] == 1)
