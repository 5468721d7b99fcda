"""One manifest writer against a versioned schema, and the precisions as a registry."""

from __future__ import annotations

import copy
import json

import pytest

from vpp_edge import precisions
from vpp_edge.graph_spec import GRAPHS
from vpp_edge.runtime.manifest import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, SCHEMA, ArtifactError, read_manifest,
                                       schema_errors, write_manifest)


def _entry(precision: str, graph: str) -> dict:
    return {"file": f"{precision}/{graph}.onnx", "sha256": "0" * 64, "precision": precision, "external_data": [],
            "inputs": [{"name": i, "shape": [1], "dtype": "float32"} for i in GRAPHS[graph].inputs],
            "outputs": [{"name": o, "shape": [1], "dtype": "float32"} for o in GRAPHS[graph].outputs]}


def _manifest() -> dict:
    """Every key the writer always writes, with values of the right types."""
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "vpp_edge_version": "0", "created": "now",
            "source": "test", "preset": {}, "normalization": {}, "tokenizer": "tokenizer.json",
            "text_max_length": 77, "sigmas": [1.0, 0.5, 0.0], "action_mode": "sampler",
            "graphs": {f"fp32/{g}": _entry("fp32", g) for g in GRAPHS}, "engines": {}, "toolchain": {}}


def test_the_writer_refuses_a_manifest_outside_the_schema(tmp_path):
    good = _manifest()
    write_manifest(tmp_path, good)
    assert read_manifest(tmp_path) == good
    written = (tmp_path / MANIFEST_FILE).read_text()
    bad_cases = {
        "missing 'sigmas'": lambda m: m.pop("sigmas"),
        "missing 'toolchain'": lambda m: m.pop("toolchain"),
        "unknown key 'colour'": lambda m: m.update(colour="red"),
        "'text_max_length' must be int": lambda m: m.update(text_max_length="77"),
        "action_mode 'turbo' unknown": lambda m: m.update(action_mode="turbo"),
        "'sigmas' must be numbers": lambda m: m.update(sigmas=[1.0, "0"]),
        "precision 'fp64' unknown": lambda m: m["graphs"].update({"fp64/tvp": _entry("fp32", "tvp")}),
        "graph 'unet' unknown": lambda m: m["graphs"].update({"fp32/unet": _entry("fp32", "tvp")}),
        "graphs 'fp32/tvp': missing 'sha256'": lambda m: m["graphs"]["fp32/tvp"].pop("sha256"),
    }
    for message, spoil in bad_cases.items():
        manifest = copy.deepcopy(good)
        spoil(manifest)
        with pytest.raises(ArtifactError, match=message):
            write_manifest(tmp_path, manifest)
        assert (tmp_path / MANIFEST_FILE).read_text() == written  # nothing written


def test_the_runtime_checks_what_it_loads(tmp_path):
    manifest = _manifest()
    manifest["note"] = "kept by a person"  # a reader ignores keys it does not know
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert read_manifest(tmp_path)["note"] == "kept by a person"
    for key, value, message in (("sigmas", "1,0", "'sigmas' must be list"), ("graphs", [], "'graphs' must be dict"),
                                ("format_version", FORMAT_VERSION + 1, f"not a {FORMAT_NAME} v{FORMAT_VERSION}")):
        (tmp_path / MANIFEST_FILE).write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(ArtifactError, match=message):
            read_manifest(tmp_path)
    # the optional parts are known to the schema, with their types
    assert {"parity", "action_mode_ms", "calibration", "state_normalization", "cpu_default"} <= set(SCHEMA)
    assert schema_errors({**_manifest(), "parity": 3}, written=True) == [
        f"'parity' must be str ({SCHEMA['parity'].doc}), got int"]


def test_an_exported_artifact_follows_the_schema_with_its_records(exported):
    out, manifest = exported
    assert schema_errors(manifest, written=True) == []
    assert manifest["parity"] == "parity.json" and set(manifest["action_mode_ms"]) == {"sampler", "step"}
    assert set(manifest["calibration"]) == set(precisions.calibrated())
    for precision, record in manifest["calibration"].items():
        data = json.loads((out / record).read_text())
        assert set(data["options"]) == {"calibrator", "op_types", "exclude_modules", "exclude_nodes"}
        assert data["graphs"]["text"] == {"kept": "fp32"} and data["graphs"]["tvp"]["activation_scales"]


