"""The runtime's half of the safety chain, over real ZeroMQ sockets and without a model:
it checks what the bridge and a network camera send (refused and counted, never fatal),
it tells the bridge when it cannot act (the bridge holds, then stops), and a worker
thread that fails ends the run with the robot held then stopped and ThreadFailure."""

from __future__ import annotations

import dataclasses
import threading
import time
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
import zmq

from vpp_edge.firmware_bridge.bridge import Bridge, Endpoints
from vpp_edge.firmware_bridge.config import bridge_config_from_dict, load_bridge_config
from vpp_edge.firmware_bridge.driver import KinematicSimDriver
from vpp_edge.runtime import protocol as P
from vpp_edge.runtime.cameras.base import Camera, Frame
from vpp_edge.runtime.cameras.network import ZmqCameras
from vpp_edge.runtime.link import BridgeLink
from vpp_edge.runtime.build import build_runtime
from vpp_edge.runtime.config import RuntimeConfig
from vpp_edge.runtime.metrics import Metrics
from vpp_edge.runtime.policy import Chunk, EngineOutputError
from vpp_edge.runtime.robot_config import load_robot_config

from .test_bridge import wait_until
from vpp_edge.runtime.threads import ThreadFailure
from vpp_edge.runtime.transport import make_socket, send

ANY = "tcp://127.0.0.1:*"


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def bound(sock: zmq.Socket) -> str:
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


class FakeBridge:
    """Bound sockets a test drives by hand: answers one hello with ``status`` (stamped ``clock``)."""

    def __init__(self, ctx, status: dict, clock_offset: float = 0.0):
        self.router = make_socket(ctx, zmq.ROUTER, ANY, bind=True, timeout_ms=2000)
        self.state = make_socket(ctx, zmq.PUB, ANY, bind=True)
        self.events = make_socket(ctx, zmq.PUB, ANY, bind=True)
        self.pull = make_socket(ctx, zmq.PULL, ANY, bind=True)
        self.link = BridgeLink(bound(self.pull), bound(self.state), bound(self.events), bound(self.router), context=ctx)
        self.status, self.clock_offset = status, clock_offset
        self._thread = threading.Thread(target=self._answer, daemon=True)
        self._thread.start()

    def _answer(self):
        try:
            identity, frame = self.router.recv_multipart()
        except zmq.Again:
            return
        hello = P.from_wire(frame)
        reply = P.Reply(seq=1, stamp=P.now() + self.clock_offset, request_seq=hello.seq, ok=True, status=self.status)
        self.router.send_multipart([identity, P.to_wire(reply)])

    def close(self):
        self._thread.join(timeout=3)
        self.link.close()
        for s in (self.router, self.state, self.events, self.pull):
            s.close(linger=0)


GOOD_STATUS = {"robot": "sim", "dim": 7, "version": P.PROTOCOL_VERSION, "delta_dims": [True] * 6 + [False]}


@pytest.mark.parametrize("change, reason", [
    ({"delta_dims": [True] * 6}, "delta_dims .* is not 7 booleans"),
    ({"delta_dims": [1] * 7}, "is not 7 booleans"),
    ({"delta_dims": "yes"}, "is not 7 booleans"),
    ({"dim": True}, "takes True actions"),
    ({"dim": "7"}, "takes '7' actions"),
    ({"version": 1}, "speaks schema 1"),
    ({"setpoint_low": [0.0] * 7, "setpoint_high": [0.0] * 7}, "setpoint bounds"),
    ({"setpoint_low": [0.0] * 6, "setpoint_high": [1.0] * 7}, "setpoint bounds"),
    ({"setpoint_low": ["a"] * 7, "setpoint_high": [1.0] * 7}, "setpoint bounds"),
    ({"setpoint_high": [1.0] * 7}, "setpoint bounds"),
])
def test_a_handshake_reply_the_runtime_cannot_use_is_refused(ctx, change, reason):
    fake = FakeBridge(ctx, {**GOOD_STATUS, **change})
    try:
        with pytest.raises(P.ProtocolError, match=reason):
            fake.link.handshake("sim", 7)
    finally:
        fake.close()


