"""The robot state as the official real-robot policy takes it (VPP_policy_xbot.py: state_obs,
bound-normalised with the config's state_01/state_99 as step3_deploy_real_xbot.py does) flows
through PyTorch, the exported graphs and the runtime with the same actions; a policy
without state input is untouched and refuses one."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from vpp_edge.normalization import StateError, StateNormalizer
from vpp_edge.runtime.artifact import Artifact
from vpp_edge.runtime.engines import create_engine
from vpp_edge.runtime.policy import RuntimePolicy
from vpp_edge.training.checkpoints import load_checkpoint, save_checkpoint
from vpp_edge.training.predict import TorchPredictor

from .conftest import export_fp32

pytestmark = pytest.mark.slow

DIM = 7  # the sim robot's end-effector pose (xyz, rpy, gripper): what the closed-loop test feeds
# The sim bridge's setpoint bounds (vpp_edge/robots/sim.yaml): wherever a random policy drives
# the sim robot, its state stays inside them.
BOUNDS = StateNormalizer(low=(-1.0, -1.0, -1.0, -3.2, -3.2, -3.2, 0.0), high=(1.0, 1.0, 1.0, 3.2, 3.2, 3.2, 1.0))
INSTRUCTION = "pick up the mouse"


def official_normalize_bound(data, data_min, data_max, clip_min=-1, clip_max=1, eps=1e-8):
    """step3_deploy_real_xbot.py XbotAgent.normalize_bound, written out here independently."""
    ndata = 2 * (data - data_min) / (data_max - data_min + eps) - 1
    return np.clip(ndata, clip_min, clip_max)


@pytest.fixture(scope="module")
def state_policy(tiny_preset):
    from vpp_edge.training.models import build_policy

    preset = tiny_preset.replace(name="tiny_state", action_head={"use_proprio": True, "proprio_dim": DIM})
    policy, tok = build_policy(preset, seed=0)
    policy.set_state_normalizer(BOUNDS)
    # A random proprio_emb at init std 0.02 barely moves the context; scale it so that the
    # state visibly changes the actions (trained weights do, the test must see the path).
    with torch.no_grad():
        for p in policy.action_head.inner_model.proprio_emb.parameters():
            p.mul_(50)
    return policy, tok


@pytest.fixture(scope="module")
def state_artifact(state_policy, tmp_path_factory):
    return export_fp32(state_policy, tmp_path_factory.mktemp("artifacts") / "tiny_state")


def frames_of(preset, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (preset.num_views, preset.image_size, preset.image_size, 3),
                                                dtype=np.uint8)


def test_state_normalisation_is_the_official_normalize_bound():
    low, high = np.array(BOUNDS.low), np.array(BOUNDS.high)
    for s in (low, high, (low + high) / 2, low - 0.1 * (high - low), high + 0.3 * (high - low)):
        np.testing.assert_allclose(BOUNDS.normalize(s), official_normalize_bound(s, low, high), atol=1e-6)
    assert StateNormalizer.from_dict(BOUNDS.to_dict()) == BOUNDS and StateNormalizer.from_dict(None) is None


@pytest.mark.parametrize("state, reason", [
    (np.zeros(DIM + 1), "shape"), (np.full(DIM, np.nan), "nonfinite"), (np.r_[np.zeros(DIM - 1), np.inf], "nonfinite"),
    (np.r_[0.4, 0.0, 0.3, 0.0, 0.8, 0.0, 10.0], "range"), (np.ones((1, DIM)), "shape")])
def test_bad_states_are_refused_with_their_reason(state, reason):
    with pytest.raises(StateError, match=f"^{reason}:"):
        BOUNDS.normalize(state)


def test_exported_state_graphs_give_the_pytorch_actions_and_the_state_matters(state_policy, state_artifact):
    policy, tok = state_policy
    artifact = Artifact.open(state_artifact)
    manifest = artifact.manifest
    assert artifact.state_normalizer == BOUNDS and manifest["state_normalization"] == BOUNDS.to_dict()
    state_spec = {"name": "state", "shape": [1, DIM], "dtype": "float32"}
    for graph in ("action_sampler", "action_context"):
        assert manifest["graphs"][f"fp32/{graph}"]["inputs"][-1] == state_spec
    for graph in ("text", "tvp", "former", "action_step"):
        assert "state" not in {s["name"] for s in manifest["graphs"][f"fp32/{graph}"]["inputs"]}

    frames = frames_of(policy.preset, 1)
    noise = policy.make_noise(1, 7)
    torch_pred = TorchPredictor(policy, tok)
    low, high = np.array(BOUNDS.low), np.array(BOUNDS.high)
    states = [low + 0.3 * (high - low), low + 0.8 * (high - low)]
    with create_engine(artifact, "onnxruntime") as engine:
        runtime = RuntimePolicy(artifact, engine)
        runtime.set_instruction(INSTRUCTION)
        chunks = []
        for state in states:
            ref = torch_pred.predict(frames, INSTRUCTION, seed=7, state=state).actions
            for mode in ("sampler", "step"):
                runtime.artifact.manifest["action_mode"] = mode
                got = runtime.infer(frames, noise.tvp.numpy(), noise.action.numpy(), state=state).actions
                assert np.abs(got - ref).max() < 1e-4, mode
            with torch.no_grad():  # the official path: normalize_bound, then state_obs into the encoder
                norm = torch.from_numpy(official_normalize_bound(state, low, high)).float()[None]
                ids, mask = (torch.from_numpy(a) for a in tok([INSTRUCTION]))
                x = torch.from_numpy(frames)[None].permute(0, 1, 4, 2, 3).float() * (2 / 255) - 1
                official = policy(x, ids, mask, noise.tvp, noise.action, norm)[0].numpy()
            assert np.abs(official - ref).max() < 1e-4
            chunks.append(got)
        assert np.abs(chunks[0] - chunks[1]).max() > 1e-3, "a different state gives different actions"
        with pytest.raises(StateError, match="^missing:"):
            runtime.infer(frames)
        with pytest.raises(StateError, match="^range:"):
            runtime.infer(frames, state=high + 2 * (high - low))


def test_checkpoint_keeps_the_state_bounds_and_a_policy_without_state_refuses_one(state_policy, tiny_policy,
                                                                                  tmp_path):
    policy, tok = state_policy
    loaded, _ = load_checkpoint(save_checkpoint(policy, tok, tmp_path / "ck"))
    assert loaded.state_normalizer == BOUNDS and loaded.preset.action_head.use_proprio
    plain, plain_tok = tiny_policy
    assert plain.state_normalizer is None and not plain.preset.action_head.use_proprio
    with pytest.raises(ValueError, match="takes no robot state"):
        TorchPredictor(plain, plain_tok).predict(frames_of(plain.preset), INSTRUCTION, state=np.zeros(DIM))
    with pytest.raises(ValueError, match="takes no robot state"):
        plain.set_state_normalizer(BOUNDS)
    with pytest.raises(ValueError, match="state statistics have 3 dims"):
        policy.set_state_normalizer(StateNormalizer(low=(0,) * 3, high=(1,) * 3))


def sim_robot(tmp_path, policy_state):
    """The sim robot's description with ``runtime.policy_state`` (None: left out)."""
    import yaml

    from vpp_edge.robot_description import ROBOTS_DIR

    data = yaml.safe_load((ROBOTS_DIR / "sim.yaml").read_text())
    if policy_state is not None:
        data["runtime"]["policy_state"] = policy_state
    path = tmp_path / f"sim_state_{len(list(tmp_path.glob('sim_state_*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_the_runtime_feeds_the_bridge_state_and_refuses_a_misfit_one(state_artifact, demo_episode, tmp_path):
    """Closed loop on the sim bridge: the state comes from the bridge's state reply at the
    robot's policy_state; a layout of the wrong width is refused at every inference (counted,
    no chunk, nothing sent), and a robot that names no state is refused before it starts."""
    import zmq

    from vpp_edge.firmware_bridge.bridge import Bridge, Endpoints
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.firmware_bridge.driver import KinematicSimDriver
    from vpp_edge.robot_description import parse_state_layout

    from .conftest import closed_loop

    with pytest.raises(ValueError, match="is not one of joints, ee_pose, target"):
        parse_state_layout(["pose"])
    ctx = zmq.Context()
    any_port = "tcp://127.0.0.1:*"
    bridge = Bridge(KinematicSimDriver(7), load_bridge_config("sim"), Endpoints(*[any_port] * 4), ctx).start()
    try:
        with pytest.raises(ValueError, match="names none: set runtime.policy_state"):
            closed_loop(state_artifact, sim_robot(tmp_path, None), bridge, demo_episode, ctx, tmp_path)
        summaries = {}
        for name, layout in (("fit", ["ee_pose"]), ("misfit", ["ee_pose[0:3]"])):
            accepted = bridge.counts["accepted"]
            runtime, metrics, link = closed_loop(state_artifact, sim_robot(tmp_path, layout), bridge, demo_episode,
                                                 ctx, tmp_path)
            try:
                summaries[name] = runtime.run()["counts"], bridge.counts["accepted"] - accepted
            finally:
                metrics.close()
                link.close()
    finally:
        bridge.close()
        ctx.destroy(linger=0)
    (fit, fit_sent), (misfit, misfit_sent) = summaries["fit"], summaries["misfit"]
    # Before the bridge's first state reply arrives (or, on a loaded machine, while it is late)
    # an inference is refused as missing / stale: the robot waits. Nothing else is refused.
    assert fit["chunks"] >= 3 and fit_sent >= 5, fit
    refused = {k: v for k, v in fit.items() if k.startswith("state_")}
    assert fit.get("state_refused", 0) == fit.get("state_missing", 0) + fit.get("state_stale", 0), refused
    assert misfit.get("chunks", 0) == 0 and misfit_sent == 0, misfit
    assert misfit["state_refused"] == misfit["state_shape"] >= 3, misfit


