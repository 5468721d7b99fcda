"""Calibration recommendations never change the policy's inputs (cameras, frames) unless the
user opts in; the recommendation states the accuracy it trades; plots label every series
(issue 22). Report-level tests on synthetic rows: no model, no measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpp_edge.calibrate import knobs as K
from vpp_edge.calibrate.grid import spec_from_dict
from vpp_edge.calibrate.pareto import Tolerance, recommend
from vpp_edge.calibrate.report import ineligible_points, plot_pareto, series_styles, write_report
from vpp_edge.calibrate.runtime_config import load_runtime_config


def _artifact(folder: Path) -> Path:
    (folder / "int8").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        "format": "vpp-edge-artifact", "format_version": 1, "preset": {}, "sigmas": [1.0, 0.0],
        "graphs": {"fp32/tvp": {}, "int8/tvp": {}}}))
    return folder


def _rows(tmp_path: Path, preset) -> list[dict]:
    """The trained configuration at FP32, an INT8 point, and a much faster one-camera point
    (the shape of `make calibrate` on the untrained tiny model)."""
    art = _artifact(tmp_path / "cache" / "a1")
    rows = []
    for id_, changes, p50, mse in [("ref", {}, 200.0, 1e-12), ("int8", {"precision": "int8"}, 120.0, 2e-5),
                                   ("one_cam", {"views": 1}, 60.0, 1e-5),
                                   ("two_frames", {"frames": 1, "precision": "int8_cpu", "backend": "openvino"},
                                    50.0, 1e-5)]:
        r = K.normalize({**K.base_values(preset), **changes})
        r.update(id=id_, label=id_, status="ok", total_p50_ms=p50, total_p99_ms=p50 * 1.2, action_mse=mse,
                 action_max_abs=0.01, feature_cosine_min=0.999, action_cosine_min=1.0, peak_rss_mb=100.0,
                 artifact=str(art), engine_rss_mb=50.0, load_avg=1.0)
        for s in ("tvp", "former", "action_head", "text"):
            r[f"{s}_p50_ms"], r[f"{s}_p99_ms"] = p50 / 3, p50 / 2.5
        rows.append(r)
    return rows


def _spec():
    return spec_from_dict({"name": "r", "grid": [{"precision": "fp32"}],
                           "recommend": {"tolerance": {"action_mse": 1e-4}}})


def test_view_and_frame_knobs_are_input_knobs():
    assert set(K.INPUT_KNOBS) == {"views", "frames"}
    assert K.input_changes({"views": 1, "frames": 3}, {"views": 2, "frames": 3}) == {"views": 1}
    assert K.input_changes({"views": 2, "precision": "int8"}, {"views": 2}) == {}


def test_recommend_skips_ineligible_points_with_the_reason():
    rows = [{"id": i, "label": i, "status": "ok", "total_p50_ms": ms, "total_p99_ms": ms, "action_mse": 0.0,
             "action_max_abs": 0.0, "feature_cosine_min": 1.0, "action_cosine_min": 1.0, "peak_rss_mb": 1.0}
            for i, ms in (("slow", 100.0), ("fast", 10.0))]
    rec = recommend(rows, Tolerance(), ineligible={"fast": "changes the policy's inputs"})
    assert rec.row["id"] == "slow" and rec.passing == ["slow"]
    assert rec.rejected["fast"] == ["changes the policy's inputs"]


def test_input_changes_are_not_recommended_by_default(tmp_path, tiny_preset):
    rows, base = _rows(tmp_path, tiny_preset), K.base_values(tiny_preset)
    assert set(ineligible_points(rows, base)) == {"one_cam", "two_frames"}
    assert ineligible_points(rows, base, allow_input_changes=True) == {}

    report = write_report(tmp_path, _spec(), rows, base, model="untrained")
    assert report["recommended"] == "int8"  # the fastest point that keeps both cameras and every frame
    assert "views=1" in report["ineligible"]["one_cam"] and "--allow-input-changes" in report["ineligible"]["one_cam"]
    # the recommendation states the speed it buys and the accuracy it trades for it
    assert report["trade"].startswith("1.67x the speed of the trained configuration (ref: 200.0 -> 120.0 ms p50)")
    assert "action MSE 2.00e-05" in report["trade"] and "INPUTS" not in report["trade"]
    summary = (tmp_path / "summary.md").read_text()
    assert f"- trades: {report['trade']}" in summary
    assert "2 point(s) change the policy's inputs" in summary and "`--allow-input-changes`" in summary
    config = load_runtime_config(tmp_path / "recommended.yaml")
    assert config.precision == "int8" and config.info["knobs"]["views"] == 2
    assert config.info["sweep"]["trade"] == report["trade"]


def test_input_changes_are_recommended_only_on_opt_in(tmp_path, tiny_preset):
    rows, base = _rows(tmp_path, tiny_preset), K.base_values(tiny_preset)
    report = write_report(tmp_path, _spec(), rows, base, allow_input_changes=True)
    assert report["recommended"] == "two_frames" and report["ineligible"] == {}
    assert f"CHANGES THE POLICY'S INPUTS: frames=1 (trained: {base['frames']})" in report["trade"]
    assert "change the policy's inputs (cameras" not in (tmp_path / "summary.md").read_text()


def test_pareto_plot_labels_every_series(tmp_path, tiny_preset):
    rows, base = _rows(tmp_path, tiny_preset), K.base_values(tiny_preset)
    colours, markers = series_styles(rows)
    assert set(colours) == {"fp32", "int8", "int8_cpu"} and set(markers) == {"onnxruntime", "openvino"}
    assert len(set(colours.values())) == len(colours) and len(set(markers.values())) == len(markers)
    # a precision and a backend the palette does not know still get their own style
    extra = [{**rows[0], "precision": "int9", "backend": "nosuch"}]
    c2, m2 = series_styles(rows + extra)
    assert c2["int9"] not in colours.values() and m2["nosuch"] not in markers.values()

    labels = plot_pareto(tmp_path / "p.png", rows, ["two_frames", "int8", "ref"], rows[1], Tolerance(action_mse=1e-4),
                         "p50", "t", list(ineligible_points(rows, base)))
    for series in ("precision fp32", "precision int8", "precision int8_cpu", "backend onnxruntime",
                   "backend openvino", "Pareto frontier", "p50 -> p99 latency", "recommended: int8"):
        assert series in labels, series
    assert any("changes the policy's inputs" in label for label in labels)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("command", ["sweep", "report"])
def test_cli_has_the_opt_in(command):
    import argparse

    from vpp_edge.calibrate.commands import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = ["calibrate", command] + (["dir"] if command == "report" else [])
    assert parser.parse_args(args).allow_input_changes is False
    assert parser.parse_args(args + ["--allow-input-changes"]).allow_input_changes is True