def test_the_handshake_measures_the_bridge_clock_and_opens_a_session(ctx):
    fake = FakeBridge(ctx, GOOD_STATUS, clock_offset=1000.0)  # another computer's monotonic clock
    try:
        assert fake.link.handshake("sim", 7) == GOOD_STATUS
        assert abs(fake.link.clock_offset - 1000.0) < 0.5
        assert fake.link.send_heartbeat(P.RuntimeMode.IDLE)
        beat = P.from_wire(fake.pull.recv())
        assert beat.session == fake.link.session != 0 and abs(beat.stamp - (P.now() + 1000.0)) < 0.5
    finally:
        fake.close()


def test_states_the_runtime_cannot_use_are_refused_and_counted(ctx):
    fake = FakeBridge(ctx, GOOD_STATUS)
    try:
        fake.link.handshake("sim", 7)
        time.sleep(0.2)  # the subscription takes effect
        state = dict(seq=1, stamp=P.now(), joints=np.zeros(7), ee_pose=np.zeros(7))
        bad = [P.RobotState(**state, target=np.full(7, np.nan)), P.RobotState(**state, target=np.zeros(3))]
        for msg in bad:
            send(fake.state, msg)
            time.sleep(0.05)  # the state stream is latest-only: one at a time
            assert fake.link.poll()[0] is None
        fake.state.send(b"\x93garbage")
        time.sleep(0.05)
        assert fake.link.poll()[0] is None
        send(fake.state, P.RobotState(**state, target=np.ones(7)))
        assert wait_until(lambda: fake.link.poll()[0] is not None)
        assert fake.link.counts == {"refused_state_target_not_finite": 1, "refused_state_target_shape": 1,
                                    "refused_malformed": 1}
        assert np.array_equal(fake.link.last_state.target, np.ones(7))
    finally:
        fake.close()


def test_bad_camera_frames_are_dropped_and_the_camera_goes_on(ctx):
    pub = make_socket(ctx, zmq.PUB, ANY, bind=True)
    cam = ZmqCameras(bound(pub), views=2, size=8, context=ctx).start()
    try:
        time.sleep(0.3)  # the subscription takes effect
        good = P.encode(P.CameraFrames(seq=1, stamp=P.now(), index=1, images=np.zeros((2, 4, 4, 3), np.uint8)))
        header = msgpack.unpackb(good[0])
        header["arrays"][0]["shape"] = [2, 0, 0, 3]  # a 0x0 image: once crashed the resize and the thread
        empty = msgpack.packb([msgpack.packb(header), b""])
        one_view = P.to_wire(P.CameraFrames(seq=2, stamp=P.now(), index=2, images=np.zeros((1, 4, 4, 3), np.uint8)))
        for frame in (empty, one_view, b"\x00garbage"):
            pub.send(frame)
            time.sleep(0.05)
        assert wait_until(lambda: cam.dropped == 3) and cam.failure is None
        send(pub, P.CameraFrames(seq=3, stamp=P.now(), index=3, images=np.zeros((2, 6, 6, 3), np.uint8)))
        assert wait_until(lambda: cam.error is None and cam._latest is not None)
        assert cam.latest(1.0).image.shape == (2, 8, 8, 3) and cam._thread.is_alive()
    finally:
        cam.stop()
        pub.close(linger=0)


# --- the runtime loop with a fake policy and camera -------------------------------------------

class FakeCamera(Camera):
    """Fresh frames at 50 Hz; ``fail_after`` frames, the capture thread raises."""

    def __init__(self, fail_after: int | None = None):
        super().__init__("fake")
        self.fail_after = fail_after

    def capture_loop(self):
        k = 0
        while not self._stop.wait(0.02):
            if self.fail_after is not None and k >= self.fail_after:
                raise OSError("injected camera fault")
            self._publish(Frame(np.zeros((1, 8, 8, 3), np.uint8), time.monotonic(), k))
            k += 1


