"""calibrate/: Pareto frontier, recommendation, grids and knobs, calibration sets,
resumable sweeps (with a stand-in for the build-and-measure step), report and runtime
config. The real pipeline runs in test_calibrate_sweep.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vpp_edge.calibrate import knobs as K
from vpp_edge.calibrate.dataset import EmptyCalibrationSetError, ObservationSet, build_observation_set, build_split
from vpp_edge.calibrate.grid import SweepSpecError, expand, load_spec, spec_from_dict
from vpp_edge.calibrate.pareto import RecommendationError, Tolerance, pareto_front, recommend
from vpp_edge.calibrate.runtime_config import RuntimeConfigError, apply_to_args, load_runtime_config
from vpp_edge.calibrate.sweep import POINTS_FILE, SweepStateError, accuracy, read_rows, run_sweep
from vpp_edge.errors import DataError, VPPError


# The tiny preset cut down further (3 UNet levels, 64 px, 2 frames): runs and exports in seconds.
MICRO = {
    "name": "micro", "views": ["static", "gripper"], "image_size": 64, "action_dim": 7, "action_horizon": 10,
    "text": {"max_length": 8, "position_encoding": True, "hidden_size": 32, "projection_dim": 32, "num_layers": 1,
             "num_heads": 4, "intermediate_size": 64},
    "tvp": {"num_frames": 2, "timesteps": 20, "extract_layer_idx": 1, "use_all_layer": True,
            "unet": {"block_out_channels": [32, 32, 64],
                     "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                                          "DownBlockSpatioTemporal"],
                     "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                                        "CrossAttnUpBlockSpatioTemporal"],
                     "layers_per_block": 1, "num_attention_heads": [2, 2, 4], "cross_attention_dim": 64,
                     "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 24, "num_frames": 2,
                     "sample_size": 8},
            "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}},
    "former": {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "num_frames": 2, "queries_per_frame": 2},
    "action_head": {"embed_dim": 32, "n_enc_layers": 1, "n_dec_layers": 1, "n_heads": 2, "num_steps": 4},
}


@pytest.fixture(scope="module")
def micro_policy():
    from vpp_edge.presets import preset_from_dict
    from vpp_edge.training.models import build_policy

    return build_policy(preset_from_dict(MICRO), seed=0)


# ---- Pareto frontier and recommendation ---------------------------------------------------
def test_pareto_front_on_known_points():
    pts = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3), (5, 0.5), (float("nan"), 0.1), (6, 0.5), (0.5, 9)]
    # (3, 4) is dominated by (2, 3); (6, 0.5) by (5, 0.5); the NaN point is never on the front;
    # the duplicate (2, 3) is kept with its twin.
    assert pareto_front(pts) == [8, 0, 1, 4, 3, 5]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]


def _row(id_, p50, mse, max_abs=0.0, cos=1.0, p99=None, status="ok", **kw):
    return {"id": id_, "label": id_, "status": status, "total_p50_ms": p50, "total_p99_ms": p99 or p50 * 1.2,
            "action_mse": mse, "action_max_abs": max_abs, "feature_cosine_min": cos, "action_cosine_min": 1.0,
            "peak_rss_mb": 100.0, **kw}


def test_recommend_picks_the_fastest_point_within_tolerance():
    rows = [_row("ref", 200, 0.0), _row("int8", 120, 1e-6, 0.01), _row("fast_bad", 50, 1e-2, 0.3),
            _row("cos_bad", 80, 1e-7, 0.01, cos=0.9), _row("tie", 120, 1e-8, 0.01),
            _row("broken", 10, 0.0, status="failed")]
    tol = Tolerance(action_mse=1e-4, action_max_abs=0.05, feature_cosine=0.99)
    rec = recommend(rows, tol)
    assert rec.row["id"] == "tie"  # as fast as int8, lower error
    assert set(rec.passing) == {"ref", "int8", "tie"}
    assert rec.rejected["fast_bad"] == ["action_mse 0.01 > 0.0001", "action_max_abs 0.3 > 0.05"]
    assert rec.rejected["cos_bad"] == ["feature_cosine 0.9 < 0.99"]
    # p99 as the objective, and budgets on latency and memory
    rows2 = [_row("a", 100, 0.0, p99=400), _row("b", 110, 0.0, p99=150)]
    assert recommend(rows2, Tolerance(), "p99").row["id"] == "b"
    assert recommend(rows2, Tolerance(latency_ms=105)).row["id"] == "a"
    assert recommend(rows2, Tolerance(memory_mb=50)).row is None


def test_recommend_without_a_passing_point_says_why():
    rec = recommend([_row("x", 10, 1.0, 2.0), _row("y", 20, 0.5, 0.1)], Tolerance(action_mse=1e-3))
    assert rec.row is None and "closest: y" in rec.reason
    assert recommend([], Tolerance()).row is None


def test_tolerance_rejects_unknown_gates_and_bad_values():
    with pytest.raises(RecommendationError, match="unknown gate.*action_mes"):
        Tolerance.from_dict({"action_mes": 1e-3})
    with pytest.raises(RecommendationError, match="must be a number"):
        Tolerance.from_dict({"action_mse": "small"})
    assert Tolerance.from_dict({"action_mse": 1, "feature_cosine": None}).action_mse == 1.0


# ---- grids and knobs ---------------------------------------------------------------------
def test_unknown_knob_is_a_clear_error(tiny_preset):
    with pytest.raises(K.KnobError, match=r"grid entry 1: unknown knob 'precison'; did you mean 'precision'"):
        spec_from_dict({"grid": [{"precision": ["fp32"]}, {"precison": ["int8"]}]}, "s.yaml")
    with pytest.raises(K.KnobError, match="unknown knob 'speed'"):
        spec_from_dict({"grid": [{"precision": "fp32"}], "base": {"speed": 1}})
    with pytest.raises(K.KnobError, match=r"knob 'frames' = 8 must be in \[1, 4\]"):
        expand(spec_from_dict({"grid": [{"frames": [2, 8]}]}), tiny_preset)
    with pytest.raises(K.KnobError, match="views"):
        expand(spec_from_dict({"grid": [{"views": [3]}]}), tiny_preset)
    with pytest.raises(K.KnobError, match="extract_layer"):
        expand(spec_from_dict({"grid": [{"extract_layer": [2]}]}), tiny_preset)
    with pytest.raises(K.KnobError, match="precision.*must be one of"):
        expand(spec_from_dict({"grid": [{"precision": ["int4"]}]}), tiny_preset)


def test_bad_sweep_files_are_clear_errors(tmp_path):
    with pytest.raises(SweepSpecError, match="unknown sweep 'tinny'"):
        load_spec("tinny")
    with pytest.raises(SweepSpecError, match="non-empty list"):
        spec_from_dict({"grid": []})
    with pytest.raises(SweepSpecError, match="unknown section"):
        spec_from_dict({"grid": [{"precision": "fp32"}], "meassure": {}})
    with pytest.raises(SweepSpecError, match="unknown key.*repeat"):
        spec_from_dict({"grid": [{"precision": "fp32"}], "measure": {"repeat": 3}})
    with pytest.raises(SweepSpecError, match=r"int8.options: unknown entropy option\(s\) \['bins'\]"):
        spec_from_dict({"grid": [{"precision": "int8"}], "int8": {"options": {"entropy": {"bins": 3}}}})
    with pytest.raises(SweepSpecError, match="not a regular expression"):
        spec_from_dict({"grid": [{"precision": "int8"}], "int8": {"exclude_nodes": ["(unclosed"]}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [precision: [fp32]\n")
    with pytest.raises(SweepSpecError, match="not valid YAML"):
        load_spec(bad)


def test_empty_calibration_set_is_a_clear_error(tmp_path):
    with pytest.raises(EmptyCalibrationSetError, match="calibration_samples must be a positive integer"):
        spec_from_dict({"grid": [{"precision": "int8"}], "data": {"calibration_samples": 0}})
    with pytest.raises(EmptyCalibrationSetError, match="empty calibration set"):
        build_observation_set(2, 64, 0)
    empty = tmp_path / "empty.npz"
    np.savez(empty, format=np.array("vpp-edge-observations/1"), frames=np.zeros((0, 2, 8, 8, 3), np.uint8),
             instructions=np.array([], str), sources=np.array([], str))
    with pytest.raises(EmptyCalibrationSetError, match="empty calibration set"):
        ObservationSet.load(empty)


def test_expand_dedupes_normalises_and_skips(tiny_preset):
    spec = spec_from_dict({"grid": [
        {"precision": ["fp32", "int8"], "calibration": ["minmax", "entropy"]},  # 2 FP32 combos are one point
        {"backend": ["torch"], "precision": ["fp32", "int8"]},  # torch runs FP32 only
        {"backend": ["tensorrt"]},
        {"dit_steps": [3], "precision": ["fp32"]},
        {"precision": ["fp32"]},  # the same as the first FP32 point
    ]})
    points, skipped = expand(spec, tiny_preset, available_backends=["onnxruntime", "torch"])
    labels = [p.label for p in points]
    assert labels == ["fp32", "int8", "int8 calibration=entropy", "fp32 torch", "fp32 dit_steps=3"]
    assert points[0].values["calibration"] == K.NOT_APPLICABLE
    reasons = {p.label: why for p, why in skipped}
    assert "FP32 model only" in reasons["int8 torch"]
    assert "not installed" in reasons["fp32 tensorrt"]
    assert len({p.id for p in points}) == len(points)


def test_model_preset_applies_knobs(tiny_preset):
    values = {**K.base_values(tiny_preset), "frames": 2, "views": 1, "dit_steps": 3, "extract_layer": 0}
    p = K.model_preset(tiny_preset, values)
    assert (p.tvp.num_frames, p.former.num_frames, p.views, p.action_head.num_steps, p.tvp.extract_layer_idx) == \
        (2, 2, ("static",), 3, 0)
    assert K.model_preset(tiny_preset, K.base_values(tiny_preset)) is tiny_preset


# ---- weights under reduced configurations ------------------------------------------------
def test_derived_policies_keep_the_trained_weights(micro_policy):
    from vpp_edge.calibrate.variants import derive_policy, variant_noise
    from vpp_edge.export.graphs import reference_run

    policy, tok = micro_policy
    base = policy.preset
    variant = derive_policy(policy, K.model_preset(base, {**K.base_values(base), "frames": 1, "views": 1,
                                                          "extract_layer": 0}))
    assert torch.equal(variant.former.latents, policy.former.latents[:1])
    assert torch.equal(variant.former.goal_emb[0].weight, policy.former.goal_emb[0].weight[:, :64])
    assert variant.tvp.unet is policy.tvp.unet  # shared, not copied
    noise = policy.make_noise(1, 0)
    tvp_noise, action_noise = variant_noise(noise, variant.preset)
    assert tvp_noise.shape[1:3] == (1, 1)
    ids, mask = (torch.from_numpy(a) for a in tok(["pick"]))
    frames = torch.zeros(1, 1, 64, 64, 3, dtype=torch.uint8)
    out = reference_run(variant, ids, mask, frames, tvp_noise, action_noise)
    assert out["tokens"].shape == (1, 1 * 2, 32) and out["actions"].shape == (1, 10, 7)
    with pytest.raises(K.KnobError, match="extract_layer"):
        K.model_preset(base, {**K.base_values(base), "extract_layer": 2})


def test_graph_fingerprints_tell_which_graphs_a_knob_changes(micro_policy):
    from vpp_edge.export.graph_cache import graph_fingerprint
    from vpp_edge.calibrate.variants import derive_policy, variant_noise
    from vpp_edge.export.graphs import GRAPHS, reference_run

    policy, tok = micro_policy
    base = policy.preset
    ids, mask = (torch.from_numpy(a) for a in tok(["pick"]))

    def prints(**knobs):
        variant = derive_policy(policy, K.model_preset(base, {**K.base_values(base), **knobs}))
        tvp_noise, action_noise = variant_noise(policy.make_noise(1, 0), variant.preset)
        frames = torch.zeros(1, variant.preset.num_views, 64, 64, 3, dtype=torch.uint8)
        ref = reference_run(variant, ids, mask, frames, tvp_noise, action_noise)
        return {n: graph_fingerprint(n, variant, ref, 18) for n in GRAPHS}

    trained = prints()
    steps = prints(dit_steps=3)
    assert {n for n in GRAPHS if steps[n] != trained[n]} == {"action_sampler"}
    views = prints(views=1)
    assert {n for n in GRAPHS if views[n] != trained[n]} == {"tvp", "former"}
    # Karras sigmas: the first noise level is sigma_max for any number of scheduler steps.
    assert prints(tvp_timesteps=10) == trained


# ---- calibration sets ----------------------------------------------------------------------
def test_observation_sets_round_trip_without_pickle(tmp_path):
    from vpp_edge.demo_data import write_demo_dataset

    write_demo_dataset(tmp_path / "datasets" / "demo")
    roots = [tmp_path / "datasets"]
    split = build_split(2, 64, 3, 2, roots=roots)
    assert len(split.calibration) == 3 and len(split.heldout) == 2
    assert "only 1 episode" in split.note  # the synthetic dataset has one episode
    assert not set(split.calibration.sources) & set(split.heldout.sources)  # other time steps
    path = split.calibration.save(tmp_path / "cal.npz")
    back = ObservationSet.load(path)
    assert np.array_equal(back.frames, split.calibration.frames) and back.instructions == split.calibration.instructions
    assert back.digest() == split.calibration.digest()
    objects = tmp_path / "objects.npz"
    np.savez(objects, format=np.array("vpp-edge-observations/1"), frames=np.array([{"a": 1}], dtype=object),
             instructions=np.array(["x"]), sources=np.array(["y"]))
    with pytest.raises(DataError, match="no pickle"):
        ObservationSet.load(objects)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz: not a readable"):
        ObservationSet.load(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="not found"):
        ObservationSet.load(tmp_path / "missing.npz")


def test_accuracy_compares_common_frames():
    ref_a = np.zeros((2, 10, 7), np.float32)
    got = ref_a.copy()
    got[1, 0, 0] = 0.5
    tokens = np.random.default_rng(0).normal(size=(2, 8, 4)).astype(np.float32)
    m = accuracy(ref_a, tokens, got, tokens[:, :4])  # half the frames: compared over those
    assert m["action_max_abs"] == pytest.approx(0.5)
    assert m["action_mse"] == pytest.approx(0.25 / (2 * 10 * 7))
    assert m["feature_cosine_min"] == pytest.approx(1.0)
    with pytest.raises(VPPError, match="do not match"):
        accuracy(ref_a, tokens, got[:, :5], tokens)


# ---- resumable sweeps (the build-and-measure step replaced by a stand-in) -----------------
GRID = {"name": "t", "grid": [{"precision": ["fp32", "fp16", "int8"]}, {"dit_steps": [3, 5]}],
        "recommend": {"tolerance": {"action_mse": 1e-3}}}


class FakeRunner:
    """Deterministic figures from the knobs; optionally interrupted at call ``stop_at``."""

    def __init__(self, stop_at: int | None = None, fail: str | None = None):
        self.calls: list[str] = []
        self.stop_at, self.fail = stop_at, fail

    def __call__(self, point, precisions):
        if self.stop_at is not None and len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        self.calls.append(point.label)
        if point.label == self.fail:
            raise VPPError("export failed")
        v = point.values
        speed = {"fp32": 1.0, "fp16": 0.7, "int8": 0.5}[v["precision"]] * v["dit_steps"] / 10
        return {"total_p50_ms": 100 * speed, "total_p99_ms": 120 * speed, "action_mse": 1e-5 * (10 - v["dit_steps"]),
                "action_max_abs": 0.01, "feature_cosine_min": 1.0, "action_cosine_min": 1.0}


def test_sweep_resumes_after_interrupt(tmp_path, tiny_preset):
    spec = spec_from_dict(GRID)
    out = tmp_path / "sweep"
    first = FakeRunner(stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, out, progress=False, runner=first, available_backends=["onnxruntime"])
    assert first.calls == ["fp32", "fp16"]
    assert [r["label"] for r in read_rows(out)] == ["fp32", "fp16"]
    with open(out / POINTS_FILE, "a") as f:  # killed while writing the next line
        f.write('{"id": "abc", "lab')
    second = FakeRunner(fail="fp32 dit_steps=5")
    outcome = run_sweep(spec, out, progress=False, runner=second, available_backends=["onnxruntime"])
    assert second.calls == ["int8", "fp32 dit_steps=3", "fp32 dit_steps=5"]  # only what was missing
    assert outcome.measured_now == 3
    status = {r["label"]: r["status"] for r in outcome.rows}
    assert status == {"fp32": "ok", "fp16": "ok", "int8": "ok", "fp32 dit_steps=3": "ok", "fp32 dit_steps=5": "failed"}
    assert next(r for r in outcome.rows if r["status"] == "failed")["error"] == "VPPError: export failed"
    third = FakeRunner()
    outcome = run_sweep(spec, out, progress=False, runner=third, available_backends=["onnxruntime"])
    assert third.calls == ["fp32 dit_steps=5"]  # failed points are retried, finished ones kept
    assert all(r["status"] == "ok" for r in outcome.rows)
    state = json.loads((out / "sweep.json").read_text())
    assert [r["points_measured"] for r in state["runs"]] == [2, 3, 1]


def test_sweep_refuses_results_of_another_context(tmp_path):
    out = tmp_path / "sweep"
    run_sweep(spec_from_dict(GRID), out, progress=False, runner=FakeRunner(), available_backends=["onnxruntime"])
    other = spec_from_dict({**GRID, "measure": {"repeats": 3}})
    with pytest.raises(SweepStateError, match="measure.repeats: 10 -> 3.*--fresh"):
        run_sweep(other, out, progress=False, runner=FakeRunner(), available_backends=["onnxruntime"])
    again = FakeRunner()
    run_sweep(other, out, fresh=True, progress=False, runner=again, available_backends=["onnxruntime"])
    assert len(again.calls) == 5
    import fcntl

    with open(out / ".lock", "w") as held:  # a sweep running in the same folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SweepStateError, match="another sweep is running"):
            run_sweep(other, out, progress=False, runner=FakeRunner(), available_backends=["onnxruntime"])


# ---- report and runtime config -------------------------------------------------------------
def _fake_artifact(folder: Path) -> Path:
    (folder / "int8").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        "format": "vpp-edge-artifact", "format_version": 1, "preset": {}, "sigmas": [1.0, 0.0],
        "graphs": {"fp32/tvp": {}, "int8/tvp": {}}}))
    return folder


def test_report_marks_frontier_and_writes_a_runnable_config(tmp_path, tiny_preset):
    from vpp_edge.calibrate.report import write_report

    art = _fake_artifact(tmp_path / "cache" / "a1")
    rows = []
    for id_, prec, p50, mse in [("a", "fp32", 200.0, 1e-14), ("b", "int8", 120.0, 2e-5), ("c", "fp16", 150.0, 3e-5),
                                ("d", "int8", 100.0, 5e-2)]:
        r = {**K.normalize({**K.base_values(tiny_preset), "precision": prec}), **_row(id_, p50, mse, 0.01)}
        for s in ("tvp", "former", "action_head", "text"):
            r[f"{s}_p50_ms"], r[f"{s}_p99_ms"] = p50 / 3, p50 / 2.5
        r.update(artifact=str(art), engine_rss_mb=50.0, load_avg=1.0)
        rows.append(r)
    rows.append({"id": "e", "label": "fp32 tensorrt", "status": "skipped", "error": "not installed"})
    spec = spec_from_dict({"name": "r", "grid": [{"precision": "fp32"}],
                           "recommend": {"tolerance": {"action_mse": 1e-4}}})
    (tmp_path / "sweep.json").write_text("{}")
    report = write_report(tmp_path, spec, rows, K.base_values(tiny_preset), 12.0, "held-out: x", "untrained")
    assert report["frontier"] == ["d", "b", "a"] and report["recommended"] == "b"
    for name in ("report.csv", "report.json", "summary.md", "pareto.png", "stages.png", "recommended.yaml"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "skipped: fp32 tensorrt: not installed" in (tmp_path / "summary.md").read_text()
    config = load_runtime_config(tmp_path / "recommended.yaml")
    assert (config.backend, config.precision) == ("onnxruntime", "int8")
    assert config.artifact.resolve() == (tmp_path / "recommended" / "artifact").resolve()
    assert config.info["measured"]["action_mse"] == pytest.approx(2e-5)

    class Args:
        runtime_config, artifact, backend, precision = tmp_path / "recommended.yaml", Path("x"), "auto", None

    apply_to_args(Args)
    assert (Args.backend, Args.precision, Args.artifact) == ("onnxruntime", "int8", config.artifact)

    strict = spec_from_dict({"name": "r", "grid": [{"precision": "fp32"}],
                             "recommend": {"tolerance": {"action_mse": 1e-20}}})
    with pytest.raises(RecommendationError, match="no point is within tolerance"):
        write_report(tmp_path, strict, rows, K.base_values(tiny_preset))
    assert not (tmp_path / "recommended.yaml").exists()  # no stale recommendation left behind


def test_runtime_config_errors(tmp_path):
    art = _fake_artifact(tmp_path / "art")
    good = {"format": "vpp-edge-runtime-config", "format_version": 1, "artifact": "art", "backend": "onnxruntime",
            "precision": "int8"}

    def write(**changes):
        import yaml

        path = tmp_path / "rc.yaml"
        path.write_text(yaml.safe_dump({**good, **changes}))
        return path

    assert load_runtime_config(write()).artifact == art
    for changes, message in [({"backend": "cuda"}, "backend 'cuda' unknown"),
                             ({"precision": "fp16"}, "has no fp16 graphs"),
                             ({"artifact": "nowhere"}, "nowhere"),
                             ({"format": "x"}, "not a runtime config"),
                             ({"speed": 1}, "unknown key"),
                             ({"threads": -1}, "threads")]:
        with pytest.raises(RuntimeConfigError, match=message):
            load_runtime_config(write(**changes))
    with pytest.raises(RuntimeConfigError, match="not found"):
        load_runtime_config(tmp_path / "none.yaml")


def test_shipped_tiny_grid_is_valid(tiny_preset):
    points, skipped = expand(load_spec("tiny"), tiny_preset, available_backends=["onnxruntime", "openvino", "torch"])
    assert len(points) >= 10 and not skipped
    assert {p.values["precision"] for p in points} == {"fp32", "fp16", "int8", "int8_cpu"}
    varied = {k for p in points for k in K.MODEL_KNOBS if p.values[k] != K.base_values(tiny_preset)[k]}
    assert varied == set(K.MODEL_KNOBS)  # every model knob is turned at least once
