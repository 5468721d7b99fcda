"""The XBot robot description (vpp_edge/robots/xbot.yaml) against the official numbers it is
derived from, and the state path end to end: on a loopback bridge with the sim driver, the
38-value state the bridge reports reaches the state-taking graph normalised as
step3_deploy_real_xbot.py does, and the chunk's commands are the official
caculate_absolute_action of the prediction and that same state."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

DATA = Path(__file__).with_name("data") / "official_xbot_bounds.yaml"
A = 38


def official():
    data = yaml.safe_load(DATA.read_text())
    return tuple(np.array(data[k], np.float64) for k in ("state_01", "state_99", "action_01", "action_99"))


def official_normalize_bound(data, data_min, data_max, clip_min=-1, clip_max=1, eps=1e-8):
    """step3_deploy_real_xbot.py XbotAgent.normalize_bound, written out here independently."""
    return np.clip(2 * (data - data_min) / (data_max - data_min + eps) - 1, clip_min, clip_max)


def official_denormalize_bound(data, data_min, data_max, clip_min=-1, clip_max=1):
    """step3_deploy_real_xbot.py XbotAgent.denormalize_bound, written out here independently."""
    return (data - clip_min) / (clip_max - clip_min) * (data_max - data_min) + data_min


def test_the_xbot_description_is_derived_from_the_official_bounds():
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.presets import get_preset
    from vpp_edge.robot_description import parse_state_layout
    from vpp_edge.runtime.robot_config import load_robot_config

    s01, s99, a01, a99 = official()
    rt, br = load_robot_config("xbot"), load_bridge_config("xbot")
    preset = get_preset("xbot")
    assert rt.action_dim == br.dim == preset.action_dim == preset.action_head.proprio_dim == A
    assert not any(br.delta_dims), "the official XBot sends commands (prediction + state), never changes"
    assert br.driver_kind == "sim"
    low, high = np.array(rt.action_low), np.array(rt.action_high)
    # Commands are the state plus an action relative to it: the bounds of both, rounded outward to 1e-3.
    assert np.all(low <= s01 + a01) and np.all(low > s01 + a01 - 1e-3)
    assert np.all(high >= s99 + a99) and np.all(high < s99 + a99 + 1e-3)
    span = np.array(rt.max_delta)
    assert np.all(span >= a99 - a01) and np.all(span < a99 - a01 + 1e-3)
    np.testing.assert_array_equal(br.vec("max_step"), span)
    margin = 0.5 * (s99 - s01)  # the state check's tolerance: the bridge holds every pose the policy accepts
    assert np.all(br.vec("setpoint_low") <= low - margin + 1e-12)
    assert np.all(br.vec("setpoint_high") >= high + margin - 1e-12)
    # The layout reads 38 values: arm poses (0:7, 19:26) from ee_pose, hand joints from joints.
    layout = parse_state_layout(list(rt.policy_state))
    picked = np.concatenate([np.arange(A)[part] for _, part in layout])
    np.testing.assert_array_equal(picked, np.arange(A))
    assert [name for name, _ in layout] == ["ee_pose", "joints", "ee_pose", "joints"]
    # The sim starts in the middle of the official state range (zero lies outside it: state_range).
    initial = np.array(br.driver["initial"])
    assert initial.shape == (A,) and np.all((s01 < initial) & (initial < s99))
    np.testing.assert_allclose(initial, (s01 + s99) / 2, atol=5e-4 + 1e-12)


def test_the_sim_driver_starts_at_the_descriptions_initial_pose(tmp_path):
    """driver.initial sets where the sim starts, checked against the robot's dims and bounds (a
    one-line ConfigError); without it the sim starts at zero. XBot's start is a state its
    policy accepts, so the runtime does not refuse it."""
    from vpp_edge.errors import ConfigError
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.firmware_bridge.factory import make_driver
    from vpp_edge.normalization import StateNormalizer

    s01, s99, _, _ = official()
    xbot = load_bridge_config("xbot")
    pose = make_driver(xbot).connect()
    np.testing.assert_array_equal(pose, xbot.driver["initial"])
    StateNormalizer(tuple(s01), tuple(s99)).check(pose)  # raises StateError (range) at zero
    with pytest.raises(Exception, match="range"):
        StateNormalizer(tuple(s01), tuple(s99)).check(np.zeros(A))
    np.testing.assert_array_equal(make_driver(load_bridge_config("sim")).connect(), np.zeros(7))
    bad = {"short": ({"initial": [0.5] * (A - 1)}, f"driver.initial has {A - 1} values, dim is {A}"),
           "outside": ({"initial": [1e3] * A}, "inside [setpoint_low, setpoint_high] at [0, 1,"),
           "nan": ({"initial": [float("nan")] * A}, "not finite"),
           "typo": ({"inital": [0.5] * A}, "unknown to the sim driver")}
    for name, (settings, message) in bad.items():
        cfg = replace(xbot, driver=settings)
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            make_driver(cfg)
        assert "\n" not in str(info.value), name


def action_bounds():
    """The official action bounds scaled by 1/50: random weights predict anywhere in them at every
    chunk, and with the whole span the sim robot would wander out of the state range within a few
    chunks (refused, rightly: state_range), where a trained policy stays."""
    _, _, a01, a99 = official()
    return a01 / 50, a99 / 50


@pytest.fixture(scope="module")
def xbot_like_artifact(tiny_preset, tmp_path_factory):
    """Tiny widths with the xbot preset's action and state interface (8 x 38 actions relative to
    the state, 38 state values), the official state bounds and :func:`action_bounds`."""
    import torch

    from vpp_edge.normalization import ActionNormalizer, StateNormalizer
    from vpp_edge.training.models import build_policy

    from .conftest import export_fp32

    s01, s99, _, _ = official()
    a01, a99 = action_bounds()
    preset = tiny_preset.replace(name="tiny_xbot", action_dim=A, action_horizon=8, action_base="state",
                                 action_head={"use_proprio": True, "proprio_dim": A})
    policy, tok = build_policy(preset, seed=0, normalizer=ActionNormalizer("bounds", tuple(a01), tuple(a99)))
    policy.set_state_normalizer(StateNormalizer(tuple(s01), tuple(s99)))
    with torch.no_grad():  # the state must visibly move the actions (see test_proprio_state.py)
        for p in policy.action_head.inner_model.proprio_emb.parameters():
            p.mul_(50)
    return export_fp32((policy, tok), tmp_path_factory.mktemp("artifacts") / "tiny_xbot")


@pytest.mark.slow
def test_the_bridge_state_reaches_the_policy_with_the_official_normalisation(xbot_like_artifact, demo_episode,
                                                                             tmp_path, monkeypatch):
    import zmq

    from vpp_edge.firmware_bridge.bridge import loopback_bridge
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.runtime import policy as runtime_policy
    from vpp_edge.runtime.engines.onnxruntime import OrtEngine

    from .conftest import closed_loop

    s01, s99, _, _ = official()
    a01, a99 = action_bounds()
    seen = []  # (raw state given to RuntimePolicy.infer, state feed of the graph, normalised chunk, commands)
    feeds = []

    class RecordingEngine(OrtEngine):
        def run(self, graph, graph_feeds):
            if "state" in graph_feeds:
                feeds.append(np.array(graph_feeds["state"]))
            return super().run(graph, graph_feeds)

    infer = runtime_policy.RuntimePolicy.infer

    def recording_infer(self, frames, *args, state=None, **kwargs):
        before = len(feeds)
        chunk = infer(self, frames, *args, state=state, **kwargs)
        seen.append((np.array(state), feeds[before:], chunk.normalized, chunk.actions))
        return chunk

    monkeypatch.setattr(runtime_policy.RuntimePolicy, "infer", recording_infer)
    # `vpp bridge --robot xbot`'s bridge: the description's sim driver, started at its driver.initial.
    cfg = load_bridge_config("xbot")
    start = np.array(cfg.driver["initial"])
    ctx = zmq.Context()
    bridge = loopback_bridge(cfg, ctx)[0].start()
    driver = bridge.driver
    try:
        runtime, metrics, link = closed_loop(xbot_like_artifact, "xbot", bridge, demo_episode, ctx, tmp_path,
                                             engine_cls=RecordingEngine)
        try:
            counts = runtime.run()["counts"]
        finally:
            metrics.close()
            link.close()
        accepted = bridge.counts["accepted"]
        measured = np.array([start, *driver.history])  # every pose the sim was at, so every state it reported
    finally:
        bridge.close()
        ctx.destroy(linger=0)

    assert len(seen) >= 3 and counts["chunks"] >= 3 and accepted >= 5, (counts, accepted)
    # Chunks, not state refusals: refused only while the bridge's first reply is missing or late
    # (loaded machine), as in test_proprio_state; never for the state's range.
    assert counts.get("state_range", 0) == 0, counts
    assert counts.get("state_refused", 0) == counts.get("state_missing", 0) + counts.get("state_stale", 0), counts
    moved = 0
    for state, graph_feeds, normalized, commands in seen:
        # The state is one the bridge reported (the sim's pose at that moment, in the commands' order) ...
        assert state.shape == (A,) and np.abs(measured - state).max(axis=1).min() < 1e-9
        moved += np.abs(state - start).max() > 1e-6
        # ... normalised as the official normalize_bound (one feed per state-taking graph run) ...
        assert graph_feeds and all(f.shape == (1, A) for f in graph_feeds)
        for feed in graph_feeds:
            np.testing.assert_allclose(feed[0], official_normalize_bound(state, s01, s99), atol=1e-6)
        # ... and the chunk is caculate_absolute_action(prediction, that state).
        np.testing.assert_allclose(commands, official_denormalize_bound(normalized, a01, a99) + state, atol=1e-5)
    assert moved >= 1, "the state follows the robot: later inferences see the poses the commands moved it to"