class FakePolicy:
    """Zero-motion chunks; after ``good`` of them, ``fault`` is raised on every inference."""

    preset = SimpleNamespace(action_dim=7)

    def __init__(self, good: int, fault: Exception):
        self.good, self.fault, self.calls = good, fault, 0

    def set_instruction(self, text):
        return 0.0

    def infer(self, frames, prefix=None, delay_steps=0):
        self.calls += 1
        if self.calls > self.good:
            raise self.fault
        actions = np.zeros((8, 7), np.float32)
        return Chunk(actions, actions, {"engine_ms": 1.0})


@pytest.fixture
def sim_bridge(ctx):
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in load_bridge_config("sim").__dict__.items()}
    cfg = bridge_config_from_dict({**data, "hold_after_s": 0.3, "stop_after_s": 0.8})
    driver = KinematicSimDriver(7)
    bridge = Bridge(driver, cfg, Endpoints(*[ANY] * 4), ctx).start()
    ends = bridge.bound()
    link = BridgeLink(ends.action, ends.state, ends.events, ends.command, context=ctx)
    yield bridge, driver, link
    link.close()
    bridge.close()


def make_runtime(link, policy, camera, duration_s):
    robot = dataclasses.replace(load_robot_config("sim"), watchdog_hold_s=0.3, watchdog_stop_s=0.8)
    config = RuntimeConfig(duration_s=duration_s, instruction="hold the block")  # as vpp run builds it
    return build_runtime(config, policy=policy, cameras=[camera], link=link, metrics=Metrics(), robot=robot,
                         set_instruction=False).runtime


def test_a_runtime_whose_engine_keeps_failing_is_held_then_stopped_by_the_bridge(sim_bridge):
    bridge, driver, link = sim_bridge
    runtime = make_runtime(link, FakePolicy(good=2, fault=EngineOutputError("NaN")), FakeCamera(), 3.0)
    summary = runtime.run()  # alive all along: heartbeats every tick, but no valid chunk
    runtime.metrics.close()
    assert summary["counts"]["chunks"] == 2 and summary["counts"]["engine_invalid"] > 3
    assert bridge.counts["heartbeats_starved"] > 0 and bridge.counts["heartbeats_stop"] > 0
    assert bridge.counts["event_watchdog_hold"] >= 1 and bridge.counts["event_watchdog_stop"] >= 1
    assert driver.stopped, "the robot stopped although the runtime never went silent"


@pytest.mark.parametrize("where", ["inference", "camera"])
def test_a_failed_runtime_thread_holds_then_stops_the_robot_and_ends_the_run(sim_bridge, where):
    bridge, driver, link = sim_bridge
    fault = RuntimeError("injected inference fault")
    policy = FakePolicy(good=3 if where == "inference" else 10**6, fault=fault)
    camera = FakeCamera(fail_after=20 if where == "camera" else None)
    runtime = make_runtime(link, policy, camera, 30.0)
    with pytest.raises(ThreadFailure, match=f"injected {where} fault.*held, then stopped"):
        runtime.run()
    runtime.metrics.close()
    assert runtime.metrics.counts["thread_failed"] == 1
    assert wait_until(lambda: bridge.mode == "stopped") and driver.stopped
    assert bridge.counts["event_hold"] == 1 and bridge.counts["heartbeats_stop"] >= 1, "held, then stopped"


