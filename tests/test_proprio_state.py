"""The robot state as the official real-robot policy takes it (VPP_policy_xbot.py: state_obs,
bound-normalised with the config's state_01/state_99 as step3_deploy_real_xbot.py does) flows
through PyTorch, the exported graphs and the runtime with the same actions; a policy
without state input is untouched and refuses one."""

import numpy as np
import pytest
import torch

from vpp_edge.normalization import StateError, StateNormalizer
from vpp_edge.runtime.artifact import Artifact
from vpp_edge.runtime.engines import create_engine
from vpp_edge.runtime.policy import RuntimePolicy
from vpp_edge.training.checkpoints import load_checkpoint, save_checkpoint
from vpp_edge.training.predict import TorchPredictor

pytestmark = pytest.mark.slow

DIM = 6
BOUNDS = StateNormalizer(low=(0.2, -0.5, 0.1, -1.0, 0.0, 0.0), high=(0.6, 0.2, 0.5, 1.0, 1.6, 1.9))
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
    from vpp_edge.export import artifact as art

    policy, tok = state_policy
    out = tmp_path_factory.mktemp("artifacts") / "tiny_state"
    art.export_artifact(policy, tok, out, art.load_options(precisions=["fp32"], parity_samples=1),
                        source="test", progress=False)
    return out


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
    (np.r_[0.4, 0.0, 0.3, 0.0, 0.8, 10.0], "range"), (np.ones((1, DIM)), "shape")])
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
