"""vpp calibrate with a policy that takes the robot state, on data that records states: the
INT8 calibration feeds and the held-out parity use each observation's recorded state,
normalised as the official normalize_bound; seeded states only where the data has none (or
of another width), and the note says which."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tests.test_calibrate import MICRO

from .conftest import pooled

pytestmark = pytest.mark.slow


def micro_state(dim: int) -> dict:
    return {**MICRO, "name": f"micro_state{dim}",
            "action_head": {**MICRO["action_head"], "use_proprio": True, "proprio_dim": dim}}


def official_normalize_bound(data, data_min, data_max, clip_min=-1, clip_max=1, eps=1e-8):
    """step3_deploy_real_xbot.py XbotAgent.normalize_bound, written out here independently."""
    return np.clip(2 * (data - data_min) / (data_max - data_min + eps) - 1, clip_min, clip_max)


def recorded(observations):
    """Each observation's state read straight from its episode's annotation at its frame."""
    from vpp_edge.episodes import load_episode

    out = []
    for source in observations.sources:
        annotation, frame = source.rsplit("#", 1)
        out.append(load_episode(annotation).states[int(frame)])
    return np.array(out, np.float64)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from vpp_edge.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("data") / "datasets"
    write_demo_dataset(root / "demo", steps=12)  # records 4-value states
    return root


def test_observation_sets_keep_the_recorded_states(demo_root, tmp_path):
    from vpp_edge.calibrate.dataset import ObservationSet, build_observation_set
    from vpp_edge.observations import find_episodes

    obs = build_observation_set(2, 64, 3, find_episodes(2, [demo_root]))
    assert obs.states is not None and obs.states.shape == (3, 4)
    np.testing.assert_array_equal(obs.states, recorded(obs))
    back = ObservationSet.load(obs.save(tmp_path / "set.npz"))
    np.testing.assert_array_equal(back.states, obs.states)
    assert back.digest() == obs.digest()
    stateless = ObservationSet(obs.frames, obs.instructions, obs.sources)
    assert stateless.digest() != obs.digest(), "a cached result computed with other states is not reused"
    assert ObservationSet.load(stateless.save(tmp_path / "none.npz")).states is None


def test_state_feeds_are_the_recorded_states_normalised_else_seeded(demo_root):
    from vpp_edge.calibrate.dataset import ObservationSet, build_observation_set
    from vpp_edge.state_feeds import state_feeds
    from vpp_edge.errors import DataError
    from vpp_edge.normalization import StateNormalizer, seeded_state
    from vpp_edge.observations import find_episodes
    from vpp_edge.presets import preset_from_dict
    from vpp_edge.training.models import build_policy

    obs = build_observation_set(2, 64, 3, find_episodes(2, [demo_root]))
    policy, _ = build_policy(preset_from_dict(micro_state(4)), seed=0)
    bounds = StateNormalizer(low=(0.2, 0.5, -0.1, 0.9), high=(0.9, 0.6, 0.1, 1.1))
    policy.set_state_normalizer(bounds)
    feeds, note = state_feeds(policy.state_normalizer, obs.states, obs.sources, 100)
    assert "recorded robot states (4 values)" in note
    for feed, state in zip(feeds, obs.states):
        np.testing.assert_allclose(feed[0], official_normalize_bound(state, np.array(bounds.low),
                                                                             np.array(bounds.high)), atol=1e-6)
    assert len({f.tobytes() for f in feeds}) == 3
    # No recorded states, or of another width: the export's seeded states, and the note says why.
    stateless = ObservationSet(obs.frames, obs.instructions, obs.sources)
    feeds, note = state_feeds(policy.state_normalizer, stateless.states, stateless.sources, 100)
    assert "seeded" in note and "records no robot state" in note
    assert all(np.array_equal(f, seeded_state(4, 100 + k)) for k, f in enumerate(feeds))
    wide, _ = build_policy(preset_from_dict(micro_state(5)), seed=0)
    feeds, note = state_feeds(wide.state_normalizer, obs.states, obs.sources, 7)
    assert "records 4-value states, the policy takes 5" in note
    assert all(np.array_equal(f, seeded_state(5, 7 + k)) for k, f in enumerate(feeds))
    # A recorded state far outside the policy's bounds: the data does not fit the policy.
    policy.set_state_normalizer(StateNormalizer(low=(5.0,) * 4, high=(6.0,) * 4))
    with pytest.raises(DataError, match="does not fit the policy's state bounds"):
        state_feeds(policy.state_normalizer, obs.states, obs.sources, 100)
    plain, _ = build_policy(preset_from_dict(MICRO), seed=0)
    assert state_feeds(plain.state_normalizer, obs.states, obs.sources, 100) == ([None] * 3, "")


def test_int8_calibration_feeds_carry_the_real_recorded_states(samples_dir, tmp_path):
    """On the official-format XHand sample episodes (19-value states): the quantizer's feeds of
    the state-taking graphs carry each observation's recorded state, normalised with bounds
    fitted as the official state_01 / state_99."""
    from vpp_edge.calibrate.builder import ArtifactBuilder
    from vpp_edge.calibrate.dataset import build_observation_set
    from vpp_edge.export.options import load_options
    from vpp_edge.normalization import StateNormalizer
    from vpp_edge.observations import find_episodes
    from vpp_edge.presets import preset_from_dict
    from vpp_edge.training.models import build_policy

    episodes = find_episodes(2, [samples_dir / "xhand"])
    states = np.concatenate([e.states for e in episodes])
    assert states.shape[1] == 19
    bounds = StateNormalizer.fit(states)
    np.testing.assert_allclose(bounds.low, np.quantile(states, 0.01, axis=0))
    calibration = build_observation_set(2, 64, 3, episodes)
    np.testing.assert_array_equal(calibration.states, recorded(calibration))
    policy, tok = build_policy(preset_from_dict(micro_state(19)), seed=0)
    policy.set_state_normalizer(bounds)
    notes = []
    options = load_options()
    builder = ArtifactBuilder(tmp_path, policy, tok, calibration, options, options["int8"], "test",
                              status=notes.append)
    assert any("recorded robot states (19 values)" in n for n in notes), notes
    expected = official_normalize_bound(calibration.states, np.array(bounds.low), np.array(bounds.high))
    for graph in ("action_context", "action_sampler"):
        feeds = builder.feeds(policy.preset, graph)
        got = np.stack([f["state"][0] for f in feeds])
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_the_held_out_parity_runs_on_the_recorded_states(demo_root, tmp_path):
    """A sweep on data with 4-value states and a policy taking 4: the FP32 reference and the
    measuring process get each held-out observation's recorded state (the untrained policy's
    bounds are [-1, 1], so the normalised state is the recorded one); the split note says so."""
    from vpp_edge.calibrate.dataset import ObservationSet
    from vpp_edge.calibrate.grid import spec_from_dict
    from vpp_edge.calibrate.sweep import run_sweep

    (tmp_path / "micro_state4.yaml").write_text(yaml.safe_dump(micro_state(4)))
    spec = spec_from_dict({
        "name": "micro_state4",
        "model": {"preset": str(tmp_path / "micro_state4.yaml")},
        "data": {"calibration_samples": 2, "heldout_samples": 2, "roots": [str(demo_root)]},
        "measure": {"warmup": 1, "repeats": 1, "threads": 2},
        "int8": {"graphs": ["action_context", "action_sampler"]},
        "recommend": {"tolerance": {"action_mse": 1e-3, "action_max_abs": 0.1}},
        "grid": [{"precision": ["fp32", "int8"], "action_mode": ["sampler"]}],
    }, "micro-state4-sweep")
    with pooled(tmp_path / "out" / "cache" / "graphs"):  # the sweep's graph cache (calibrate/builder.py)
        outcome = run_sweep(spec, tmp_path / "out", progress=False, available_backends=["onnxruntime"])
    rows = list(outcome.rows)
    assert rows and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    fp32 = [r for r in rows if r["precision"] == "fp32"]
    assert fp32 and all(r["action_mse"] < 1e-10 for r in fp32), "the measured run got the reference's states"
    heldout = ObservationSet.load(tmp_path / "out" / "data" / "heldout.npz")
    assert heldout.states is not None and heldout.states.shape == (2, 4)
    (inputs,) = (tmp_path / "out" / "cache" / "inputs").glob("*.npz")
    with np.load(inputs) as data:
        np.testing.assert_allclose(data["states"][:, 0], heldout.states, atol=1e-7)
    assert "recorded robot states (4 values)" in (tmp_path / "out" / "data" / "split.txt").read_text()


def test_vpp_calibrate_dataset_keeps_and_names_the_recorded_states(demo_root, tmp_path, capsys):
    from vpp_edge.calibrate.dataset import ObservationSet
    from vpp_edge.cli import main

    out = tmp_path / "cal.npz"
    assert main(["calibrate", "dataset", "--out", str(out), "--samples", "2", "--data", str(demo_root)]) == 0
    assert "with their recorded 4-value robot states" in capsys.readouterr().out
    obs = ObservationSet.load(out)
    np.testing.assert_array_equal(obs.states, recorded(obs))