def test_series_and_chunking_statistics_stay_bounded_over_a_long_run():
    """An accelerated clock: more ticks than every window holds, memory stays at the window."""
    from vpp_edge.runtime import chunking, metrics
    from vpp_edge.runtime.chunking import ActionPlan

    m = Metrics()
    ticks = metrics.SERIES_WINDOW + 5_000
    for k in range(ticks):
        m.observe("jitter_ms", k % 7)
    m.close()
    assert len(m.series["jitter_ms"]) == metrics.SERIES_WINDOW
    assert m.summary()["latency_ms"]["jitter_ms"]["n"] == ticks, "n counts everything, percentiles the window"
    plan = ActionPlan(0.02, "crossfade")
    chunk = np.random.default_rng(0).normal(size=(8, 7))
    pops = 0
    for tick in range(chunking.JUMP_WINDOW + 2_000):
        now = tick * 0.02
        if tick % 6 == 0:
            plan.add_chunk(chunk, now, now, seq=tick)
        pops += plan.pop(now) is not None
    assert pops > chunking.JUMP_WINDOW
    assert len(plan.boundary_jumps) + len(plan.inner_jumps) <= 2 * chunking.JUMP_WINDOW
    assert len(plan.inner_jumps) == chunking.JUMP_WINDOW


def test_an_invalid_action_is_not_replaced_by_resending_the_last_one(sim_bridge):
    """A delta action sent twice moves the robot twice: after an invalid action the runtime
    sends nothing new (a starved heartbeat), not its last safe action again."""
    bridge, driver, link = sim_bridge
    runtime = make_runtime(link, FakePolicy(good=10**6, fault=RuntimeError()), FakeCamera(), 2.0)
    pop, valid = runtime.plan.pop, []

    def three_then_nan(now):
        action = pop(now)
        if action is None or len(valid) < 3:
            valid.extend([] if action is None else [action])
            return action
        return np.full(7, np.nan)

    runtime.plan.pop = three_then_nan
    runtime.run()
    runtime.metrics.close()
    assert runtime.safety.counts["action_invalid"] > 3
    assert wait_until(lambda: bridge.counts["received"] > 10)
    assert bridge.counts["accepted"] == 3 and bridge.counts["heartbeats_starved"] > 3


def test_the_state_stream_keeps_the_clock_offset_as_the_two_clocks_drift(ctx):
    from vpp_edge.runtime.link import CLOCK_SAMPLES

    fake = FakeBridge(ctx, GOOD_STATUS, clock_offset=1000.0)
    try:
        fake.link.handshake("sim", 7)
        time.sleep(0.2)  # the subscription takes effect
        for drift in (0.3, -0.2):  # the bridge's clock runs ahead, then behind
            for k in range(CLOCK_SAMPLES + 5):
                send(fake.state, P.RobotState(seq=k, stamp=P.now() + 1000.0 + drift, target=np.zeros(7)))
                assert wait_until(lambda: fake.link.poll()[0] is not None)
            # Never ahead of the bridge's clock (the bridge would refuse the stamps as future), a little behind.
            assert 1000.0 + drift - 0.05 < fake.link.clock_offset <= 1000.0 + drift
    finally:
        fake.close()


class StepPolicy(FakePolicy):
    """Chunks of one constant end-effector step (a delta action) along x."""

    def infer(self, frames, prefix=None, delay_steps=0):
        actions = np.zeros((8, 7), np.float32)
        actions[:, 0] = 0.01
        return Chunk(actions, actions, {"engine_ms": 1.0})


def test_delta_actions_travel_as_absolute_waypoints_and_a_dropped_one_loses_no_motion(sim_bridge, monkeypatch):
    """The bridge owns time (issue 19): targets leave the runtime absolute, stamped with the
    time the bridge reaches them; a third of them lost on the way costs no motion."""
    bridge, driver, link = sim_bridge
    start = driver.setpoint.copy()
    calls = []
    real_send = link.send_waypoints

    def lossy(targets, due, dt):
        calls.append((targets[0].copy(), due))
        return True if len(calls) % 3 == 2 else real_send(targets, due, dt)  # "queued", then lost

    monkeypatch.setattr(link, "send_waypoints", lossy)
    runtime = make_runtime(link, StepPolicy(10**6, RuntimeError()), FakeCamera(), 2.0)
    runtime.run()
    runtime.metrics.close()
    assert len(calls) >= 8, len(calls)
    ticks = np.diff([due for _, due in calls]) / runtime.plan.dt
    assert np.allclose(ticks, np.round(ticks)) and np.all(np.round(ticks) >= 1), \
        "due on the plan's regular grid, whatever the tick's jitter"
    spanned = round((calls[-1][1] - calls[0][1]) / runtime.plan.dt) + 1  # a tick woken too late for is owed
    assert calls[-1][0][0] == pytest.approx(start[0] + 0.01 * spanned), "every step added up"
    arrived = len(calls) - len(calls) // 3 - (len(calls) % 3 == 2)
    assert bridge.counts["rejected"] == 0 and bridge.counts["accepted"] == arrived, dict(bridge.counts)
    assert np.max(np.stack(driver.history)[:, 0]) > start[0] + 0.01 * (len(calls) - 5), \
        "the robot followed the sum, lagging its lead (until the run's closing hold)"