@pytest.mark.slow
def test_vpp_calibrate_assembles_artifacts_with_the_same_writer(exported, tiny_policy, tmp_path):
    """The graph cache of `vpp calibrate` writes its artifacts' manifests with the export's
    writer: the same keys, less the parity report and the action-mode timing (a sweep
    measures its points instead), and the calibration records in the same form."""
    from vpp_edge.calibrate.builder import ArtifactBuilder
    from vpp_edge.calibrate.dataset import ObservationSet
    from vpp_edge.export.options import load_options
    from vpp_edge.observations import sample_observations

    from .conftest import seed_from_pool

    policy, tok = tiny_policy
    options = load_options()
    calibration = ObservationSet.from_observations(sample_observations(policy.preset.num_views,
                                                                       policy.preset.image_size, 2))
    builder = ArtifactBuilder(tmp_path, policy, tok, calibration, options,
                              {**options["int8"], "graphs": ["action_sampler"]}, source="test")
    # Its FP32 graphs are the session artifact's (the same policy): linked, not exported again.
    seed_from_pool(builder.graphs.root)
    built = builder.build(policy.preset, ["int8"], "sampler")
    manifest = read_manifest(built.artifact)
    assert schema_errors(manifest, written=True) == []
    assert set(exported[1]) - set(manifest) == {"parity", "action_mode_ms"}
    assert set(manifest["graphs"]) == {f"{p}/{g}" for p in ("fp32", "int8") for g in GRAPHS}
    record = json.loads((built.artifact / manifest["calibration"]["int8"]).read_text())
    assert record["graphs"]["text"] == {"kept": "fp32"} and record["graphs"]["action_sampler"]["activation_scales"]
    exported_record = json.loads((exported[0] / exported[1]["calibration"]["int8"]).read_text())
    assert set(record) == set(exported_record) and set(record["options"]) == set(exported_record["options"])


def test_every_module_asks_the_precision_registry():
    from vpp_edge.calibrate import knobs as K
    from vpp_edge.calibrate.report import PRECISION_COLOURS
    from vpp_edge.export.tensorrt_build import ENGINE_SOURCES

    assert precisions.exported() == ("fp32", "fp16", "int8", "int8_cpu")
    assert precisions.calibrated() == ("int8", "int8_cpu") and precisions.reference() == "fp32"
    assert ENGINE_SOURCES == {"fp16": "fp32", "int8": "int8"}
    assert set(PRECISION_COLOURS) == set(precisions.names())  # int8_cpu and int8_ov included
    assert "int8_cpu (Q/DQ for ONNX Runtime on a CPU)" in K.KNOBS["precision"].help
    with pytest.raises(ValueError, match="did you mean 'int8_cpu'"):
        precisions.get("int8cpu")


def test_a_new_precision_is_one_registration(tiny_preset):
    """A precision registered once is known to the export options, the knobs, the quantiser
    and the manifest schema without another edit."""
    from vpp_edge.calibrate import knobs as K
    from vpp_edge.export import onnx_io

    example = precisions.PrecisionSpec(
        "int8_sym_cpu", "symmetric Q/DQ for ONNX Runtime", precisions.QDQ, "int8", ("onnxruntime",),
        qdq=precisions.QdqFormat("QInt8", symmetric=True, ort_fusions=True, options="int8_cpu"))
    precisions.register(example)
    try:
        assert "int8_sym_cpu" in precisions.exported() and "int8_sym_cpu" in precisions.calibrated()
        K.check_value("precision", "int8_sym_cpu", tiny_preset)
        assert K.normalize({**K.base_values(tiny_preset), "precision": "int8_sym_cpu"})["calibration"] == "minmax"
        assert onnx_io.qdq_format("int8_sym_cpu").symmetric
        manifest = _manifest()
        manifest["graphs"]["int8_sym_cpu/tvp"] = _entry("int8_sym_cpu", "tvp")
        assert schema_errors(manifest, written=True) == []
        with pytest.raises(ValueError, match="registered already"):
            precisions.register(precisions.PrecisionSpec("int8_sym_cpu", "other", precisions.FLOAT16, "fp16", ()))
    finally:
        precisions.unregister("int8_sym_cpu")
    with pytest.raises(K.KnobError, match="must be one of"):
        K.check_value("precision", "int8_sym_cpu", tiny_preset)