def test_vpp_predict_takes_the_state_and_its_bounds(tiny_preset, demo_episode, tmp_path, capsys):
    """vpp predict: --normalization carries the state bounds ('state': {low, high}), --state the
    raw state; another state, other actions; a misfit state or one for a stateless preset is refused."""
    import json

    import yaml

    from vpp_edge.cli import main

    preset = tmp_path / "tiny_state.yaml"
    preset.write_text(yaml.safe_dump(tiny_preset.replace(
        name="tiny_state", action_head={"use_proprio": True, "proprio_dim": 3}).to_dict()))
    norm = tmp_path / "norm.json"
    norm.write_text(json.dumps({"mode": "identity", "state": {"low": [0, 0, 0], "high": [1, 2, 3]}}))
    common = ["predict", "--preset", str(preset), "--normalization", str(norm), "--episode", str(demo_episode),
              "--repeat", "1"]
    reports = []
    for k, state in enumerate((["0.1", "0.5", "2.9"], ["0.9", "1.5", "0.1"])):
        out = tmp_path / f"r{k}.json"
        assert main([*common, "--state", *state, "--json", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["state"] == [0.1, 0.5, 2.9]
    assert reports[0]["actions"] != reports[1]["actions"], "the state reaches the actions"
    capsys.readouterr()
    assert main([*common, "--state", "0.1", "0.5"]) != 0
    assert "robot state refused: shape" in capsys.readouterr().err
    assert main(["predict", "--episode", str(demo_episode), "--repeat", "1", "--state", "0.1"]) != 0
    assert "takes no robot state" in capsys.readouterr().err


# ---- actions relative to the state (official XBot: action_base 'state') ------------------

def official_denormalize_bound(data, data_min, data_max, clip_min=-1, clip_max=1):
    """step3_deploy_real_xbot.py XbotAgent.denormalize_bound, written out here independently."""
    return (data - clip_min) / (clip_max - clip_min) * (data_max - data_min) + data_min


def official_absolute_action(prediction, state, a_min, a_max):
    """step3_deploy_real_xbot.py caculate_absolute_action: de-normalise, then add the raw state."""
    return official_denormalize_bound(prediction, a_min, a_max) + state


# Action bounds of XBot's kind (action_01 / action_99 of relative actions: around zero, uneven).
A_MIN = np.array([-0.14, -0.15, -0.10, -0.19, -0.23, -0.18, -0.09])
A_MAX = np.array([0.16, 0.18, 0.16, 0.15, 0.24, 0.18, 0.13])


@pytest.fixture(scope="module")
def relative_policy(state_policy, tiny_preset):
    """The state policy's weights under a preset whose actions are relative to the state, with bounds."""
    from vpp_edge.normalization import ActionNormalizer
    from vpp_edge.training.models.policy import VPPPolicy

    policy, tok = state_policy
    preset = policy.preset.replace(name="tiny_relative", action_base="state")
    rel = VPPPolicy(preset, policy.text_encoder, policy.tvp,
                    ActionNormalizer(mode="bounds", low=tuple(A_MIN), high=tuple(A_MAX)), BOUNDS)
    rel.load_state_dict(policy.state_dict())
    return rel.eval(), tok


@pytest.fixture(scope="module")
def relative_artifact(relative_policy, tmp_path_factory):
    return export_fp32(relative_policy, tmp_path_factory.mktemp("artifacts") / "tiny_relative")


def test_the_xbot_preset_sends_actions_relative_to_the_state():
    from vpp_edge.errors import PresetError
    from vpp_edge.normalization import from_commands, to_commands
    from vpp_edge.presets import get_preset

    assert get_preset("xbot").action_base == "state"
    assert {get_preset(n).action_base for n in ("calvin", "xhand", "metaworld", "panda", "tiny")} == {"none"}
    actions, state = np.arange(6.0).reshape(2, 3), np.array([10.0, 20.0, 30.0, 99.0])
    # The first A state values (the official action_base = state[:, :a_dim]), added to every row.
    np.testing.assert_array_equal(to_commands(actions, "state", state), actions + [10, 20, 30])
    np.testing.assert_array_equal(from_commands(to_commands(actions, "state", state), "state", state), actions)
    np.testing.assert_array_equal(to_commands(actions, "none", None), actions)
    with pytest.raises(StateError, match="^missing:"):
        to_commands(actions, "state", None)
    with pytest.raises(StateError, match="^shape:"):
        to_commands(actions, "state", state[:2])
    tiny = get_preset("tiny")
    with pytest.raises(PresetError, match="action_base 'state' .* needs action_head.use_proprio"):
        tiny.replace(action_base="state")
    with pytest.raises(PresetError, match="proprio_dim >= action_dim"):
        tiny.replace(action_base="state", action_head={"use_proprio": True, "proprio_dim": 3})
    with pytest.raises(PresetError, match="action_base 'joints' unknown"):
        tiny.replace(action_base="joints")


def test_relative_actions_are_the_official_commands_on_pytorch_graphs_and_runtime(relative_policy,
                                                                                  relative_artifact):
    """PyTorch (vpp predict's path), the exported graphs through the runtime, and the official
    rule computed here from the normalised prediction: the same commands; the runtime's
    real-time-chunking prefix (commands) goes back relative to the same state."""
    policy, tok = relative_policy
    artifact = Artifact.open(relative_artifact)
    assert artifact.manifest["preset"]["action_base"] == "state" and artifact.preset.action_base == "state"
    frames, noise = frames_of(policy.preset, 2), policy.make_noise(1, 3)
    low, high = np.array(BOUNDS.low), np.array(BOUNDS.high)
    state = low + 0.7 * (high - low)
    with torch.no_grad():  # the official path: normalised prediction, then caculate_absolute_action
        ids, mask = (torch.from_numpy(a) for a in tok([INSTRUCTION]))
        x = torch.from_numpy(frames)[None].permute(0, 1, 4, 2, 3).float() * (2 / 255) - 1
        condition, goal = policy.encode_text(ids, mask)
        tokens = policy.former(policy.predictive_features(x, condition, noise.tvp))
        norm_state = torch.from_numpy(official_normalize_bound(state, low, high)).float()[None]
        prediction = policy.sample_actions(tokens, goal, noise.action, norm_state)[0].double().numpy()
    official = official_absolute_action(prediction, state[None], A_MIN[None], A_MAX[None])
    assert np.abs(official - official_denormalize_bound(prediction, A_MIN, A_MAX)).min() > 0.1, "the state is added"

    torch_actions = TorchPredictor(policy, tok).predict(frames, INSTRUCTION, seed=3, state=state).actions
    assert np.abs(torch_actions - official).max() < 1e-4
    with create_engine(artifact, "onnxruntime") as engine:
        runtime = RuntimePolicy(artifact, engine)
        runtime.set_instruction(INSTRUCTION)
        for mode in ("sampler", "step"):
            runtime.artifact.manifest["action_mode"] = mode
            chunk = runtime.infer(frames, noise.tvp.numpy(), noise.action.numpy(), state=state)
            assert np.abs(chunk.actions - official).max() < 1e-4, mode
            np.testing.assert_allclose(chunk.normalized, prediction, atol=1e-4)
        # Commands the robot still executes, held firmly: the new chunk starts with them exactly,
        # which it does only if they were taken relative to this state before inpainting.
        prefix = official[:3] + 0.01
        held = runtime.infer(frames, noise.tvp.numpy(), noise.action.numpy(), prefix=prefix, delay_steps=3,
                             state=state).actions
        np.testing.assert_allclose(held[:3], prefix, atol=1e-4)
        with pytest.raises(StateError, match="^missing:"):
            runtime.infer(frames)


def test_the_embedding_api_takes_the_state_and_sends_the_official_commands(relative_policy, relative_artifact):
    """vpp_edge.api.Policy.act(frames, state=...): the runtime's commands for that state."""
    from vpp_edge.api import Policy

    policy, _ = relative_policy
    frames = frames_of(policy.preset, 4)
    low, high = np.array(BOUNDS.low), np.array(BOUNDS.high)
    state = low + 0.2 * (high - low)
    artifact = Artifact.open(relative_artifact)
    with create_engine(artifact, "onnxruntime") as engine:
        runtime = RuntimePolicy(artifact, engine, seed=5)
        runtime.set_instruction(INSTRUCTION)
        expected = runtime.infer(frames, state=state).actions
    with Policy.load(relative_artifact, backend="onnxruntime", seed=5, instruction=INSTRUCTION) as api:
        assert np.array_equal(api.act(list(frames), stamp=0.0, state=state).actions, expected)
        with pytest.raises(StateError, match="^missing:"):
            api.act(list(frames))


def test_the_openvino_int8_path_calibrates_and_gates_on_the_recorded_states(relative_artifact, tmp_path):
    """export/openvino_int8.py (int8_ov's NNCF calibration and gate, cpu_default timing; torch-free)
    feeds a state-taking artifact each observation's recorded state, normalised with the
    artifact's bounds as the official normalize_bound, by the rule vpp export follows
    (vpp_edge/state_feeds.py); seeded states only where the data records none of the policy's width."""
    from vpp_edge.demo_data import write_demo_dataset
    from vpp_edge.episodes import write_episode
    from vpp_edge.export import openvino_int8 as ov
    from vpp_edge.graph_spec import STATE_INPUT
    from vpp_edge.normalization import seeded_state
    from vpp_edge.observations import Observation, sample_observations

    artifact = Artifact.open(relative_artifact)
    p = artifact.preset
    # An episode that records the sim robot's 7-value pose at every frame, inside the artifact's bounds.
    steps = 8
    rng = np.random.default_rng(3)
    low, high = np.array(BOUNDS.low), np.array(BOUNDS.high)
    poses = low + (high - low) * rng.uniform(0.05, 0.95, (steps, DIM))
    views = [rng.integers(0, 256, (steps, p.image_size, p.image_size, 3), dtype=np.uint8) for _ in range(p.num_views)]
    write_episode(tmp_path / "datasets" / "poses", 0, INSTRUCTION, views, poses, np.zeros((steps, DIM)), 10)
    obs = sample_observations(p.num_views, p.image_size, 3, roots=[tmp_path / "datasets"])

    states, note = ov.observation_states(artifact, obs, ov.CALIBRATION_SEED, "calibration observations")
    assert "recorded robot states (7 values)" in note
    frames = [int(o.source.rsplit("#", 1)[1]) for o in obs]
    for state, frame in zip(states, frames):
        assert state.shape == (1, DIM)
        np.testing.assert_allclose(state[0], official_normalize_bound(poses[frame], low, high), atol=1e-6)
    assert len({s.tobytes() for s in states}) == 3
    # The same states without torch: int8_ov runs torch-free, and so does the rule it shares.
    code = f"""
import sys
from pathlib import Path
from vpp_edge.export import openvino_int8 as ov
from vpp_edge.observations import sample_observations
from vpp_edge.runtime.artifact import Artifact
obs = sample_observations({p.num_views}, {p.image_size}, 3, roots=[Path({str(tmp_path / "datasets")!r})])
states, _ = ov.observation_states(Artifact.open({str(relative_artifact)!r}), obs, 100, "calibration observations")
print("TORCH", "torch" in sys.modules, b"".join(s.tobytes() for s in states).hex())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"TORCH False {b''.join(s.tobytes() for s in states).hex()}" in out.stdout

    with create_engine(artifact, "onnxruntime") as engine:
        # NNCF's calibration feeds: every state-taking graph gets exactly its observation's state.
        feeds = ov.record_feeds(engine.run, artifact, obs, states)
        fed = [f[STATE_INPUT] for graph in feeds.values() for f in graph if STATE_INPUT in f]
        assert fed and {f.tobytes() for f in fed} == {s.tobytes() for s in states}
        # The gate's chunks: the same noise seed and state give the same chunk, another state another one.
        chunks = [np.array(ov.chain(engine.run, artifact, obs[0], 1, s)) for s in (states[0], states[0], states[1])]
    assert chunks[0].shape == (1, p.action_horizon, p.action_dim)
    assert np.array_equal(chunks[0], chunks[1]) and not np.array_equal(chunks[0], chunks[2])

    # Seeded only where the data records no state of the policy's width, and the note says why.
    write_demo_dataset(tmp_path / "demo" / "demo", steps=8, size=p.image_size)  # records 4-value states
    demo = sample_observations(p.num_views, p.image_size, 2, roots=[tmp_path / "demo"])
    states, note = ov.observation_states(artifact, demo, ov.PARITY_SEED, "parity observations")
    assert "seeded" in note and "records 4-value states, the policy takes 7" in note
    assert all(np.array_equal(s, seeded_state(DIM, ov.PARITY_SEED + k)) for k, s in enumerate(states))
    unrecorded = [Observation(frames_of(p, 5), INSTRUCTION, "test#0")]
    states, note = ov.observation_states(artifact, unrecorded, 7, "parity observations")
    assert "records no robot state" in note and np.array_equal(states[0], seeded_state(DIM, 7))