def test_absolute_targets_add_deltas_up_inside_the_workspace_and_restart_where_the_bridge_rests():
    from vpp_edge.runtime.targets import AbsoluteTargets

    targets = AbsoluteTargets(np.array([True, False]), (np.array([-1.0, 0.0]), np.array([0.25, 1.0])))
    assert targets.plan(np.array([[0.1, 0.5]])) is None, "no base before the bridge's state"
    targets.on_state(P.RobotState(seq=1, stamp=1.0, target=np.array([0.0, 0.2])))
    plan = targets.plan(np.array([[0.1, 0.5], [0.1, 0.6], [0.1, 0.7]]))
    assert np.allclose(plan, [[0.1, 0.5], [0.2, 0.6], [0.25, 0.7]]), "a sum beyond the workspace stops at its edge"
    assert np.allclose(targets.base, [0.1, 0.5]), "only this tick's target is committed; the rest is a preview"
    assert np.allclose(targets.plan(np.array([[0.1, 0.5]])), [[0.2, 0.5]])
    targets.on_event(P.Event(seq=2, stamp=5.0, kind="rejected"))
    assert targets.base is not None, "a refused plan leaves the bridge's older one running: the sum goes on"
    targets.on_event(P.Event(seq=3, stamp=5.0, kind="watchdog_hold"))
    targets.on_state(P.RobotState(seq=4, stamp=4.9, target=np.array([-0.5, 0.0])))
    assert targets.base is None, "a state from before the hold does not say where the bridge rests"
    targets.on_state(P.RobotState(seq=5, stamp=5.0, target=np.array([-0.5, 0.0])))
    assert np.allclose(targets.plan(np.array([[0.1, 0.3]])), [[-0.4, 0.3]])


def test_the_preview_obeys_the_gates_limits_without_touching_its_state():
    from vpp_edge.runtime.safety import SafetyGate

    robot = load_robot_config("sim")
    gate = SafetyGate(robot)
    gate.fresh_chunk(0.0)
    first = gate.filter(np.zeros(7), 0.0).action
    ahead = np.array([np.full(7, 10.0), np.full(7, -10.0)])
    preview = gate.preview(ahead)
    assert np.all(preview <= robot.high) and np.all(preview >= robot.low)
    assert np.all(np.abs(np.diff(np.vstack([first, preview]), axis=0)) <= robot.delta + 1e-12)
    assert np.array_equal(gate._last_safe, first) and "clamped_rate" not in gate.counts


def test_actions_of_ticks_woken_too_late_for_are_owed_not_forgotten():
    from vpp_edge.runtime.chunking import ActionPlan

    plan = ActionPlan(0.1, "none")
    actions = np.arange(6, dtype=np.float64).reshape(6, 1)
    plan.add_chunk(actions, obs_stamp=0.0, now=0.0, seq=0)
    assert plan.pop(0.0)[0] == 0 and plan.take_missed().shape == (0, 0)
    assert plan.pop(0.25)[0] == 3, "the thread woke at tick 3"
    assert plan.take_missed()[:, 0].tolist() == [1.0, 2.0], "ticks 1 and 2 are owed, oldest first"
    assert plan.take_missed().shape == (0, 0), "taken once"
