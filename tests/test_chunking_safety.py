"""Latency-aware chunking, smoothing policies, safety gate, watchdog and e-stop latch."""

import numpy as np
import pytest

from vpp_edge.runtime.chunking import ActionPlan
from vpp_edge.runtime.robot_config import ConfigError, load_robot_config, robot_config_from_dict
from vpp_edge.runtime.safety import Mode, SafetyGate

DT = 0.1


def ramp(start, n=10, dim=2):
    return np.stack([np.full(dim, start + i, np.float64) for i in range(n)])


def test_actions_whose_time_passed_are_skipped():
    plan = ActionPlan(DT)
    stats = plan.add_chunk(ramp(0), obs_stamp=10.0, now=10.25, seq=0)
    assert stats.skipped == 3 and stats.used == 7 and stats.latency_s == pytest.approx(0.25)
    assert plan.pop(10.3)[0] == 3, "the action for the current tick, not the first of the chunk"
    assert plan.pop(10.4)[0] == 4
    assert plan.pop(10.65)[0] == 7, "a late tick gets the next tick's action and skips what it missed"
    assert plan.remaining(10.75) == 2
    for t in (10.8, 10.9):
        assert plan.pop(t) is not None
    assert plan.pop(11.0) is None, "an empty plan is starvation"
    assert plan.add_chunk(ramp(0), obs_stamp=5.0, now=20.0, seq=1).used == 0


def test_the_continuation_runs_from_the_executed_actions_into_the_plan():
    """What real-time chunking continues: the last executed actions (the next observation's
    tick is usually among them) and the planned ones after them, without gaps."""
    plan = ActionPlan(DT)
    plan.add_chunk(ramp(0), obs_stamp=10.0, now=10.0, seq=0)  # ticks 100..109 = 0..9
    for t in (10.0, 10.1, 10.2):
        plan.pop(t)
    first, actions = plan.continuation()
    assert first == 100 and actions[:, 0].tolist() == list(range(10)), "3 executed + 7 planned"
    assert plan.snapshot(10.3)[1][0, 0] == 3, "the planned part alone starts after the executed ones"
    plan.pop(10.5)  # ticks 103 and 104 missed: the executed run restarts at 105
    first, actions = plan.continuation()
    assert first == 105 and actions[:, 0].tolist() == list(range(5, 10))


def test_smoothing_policies_on_overlapping_chunks():
    def merged(smoothing, **kw):
        plan = ActionPlan(DT, smoothing=smoothing, **kw)
        plan.add_chunk(np.zeros((10, 1)), obs_stamp=0.0, now=0.0, seq=0)
        plan.add_chunk(np.ones((10, 1)), obs_stamp=0.2, now=0.2, seq=1)
        return [float(plan.pop(round(0.2 + k * DT, 6))[0]) for k in range(10)]

    assert merged("none") == [1.0] * 10
    assert merged("crossfade", crossfade_steps=3) == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 7)
    w = np.exp(-0.5 * np.arange(2))
    expected = (w[1] * 1.0) / w.sum()  # oldest vote (0) weighs most, as in ACT
    out = merged("ensemble", ensemble_m=0.5)
    assert out[:8] == pytest.approx([expected] * 8) and out[8:] == [1.0, 1.0]
    with pytest.raises(ValueError, match="smoothing 'rtc2' unknown"):
        ActionPlan(DT, smoothing="rtc2")


def boundary_jumps(smoothing, chunks=20, seed=0):
    """Chunks that disagree at their boundary (offset noise), replanned every 5 ticks."""
    rng = np.random.default_rng(seed)
    plan = ActionPlan(DT, smoothing=smoothing, crossfade_steps=4)
    t = 0.0
    for k in range(chunks):
        base = np.linspace(t, t + 0.9, 10)[:, None] + rng.normal(0, 0.5)
        plan.add_chunk(base, obs_stamp=t, now=t + 0.1, seq=k)
        for _ in range(5):
            t = round(t + DT, 6)
            plan.pop(t)
    return max(plan.boundary_jumps)


