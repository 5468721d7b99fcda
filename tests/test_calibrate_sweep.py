"""calibrate/ end to end on a micro model: export with the graph cache, INT8 calibration
with saved scales, measurement in worker processes, report, and the recommended runtime
config run by the runtime. (Unit tests: test_calibrate.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from vpp_edge.calibrate.grid import spec_from_dict
from vpp_edge.calibrate.runtime_config import load_runtime_config
from vpp_edge.calibrate.sweep import run_sweep
from vpp_edge.export.graphs import GRAPHS

from tests.test_calibrate import MICRO

from .conftest import pooled


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    from vpp_edge.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("calib")
    (root / "micro.yaml").write_text(yaml.safe_dump(MICRO))
    write_demo_dataset(root / "datasets" / "demo", steps=12)
    spec = spec_from_dict({
        "name": "micro",
        "model": {"preset": str(root / "micro.yaml")},
        "data": {"calibration_samples": 2, "heldout_samples": 2, "roots": [str(root / "datasets")]},
        "measure": {"warmup": 1, "repeats": 2, "threads": 2},
        "int8": {"graphs": ["tvp", "former"]},  # the two that calibrate on camera features
        "recommend": {"tolerance": {"action_mse": 1e-3, "action_max_abs": 0.1}},
        "grid": [{"precision": ["fp32", "int8", "int8_cpu"]}, {"tvp_timesteps": [10]}],
    }, "micro-sweep")
    out = root / "out"
    with pooled(out / "cache" / "graphs") as cache:  # the sweep's graph cache (calibrate/builder.py)
        seeded = {f"{e.parent.name}/{e.name}" for e in cache.glob("*/*")}  # "<precision>/<graph>-<key>"
        outcome = run_sweep(spec, out, progress=False, available_backends=["onnxruntime"])
    return spec, out, outcome, seeded


@pytest.mark.slow
def test_sweep_measures_every_point_and_reuses_graphs(swept):
    spec, out, outcome, seeded = swept
    rows = {r["label"]: r for r in outcome.rows}

    def from_pool(*labels: str) -> list[str]:
        """The graphs of these points' own precisions that the cache held before the sweep
        (seeded from the session's graph pool: reused, not built)."""
        own = {rows[label]["precision"] for label in labels}
        return sorted({k for label in labels for k, key in rows[label]["graph_keys"].items()
                       if k.split("/")[0] in own and f"{k}-{key}" in seeded})

    assert set(rows) == {"fp32", "int8", "int8_cpu", "fp32 tvp_timesteps=10"}
    assert all(r["status"] == "ok" for r in rows.values())
    # FP32 ONNX Runtime reproduces the PyTorch reference; INT8 does not, exactly
    assert rows["fp32"]["action_mse"] < 1e-10 and rows["fp32"]["feature_cosine_min"] > 0.99999
    for int8 in ("int8", "int8_cpu"):
        assert 0 < rows[int8]["action_max_abs"] < 0.25 and rows[int8]["feature_cosine_min"] < 1.0
    for r in rows.values():
        assert 0 < r["tvp_p50_ms"] <= r["tvp_p99_ms"] and r["total_p50_ms"] >= r["tvp_p50_ms"]
        assert r["peak_rss_mb"] > r["engine_rss_mb"] > 0 and r["latency_repeats"] == 2
    # graphs are cached by what they compute: the scheduler-steps variant (same first noise
    # level with Karras sigmas) exports nothing, the INT8 points only quantize
    # (the two INT8 points share one artifact; int8_cpu quantizes the TVP only, export/defaults.yaml,
    # and fuses every graph for ONNX Runtime)
    # (a graph the seeded cache held already is reused: each graph is built or taken, not both)
    assert sorted(rows["fp32"]["built"] + from_pool("fp32")) == sorted(f"fp32/{g}" for g in GRAPHS)
    assert sorted(rows["int8"]["built"] + rows["int8_cpu"]["built"] + from_pool("int8", "int8_cpu")) == \
        ["int8/former", "int8/tvp", *sorted(f"int8_cpu/{g}" for g in GRAPHS)]
    assert rows["fp32 tvp_timesteps=10"]["built"] == []
    assert rows["fp32 tvp_timesteps=10"]["action_mse"] == rows["fp32"]["action_mse"]
    # calibration record and QDQ scales saved with the INT8 artifact
    record = json.loads((out / "cache" / "artifacts" / rows["int8"]["config"] / "int8" / "calibration.json")
                        .read_text())
    assert record["method"] == "minmax" and len(record["observations"]) == 2
    scales = record["graphs"]["tvp"]["activation_scales"]
    assert scales and all(s["scale"] and s["range"][0] < 0 < s["range"][1] for s in scales.values())
    assert record["graphs"]["text"] == record["graphs"]["action_sampler"] == {"kept": "fp32"}
    record = json.loads((out / "cache" / "artifacts" / rows["int8_cpu"]["config"] / "int8_cpu" / "calibration.json")
                        .read_text())
    assert record["options"]["op_types"] == ["Conv"] and set(record["graphs"]["tvp"]["activation_scales"])
    # resuming a finished sweep measures nothing
    again = run_sweep(spec, out, progress=False, available_backends=["onnxruntime"])
    assert again.measured_now == 0 and len(again.rows) == 4


@pytest.mark.slow
def test_report_recommendation_runs_on_the_runtime(swept):
    from vpp_edge.calibrate import knobs as K
    from vpp_edge.calibrate.report import write_report
    from vpp_edge.calibrate.sweep import base_preset
    from vpp_edge.runtime.artifact import Artifact
    from vpp_edge.runtime.engines import create_engine
    from vpp_edge.runtime.policy import RuntimePolicy

    spec, out, outcome, _ = swept
    report = write_report(out, spec, outcome.rows, K.base_values(base_preset(spec, None)), 1.0, "", "untrained")
    pick = next(r for r in outcome.rows if r["id"] == report["recommended"])
    assert pick["label"] in ("fp32", "int8", "int8_cpu", "fp32 tvp_timesteps=10")
    assert report["recommended"] in report["frontier"]
    config = load_runtime_config(out / "recommended.yaml")
    artifact = Artifact.open(config.artifact)
    assert artifact.preset.name == "micro" and config.precision == pick["precision"]
    with create_engine(artifact, config.backend, config.precision) as engine:
        policy = RuntimePolicy(artifact, engine)
        policy.set_instruction("push the block")
        chunk = policy.infer(np.zeros((2, 64, 64, 3), np.uint8))
    assert chunk.actions.shape == (10, 7) and np.all(np.isfinite(chunk.actions))
