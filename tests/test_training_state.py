"""Stage 2 with the robot state (vpp train policy, a preset with action_head.use_proprio and
action_base 'state', as the official XBot): the recorded state reaches the action head,
normalised as xbot_dataset.py does, the targets are the chunks relative to it, the state
bounds travel in the checkpoint, and the trained policy's actions depend on the state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vpp_edge.errors import DataError

from .test_training import policy_config
from .test_training_fakedata import make_frames, write_official

pytestmark = pytest.mark.slow

DIM, STEPS, HORIZON = 7, 16, 10
STATE_PRESET = {"image_size": 64, "action_dim": DIM, "action_base": "state",
                "action_head": {"use_proprio": True, "proprio_dim": DIM}}


def official_normalize_bound(data, data_min, data_max, clip_min=-1, clip_max=1, eps=1e-8):
    """xbot_dataset.py Dataset_xbot.normalize_bound, written out here independently."""
    return np.clip(2 * (data - data_min) / (data_max - data_min + eps) - 1, clip_min, clip_max)


@pytest.fixture(scope="module")
def state_dataset(tmp_path_factory) -> Path:
    """Four official-format episodes whose 7-value states follow the commands (the robot
    reaches each command one step later), as a real robot's recording."""
    root = tmp_path_factory.mktemp("state_episodes")
    for k, path in enumerate(write_official(root, episodes=4, steps=STEPS, dim=DIM)):
        ann = json.loads(path.read_text())
        t = np.arange(STEPS)[:, None]
        states = 0.2 * k + np.sin(0.3 * t + np.arange(DIM)) * (1 + np.arange(DIM)) / DIM
        commands = np.concatenate([states[1:], states[-1:] + 0.01])
        ann["states"], ann["actions"] = states.tolist(), commands.tolist()
        path.write_text(json.dumps(ann))
    return root


def read_episodes(root: Path):
    out = []
    for path in sorted((root / "annotation" / "val").glob("*.json"), key=lambda p: int(p.stem)):
        ann = json.loads(path.read_text())
        out.append((np.array(ann["states"]), np.array(ann["actions"])))
    return out