def test_crossfade_and_ensembling_reduce_boundary_jumps():
    none = boundary_jumps("none")
    assert boundary_jumps("crossfade") < 0.6 * none
    assert boundary_jumps("ensemble") < none


def test_jerk_is_the_second_difference_of_the_actions_executed():
    plan = ActionPlan(DT)
    actions = np.array([[0.0], [1.0], [4.0], [9.0], [16.0]])  # second difference 2 throughout
    plan.add_chunk(actions, obs_stamp=0.0, now=0.0, seq=0)
    for k in range(5):
        plan.pop(round(k * DT, 6))
    assert list(plan.jerks) == pytest.approx([2.0, 2.0, 2.0])
    plan.add_chunk(np.full((3, 1), 16.0), obs_stamp=0.5, now=0.5, seq=1)  # the hand stops at 16
    plan.pop(0.5)
    assert plan.jerks[-1] == pytest.approx(abs(16.0 - 2 * 16.0 + 9.0))


def test_inference_is_triggered_before_the_plan_runs_dry():
    plan = ActionPlan(DT)
    for _ in range(5):
        plan.latency.add(0.3)
    plan.add_chunk(ramp(0), obs_stamp=0.0, now=0.0, seq=0)
    assert not plan.needs_inference(0.0)  # 10 left, lead = 3 + 1
    assert plan.needs_inference(0.6)  # 4 left
    assert plan.latency.stats()["p95"] == pytest.approx(0.3)


@pytest.fixture
def gate():
    return SafetyGate(load_robot_config("sim"))


def test_limits_rate_and_invalid_actions(gate):
    cfg = gate.cfg
    gate.fresh_chunk(0.0)
    first = gate.filter(np.full(7, 5.0), 0.01)
    assert np.all(first.action == cfg.high) and first.events == ("clamped_limits",)
    second = gate.filter(np.full(7, -1.0), 0.02)
    assert np.allclose(second.action, cfg.high - cfg.delta) and "clamped_rate" in second.events
    bad = gate.filter(np.array([np.nan] * 7), 0.03)
    assert np.array_equal(bad.action, second.action) and bad.events == ("action_invalid",)
    starving = gate.filter(None, 0.04)
    assert np.array_equal(starving.action, second.action) and starving.events == ("starvation",)
    assert gate.counts["clamped_limits"] == 2 and gate.counts["starvation"] == 1


def test_absolute_dims_start_from_the_robots_target_and_resync_after_a_refusal():
    gate = SafetyGate(load_robot_config("xarm_xhand"))
    cfg = gate.cfg
    gate.absolute = np.arange(18) >= 6  # finger joints are absolute setpoints
    robot = np.zeros(18)
    robot[6:] = 0.1
    gate.robot_target(robot)
    gate.fresh_chunk(0.0)
    wanted = np.concatenate([np.full(6, 0.015), np.full(12, 1.2)])
    first = gate.filter(wanted, 0.01).action
    assert np.allclose(first[:6], 0.015), "delta dimensions are not rate-limited from nothing"
    assert np.allclose(first[6:], 0.1 + cfg.delta[6:]), "fingers ramp from where the hand is"
    gate.resync()
    robot[6:] = 0.5  # the bridge refused; the hand is elsewhere
    gate.robot_target(robot)
    assert np.allclose(gate.filter(wanted, 0.02).action[6:], np.minimum(0.5 + cfg.delta[6:], cfg.high[6:]))
    assert gate.counts["resync"] == 1


