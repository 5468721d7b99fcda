"""vpp calibrate with a policy that takes the robot state (action_head.use_proprio, the official
XBot): the calibration references, the INT8 feeds of the state-taking action graphs and the
measured held-out runs all get the export's seeded state feeds (observations carry no state),
the same in the reference and in the measured process; nothing crashes, nothing is zero-filled."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tests.test_calibrate import MICRO

from .conftest import pooled

pytestmark = pytest.mark.slow

MICRO_STATE = {**MICRO, "name": "micro_state",
               "action_head": {**MICRO["action_head"], "use_proprio": True, "proprio_dim": 5}}


def test_calibration_feeds_of_a_state_taking_policy_carry_the_seeded_states(tmp_path):
    from vpp_edge.calibrate.builder import CALIBRATION_SEED, ArtifactBuilder
    from vpp_edge.calibrate.dataset import build_observation_set
    from vpp_edge.export.artifact import parity_state
    from vpp_edge.export.options import load_options
    from vpp_edge.presets import preset_from_dict
    from vpp_edge.training.models import build_policy

    policy, tok = build_policy(preset_from_dict(MICRO_STATE), seed=0)
    preset = policy.preset
    calibration = build_observation_set(preset.num_views, preset.image_size, 2)
    options = load_options()
    builder = ArtifactBuilder(tmp_path, policy, tok, calibration, options, options["int8"], "test")
    for graph in ("action_context", "action_sampler"):
        feeds = builder.feeds(preset, graph)
        assert len(feeds) == 2
        for k, feed in enumerate(feeds):
            expected = parity_state(policy, CALIBRATION_SEED + k).numpy()
            assert feed["state"].shape == (1, 5) and np.array_equal(feed["state"], expected)
    assert len({feed["state"].tobytes() for feed in feeds}) == 2, "each observation its own state"
    assert "state" not in builder.feeds(preset, "former")[0]


def test_a_state_taking_policy_sweeps_with_the_reference_states(tmp_path):
    from vpp_edge.calibrate.grid import spec_from_dict
    from vpp_edge.calibrate.sweep import run_sweep
    from vpp_edge.demo_data import write_demo_dataset

    (tmp_path / "micro_state.yaml").write_text(yaml.safe_dump(MICRO_STATE))
    write_demo_dataset(tmp_path / "datasets" / "demo", steps=12)
    spec = spec_from_dict({
        "name": "micro_state",
        "model": {"preset": str(tmp_path / "micro_state.yaml")},
        "data": {"calibration_samples": 2, "heldout_samples": 2, "roots": [str(tmp_path / "datasets")]},
        "measure": {"warmup": 1, "repeats": 1, "threads": 2},
        "int8": {"graphs": ["action_context", "action_sampler"]},  # the graphs that take the state
        "recommend": {"tolerance": {"action_mse": 1e-3, "action_max_abs": 0.1}},
        "grid": [{"precision": ["fp32", "int8"], "action_mode": ["sampler", "step"]}],
    }, "micro-state-sweep")
    with pooled(tmp_path / "out" / "cache" / "graphs"):  # the sweep's graph cache (calibrate/builder.py)
        outcome = run_sweep(spec, tmp_path / "out", progress=False, available_backends=["onnxruntime"])
    rows = {r["label"]: r for r in outcome.rows}
    assert rows and all(r["status"] == "ok" for r in rows.values()), {k: r.get("error") for k, r in rows.items()}
    # FP32 in the measuring process = the PyTorch reference: it was fed the reference's states.
    fp32 = [r for r in rows.values() if r["precision"] == "fp32"]
    assert len(fp32) == 2 and all(r["action_mse"] < 1e-10 for r in fp32)
    assert any(r["precision"] == "int8" for r in rows.values())
    inputs = list((tmp_path / "out" / "cache" / "inputs").glob("*.npz"))
    with np.load(inputs[0]) as data:
        assert data["states"].shape == (2, 1, 5)


def test_the_measuring_process_refuses_inputs_without_the_state(tmp_path):
    """A state-taking artifact measured on inputs without states (or the reverse) is an error."""
    from types import SimpleNamespace

    from vpp_edge.calibrate import measure

    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, frames=np.zeros((1, 1, 8, 8, 3), np.uint8), instructions=np.array(["x"]),
             tvp_noise=np.zeros((1, 1)), action_noise=np.zeros((1, 1)))
    artifact = SimpleNamespace(state_normalizer=object(), sigmas=[1.0, 0.0], action_mode="sampler",
                               tokenizer=lambda: None)
    engine = SimpleNamespace(load=lambda: engine)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("vpp_edge.runtime.artifact.Artifact.open", lambda path: artifact)
        mp.setattr("vpp_edge.runtime.engines.create_engine", lambda *a, **k: engine)
        with pytest.raises(measure.MeasureError, match="takes the robot state but the held-out inputs carry no"):
            measure.run_job({"artifact": "a", "backend": "onnxruntime", "precision": "fp32", "inputs": str(inputs),
                             "out": str(tmp_path / "out")})