def test_the_dataset_feeds_the_official_state_and_relative_targets(state_dataset):
    """PolicyDataset items against xbot_dataset.py's process_action_xhand written out here:
    actions = command[t + k] - state[t][:A], then both bound-normalised."""
    from vpp_edge.training.data import PolicyDataset, load_sources
    from vpp_edge.training.data.sources import SourceConfig
    from vpp_edge.training.data.stats import fit_statistics, state_normalizer
    from vpp_edge.training.models import build_policy
    from vpp_edge.normalization import ActionNormalizer
    from vpp_edge.presets import get_preset

    episodes = load_sources([SourceConfig(format="official", path=str(state_dataset))], 2, DIM, progress=False)
    stats = fit_statistics(episodes, "bounds", 0.01, "state", HORIZON, 1)
    raw = read_episodes(state_dataset)
    all_states = np.concatenate([s for s, _ in raw])
    s01, s99 = np.quantile(all_states, 0.01, axis=0), np.quantile(all_states, 0.99, axis=0)
    rows = lambda t: np.minimum(t + np.arange(HORIZON), STEPS - 1)  # noqa: E731 - the official clamp
    relative = np.concatenate([c[rows(t)] - s[t] for s, c in raw for t in range(STEPS)])
    a01, a99 = np.quantile(relative, 0.01, axis=0), np.quantile(relative, 0.99, axis=0)
    np.testing.assert_allclose(stats["states"]["low"], s01)
    np.testing.assert_allclose(stats["states"]["high"], s99)
    norm = ActionNormalizer.from_dict(stats["actions"])
    np.testing.assert_allclose(norm.low, a01, atol=1e-6)
    np.testing.assert_allclose(norm.high, a99, atol=1e-6)

    _, tok = build_policy(get_preset("tiny"), seed=0)
    ds = PolicyDataset(episodes, 2, 64, HORIZON, norm, tok, state_normalizer=state_normalizer(stats, DIM, "t"),
                       action_base="state")
    assert len(ds) == 4 * STEPS
    for i in (0, 5, STEPS + 3, 3 * STEPS + STEPS - 1):
        states, commands = raw[i // STEPS]
        t = i % STEPS
        item = ds[i]
        np.testing.assert_allclose(item["state"].numpy(), official_normalize_bound(states[t], s01, s99), atol=1e-6)
        expected = official_normalize_bound(commands[rows(t)] - states[t], a01, a99, clip_min=-10, clip_max=10)
        np.testing.assert_allclose(item["actions"].numpy(), expected, atol=1e-5)
    with pytest.raises(DataError, match="takes a robot state of 5 values; the training episodes record 7"):
        state_normalizer(stats, 5, "t")


def test_stage2_trains_a_state_taking_policy_on_the_recorded_states(state_dataset, tmp_path):
    from vpp_edge.training.checkpoints import load_checkpoint
    from vpp_edge.training.models import build_policy
    from vpp_edge.training.predict import TorchPredictor
    from vpp_edge.training.train import stage2, train_policy
    from vpp_edge.training.train.state import LAST

    fed = []  # what reached the state projection at every training forward pass
    original = stage2.PolicyHead.forward

    def recording_forward(self, features, goal, actions, noise, sigma, state=None):
        fed.append(None if state is None else state.detach().clone())
        return original(self, features, goal, actions, noise, sigma, state)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage2.PolicyHead, "forward", recording_forward)
        summary = train_policy(policy_config(state_dataset, steps=6, val_every=100, checkpoint_every=6,
                                             preset_overrides=STATE_PRESET), tmp_path / "run", progress=False)
    assert summary["steps"] == 6 and np.isfinite(summary["loss_last"])
    raw = read_episodes(state_dataset)
    train_states = np.concatenate([s for s, _ in raw[:3]])  # val_fraction 0.25: the last episode is held out
    s01, s99 = np.quantile(train_states, 0.01, axis=0), np.quantile(train_states, 0.99, axis=0)
    normalised = official_normalize_bound(train_states, s01, s99)
    assert len(fed) == 6 and all(f is not None and f.shape == (8, DIM) for f in fed)
    for batch in fed:  # every state fed is a recorded one, normalised as the official dataset does
        assert all(np.abs(normalised - row).max(axis=1).min() < 1e-5 for row in batch.numpy())

    policy, tok = load_checkpoint(tmp_path / "run" / LAST)
    assert policy.preset.action_head.use_proprio and policy.preset.action_base == "state"
    np.testing.assert_allclose(policy.state_normalizer.low, s01)
    np.testing.assert_allclose(policy.state_normalizer.high, s99)
    init = build_policy(policy.preset, seed=0)[0].state_dict()
    trained = policy.state_dict()
    # proprio_emb stays at its initialisation, as VPP_policy_xbot.py freezes it; the encoder learns to read it.
    for key in (k for k in init if "proprio_emb" in k):
        assert torch.equal(trained[key], init[key]), key
    assert not torch.equal(trained["action_head.inner_model.action_pred.weight"],
                           init["action_head.inner_model.action_pred.weight"])

    # The state reaches the loss: its gradient with respect to the normalised state is not zero ...
    head = stage2.PolicyHead(policy)
    gen = torch.Generator().manual_seed(0)
    frames = np.stack([make_frames(0, 1, 64, v)[0] for v in range(2)])
    ids, mask = (torch.from_numpy(a) for a in tok(["push block 0"]))
    with torch.no_grad():
        x = torch.from_numpy(frames)[None].permute(0, 1, 4, 2, 3).float() * (2 / 255) - 1
        condition, goal = policy.encode_text(ids, mask)
        features = policy.predictive_features(x, condition, policy.make_noise(1, 0).tvp)
    state = torch.from_numpy(normalised[:1]).float().requires_grad_(True)
    actions = torch.randn(1, HORIZON, DIM, generator=gen)
    loss = head(features, goal, actions, torch.randn(1, HORIZON, DIM, generator=gen), torch.tensor([1.0]), state)
    (grad,) = torch.autograd.grad(loss, state)
    assert grad.abs().max() > 0, "the loss depends on the state"
    # ... and the trained policy's prediction moves with it (vpp predict's path).
    predictor = TorchPredictor(policy, tok)
    a, b = (predictor.predict(frames, "push block 0", seed=1, state=s) for s in (train_states[0], train_states[-1]))
    assert np.abs(a.predicted - b.predicted).max() > 1e-6
    np.testing.assert_allclose(a.actions - a.predicted, np.broadcast_to(train_states[0], a.actions.shape), atol=1e-5)


def test_stage2_refuses_a_state_taking_preset_without_recorded_states(tmp_path):
    root = tmp_path / "episodes"
    write_official(root, episodes=3, steps=8)  # records 3-value states
    with pytest.raises(DataError, match="takes a robot state of 7 values; the training episodes record 3"):
        from vpp_edge.training.train import train_policy

        train_policy(policy_config(root, steps=2, preset_overrides={**STATE_PRESET, "action_base": "none"}),
                     tmp_path / "run", progress=False)