@pytest.mark.parametrize("event", ["rejected", "watchdog_hold", "watchdog_stop", "hold", "reset"])
def test_fingers_follow_the_bridge_after_it_moves_its_setpoint(event):
    """A starved runtime makes the bridge hold: its setpoint becomes where the hand is, not
    the runtime's last target. The next finger action must ramp from there, or the bridge
    refuses it as too large a step."""
    gate = SafetyGate(load_robot_config("xarm_xhand"))
    cfg = gate.cfg
    gate.absolute = np.arange(18) >= 6
    gate.fresh_chunk(0.0)
    wanted = np.concatenate([np.zeros(6), cfg.low[6:] + 0.8 * (cfg.high[6:] - cfg.low[6:])])
    assert np.allclose(gate.filter(wanted, 0.01).action, wanted)  # no robot target yet: nothing to ramp from
    robot = np.concatenate([np.zeros(6), cfg.low[6:] + 0.2 * (cfg.high[6:] - cfg.low[6:])])  # the hand lagged
    gate.robot_target(robot)
    assert np.allclose(gate.filter(wanted, 0.02).action, wanted), "without an event: from our last action"
    gate.bridge_event(event)
    after = gate.filter(wanted, 0.03).action
    assert np.all(np.abs(after[6:] - robot[6:]) <= cfg.delta[6:] + 1e-12) and gate.counts["resync"] == 1
    gate.bridge_event("tracking")  # not every event moves the setpoint
    assert gate.counts["resync"] == 1 and not gate.estopped
    gate.bridge_event("estop")
    assert gate.estopped


def test_watchdog_holds_then_stops(gate):
    assert gate.mode(0.0) is Mode.HOLD, "nothing moves before the first chunk"
    gate.fresh_chunk(1.0)
    gate.filter(np.zeros(7), 1.0)
    assert gate.mode(1.4) is Mode.OK
    held = gate.filter(np.full(7, 0.1), 1.0 + gate.cfg.watchdog_hold_s + 0.01)
    assert held.events == ("hold",) and np.array_equal(held.action, np.zeros(7))
    stopped = gate.filter(np.full(7, 0.1), 1.0 + gate.cfg.watchdog_stop_s + 0.01)
    assert stopped.action is None and stopped.events == ("stop",)
    gate.fresh_chunk(5.0)
    assert gate.mode(5.0) is Mode.OK


def test_estop_latches_until_reset(gate):
    gate.fresh_chunk(0.0)
    gate.estop("operator")
    gate.estop("again")
    gate.fresh_chunk(0.1)
    assert gate.mode(0.1) is Mode.ESTOP and gate.filter(np.zeros(7), 0.1).action is None
    assert gate.counts["estop_latched"] == 1
    gate.reset()
    assert gate.mode(0.2) is Mode.HOLD, "after a reset the watchdog waits for a fresh chunk"
    gate.fresh_chunk(0.3)
    assert gate.mode(0.3) is Mode.OK


def test_whole_chunks_are_checked(gate):
    assert gate.check_chunk(np.zeros((10, 7)), 0.0, 0.1) is None
    assert gate.check_chunk(np.zeros((10, 6)), 0.0, 0.1) == "chunk_shape"
    assert gate.check_chunk(np.full((10, 7), np.inf), 0.0, 0.1) == "chunk_nan"
    assert gate.check_chunk(np.zeros((10, 7)), 0.0, 5.0) == "chunk_stale_observation"


def test_robot_configs():
    for name in ("sim", "panda", "xarm_xhand"):
        cfg = load_robot_config(name)
        assert len(cfg.action_low) == cfg.action_dim and cfg.dt > 0
    with pytest.raises(ConfigError, match="did you mean 'panda'"):
        load_robot_config("pandas")
    data = {**load_robot_config("sim").__dict__, "action_low": [0.0] * 7}
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    data["action_high"] = [0.0] * 7
    with pytest.raises(ConfigError, match="action_low < action_high"):
        robot_config_from_dict(data)
    good = {k: list(v) if isinstance(v, tuple) else v for k, v in load_robot_config("sim").__dict__.items()}
    with pytest.raises(ConfigError, match=r"unknown \['control_hertz'\].*did you mean 'control_hz'"):
        robot_config_from_dict({**{k: v for k, v in good.items() if k != "control_hz"}, "control_hertz": 50})
