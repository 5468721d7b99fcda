"""vpp export with a policy that takes the robot state, on episodes that record states: its own
parity check and its INT8 calibration run on each observation's recorded state, normalised
with the policy's state bounds as the official normalize_bound; seeded states only where the
data records none of the policy's width, and the parity report says which."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_calibrate_recorded_state import micro_state, official_normalize_bound

from .conftest import pooled

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from vpp_edge.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("data") / "datasets"
    write_demo_dataset(root / "demo", steps=12)  # records 4-value states
    return root


def recorded(observations):
    """Each observation's state read straight from its episode's annotation at its frame."""
    from vpp_edge.episodes import load_episode

    return np.array([load_episode(o.source.rsplit("#", 1)[0]).states[int(o.source.rsplit("#", 1)[1])]
                     for o in observations], np.float64)


def state_policy(dim: int, states: np.ndarray | None = None):
    """A micro policy taking ``dim`` state values; its bounds fitted on ``states`` (the official
    state_01 / state_99) so that normalising is not the identity."""
    from vpp_edge.normalization import StateNormalizer
    from vpp_edge.presets import preset_from_dict
    from vpp_edge.training.models import build_policy

    policy, tok = build_policy(preset_from_dict(micro_state(dim)), seed=0)
    if states is not None:
        policy.set_state_normalizer(StateNormalizer.fit(states))
    return policy, tok


def spy(monkeypatch):
    """(states given to each reference run, in order; the quantizer's state feeds, by graph)."""
    from vpp_edge.export import artifact

    runs, feeds = [], {}
    reference_run, graph_feeds = artifact.reference_run, artifact._feeds

    def recording_run(*args):
        runs.append(None if args[-1] is None else args[-1].numpy().copy())
        return reference_run(*args)

    def recording_feeds(name, ref):
        out = graph_feeds(name, ref)
        if "state" in out:
            feeds.setdefault(name, []).append(out["state"].copy())
        return out

    monkeypatch.setattr(artifact, "reference_run", recording_run)
    monkeypatch.setattr(artifact, "_feeds", recording_feeds)
    return runs, feeds


def test_export_parity_and_int8_calibration_use_the_recorded_states(demo_root, tmp_path, monkeypatch):
    from vpp_edge.calibrate.dataset import ObservationSet
    from vpp_edge.episodes import load_episode
    from vpp_edge.export.artifact import export_artifact
    from vpp_edge.export.options import load_options
    from vpp_edge.observations import find_episodes, sample_observations

    episodes = find_episodes(2, [demo_root])
    policy, tok = state_policy(4, np.concatenate([load_episode(e.annotation).states for e in episodes]))
    low, high = np.array(policy.state_normalizer.low), np.array(policy.state_normalizer.high)
    obs = sample_observations(2, policy.preset.image_size, 4, roots=[demo_root])  # 2 parity + 2 calibration
    options = load_options(precisions=["fp32", "int8"], parity_samples=2, calibration_samples=2,
                           int8={"graphs": ["action_context", "action_sampler"]})  # the state-taking ones
    runs, feeds = spy(monkeypatch)
    out = tmp_path / "art"
    with pooled(tmp_path / "cache") as cache:  # the micro graphs the calibrate tests exported
        export_artifact(policy, tok, out, options, obs, source="test", progress=False, graph_cache=cache)

    expected = official_normalize_bound(recorded(obs), low, high)
    assert not np.allclose(expected, recorded(obs), atol=0.05), "bounds that make normalising visible"
    # Every reference run (2 parity, then 2 calibration) got its observation's recorded state ...
    assert len(runs) == 4
    np.testing.assert_allclose(np.concatenate(runs), expected, atol=1e-6)
    # ... so the quantizer saw the calibration observations' states ...
    assert set(feeds) == {"action_context", "action_sampler"}
    for graph_states in feeds.values():
        np.testing.assert_allclose(np.concatenate(graph_states), expected[2:], atol=1e-6)
    # ... the parity the ONNX graphs were gated on ran on the parity observations' states ...
    report = json.loads((out / "parity.json").read_text())
    assert report["precisions"]["fp32"]["passed"] and report["precisions"]["int8"]["passed"]
    assert "recorded robot states (4 values)" in report["states"]["parity"]
    assert "recorded robot states (4 values)" in report["states"]["calibration"]
    assert "parity observations: the episodes' recorded robot states" in (out / "parity.md").read_text()
    # ... and the calibration record names the set with its states.
    record = json.loads((out / "int8" / "calibration.json").read_text())
    calibration_set = ObservationSet.from_observations(obs[2:])
    assert calibration_set.states is not None
    assert record["calibration_set_sha256"] == calibration_set.digest()


def test_export_seeds_the_states_where_the_data_records_none_of_the_policy_width(demo_root, tmp_path,
                                                                                   monkeypatch):
    from vpp_edge.export.artifact import export_artifact
    from vpp_edge.export.options import load_options
    from vpp_edge.normalization import seeded_state
    from vpp_edge.observations import sample_observations

    policy, tok = state_policy(5)  # the demo episodes record 4 values
    obs = sample_observations(2, policy.preset.image_size, 1, roots=[demo_root])
    runs, _ = spy(monkeypatch)
    out = tmp_path / "art"
    with pooled(tmp_path / "cache") as cache:
        export_artifact(policy, tok, out, load_options(precisions=["fp32"], parity_samples=1), obs, source="test",
                        progress=False, graph_cache=cache)
    assert len(runs) == 1
    np.testing.assert_array_equal(runs[0], seeded_state(5, 0))
    report = json.loads((out / "parity.json").read_text())
    assert "seeded" in report["states"]["parity"] and "4-value states, the policy takes 5" in report["states"]["parity"]
    assert report["states"]["calibration"] is None
