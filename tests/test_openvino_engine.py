"""The OpenVINO backend: inference precision from the CPU's capabilities, its settings,
parity with ONNX Runtime FP32 within the export gates, the model cache, the missing-extra
message, and no torch on the robot side."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vpp_edge.errors import MissingDependencyError
from vpp_edge.export.parity import compare, passes
from vpp_edge.extras import is_available
from vpp_edge.runtime.engines.openvino import choose_inference_precision, compile_config

needs_openvino = pytest.mark.skipif(not is_available("openvino"), reason="openvino not installed")


@pytest.mark.parametrize(("caps", "requested", "chosen"), [
    (["FP32", "BF16", "INT8", "BIN", "EXPORT_IMPORT"], "auto", "bf16"),  # AVX512_BF16 / AMX CPU
    (["FP32", "INT8", "BIN", "EXPORT_IMPORT"], "auto", "f32"),  # AVX2-only CPU
    (["FP32", "BF16", "INT8"], "f32", "f32"),  # overridden: f32 where bf16 costs accuracy
    (["FP32", "BF16", "INT8"], "fp32", "f32"),  # the project's spelling is accepted too
    (["fp32", "bf16"], "bf16", "bf16"),
])
def test_inference_precision_follows_the_cpu_unless_overridden(caps, requested, chosen):
    assert choose_inference_precision(caps, requested) == chosen


def test_unsupported_or_unknown_inference_precision_is_refused():
    with pytest.raises(ValueError, match="no native bf16"):
        choose_inference_precision(["FP32", "INT8"], "bf16")
    with pytest.raises(ValueError, match="'fp8' unknown; allowed: auto, f32, fp32, bf16"):
        choose_inference_precision(["FP32"], "fp8")


def test_compile_config_carries_threads_and_the_latency_hint():
    assert compile_config("bf16", 2) == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16",
                                         "INFERENCE_NUM_THREADS": "2"}
    assert compile_config("f32", 0, "throughput") == {"PERFORMANCE_HINT": "THROUGHPUT",
                                                      "INFERENCE_PRECISION_HINT": "f32"}
    assert compile_config("f32", 2, pin_threads=False)["ENABLE_CPU_PINNING"] == "NO"
    with pytest.raises(ValueError, match="hint 'fast' unknown"):
        compile_config("f32", 0, "fast")
    with pytest.raises(ValueError, match="threads must be >= 0"):
        compile_config("f32", -1)


@needs_openvino
def test_doctor_line_says_what_the_cpu_gets():
    from vpp_edge.runtime.engines.openvino import cpu_summary

    line = cpu_summary()
    assert line.startswith("openvino ") and "FP32" in line and line.endswith(("in bf16", "in f32"))


def test_missing_openvino_is_one_clear_line(exported, monkeypatch):
    from vpp_edge import extras
    from vpp_edge.runtime import engines
    from vpp_edge.runtime.artifact import Artifact
    from vpp_edge.runtime.engines.openvino import OvEngine

    artifact = Artifact.open(exported[0])
    monkeypatch.setattr(engines, "is_available", lambda m: m != "openvino" and is_available(m))
    with pytest.raises(MissingDependencyError, match="backend 'openvino' is not installed here"):
        engines.create_engine(artifact, "openvino")
    monkeypatch.setattr(extras, "is_available", lambda m: m != "openvino" and is_available(m))
    with pytest.raises(MissingDependencyError, match="OpenVINO backend needs .*'openvino'.*pip install openvino"):
        OvEngine(artifact, "fp32").load()


def _chunk(artifact, engine, frames, inpaint: bool = False):
    """The normalised chunk of one inference; ``inpaint``: of a second one continuing the
    first (real-time chunking: the step graph, its output fed back as its input)."""
    from vpp_edge.runtime.policy import RuntimePolicy

    with engine:
        policy = RuntimePolicy(artifact, engine, seed=3)
        policy.set_instruction("push the red block to the green target")
        chunk = policy.infer(frames)
        return policy.infer(frames, prefix=chunk.actions[2:], delay_steps=2).normalized if inpaint else chunk.normalized


@pytest.mark.slow
@needs_openvino
def test_openvino_matches_onnxruntime_fp32_within_the_gates(exported, tmp_path):
    from vpp_edge.runtime.artifact import Artifact
    from vpp_edge.runtime.engines import available_backends, create_engine

    artifact = Artifact.open(exported[0])
    gates = json.loads((exported[0] / "parity.json").read_text())["gates"]
    frames = np.random.default_rng(1).integers(0, 256, (artifact.preset.num_views, artifact.preset.image_size,
                                                        artifact.preset.image_size, 3), dtype=np.uint8)
    assert "openvino" in available_backends()
    ref = _chunk(artifact, create_engine(artifact, "onnxruntime", threads=2), frames)
    f32 = create_engine(artifact, "openvino", threads=2, inference_precision="f32", cache_dir=tmp_path / "cache")
    assert f32.precision == "fp32"  # the backend's default graphs
    got = _chunk(artifact, f32, frames)
    assert f32.inference_precision == "f32" and set(f32.compile_ms) == set(f32.graphs)
    assert passes(compare(ref, got), gates["fp32_action_cosine"]), compare(ref, got)
    assert any((tmp_path / "cache").iterdir()), "compiled models are cached"
    ref_rtc = _chunk(artifact, create_engine(artifact, "onnxruntime", threads=2), frames, inpaint=True)
    got_rtc = _chunk(artifact, create_engine(artifact, "openvino", threads=2, inference_precision="f32",
                                             cache_dir=tmp_path / "cache"), frames, inpaint=True)
    assert passes(compare(ref_rtc, got_rtc), gates["fp32_action_cosine"]), compare(ref_rtc, got_rtc)

    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    auto = create_engine(artifact, "openvino", threads=2, cache_dir="")
    got = _chunk(artifact, auto, frames)
    assert auto.inference_precision == choose_inference_precision(caps)
    # bf16 keeps an 8-bit mantissa, like FP16's gate is for a 10-bit one.
    assert passes(compare(ref, got), gates["fp16_action_cosine"]), compare(ref, got)


@pytest.mark.slow
@needs_openvino
def test_openvino_path_imports_no_torch(exported, tmp_path):
    code = f"""
import sys, numpy as np
from vpp_edge.runtime.artifact import Artifact
from vpp_edge.runtime.engines import create_engine
from vpp_edge.runtime.policy import RuntimePolicy
art = Artifact.open({str(exported[0])!r})
with create_engine(art, "openvino", cache_dir={str(tmp_path)!r}) as engine:
    policy = RuntimePolicy(art, engine)
    policy.set_instruction("open the drawer")
    chunk = policy.infer(np.zeros((2, 256, 256, 3), np.uint8))
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print("HEAVY", heavy, chunk.actions.shape)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "HEAVY [] (10, 7)" in out.stdout


needs_nncf = pytest.mark.skipif(not (is_available("openvino") and is_available("nncf")),
                                reason="openvino/nncf not installed")


@pytest.mark.slow
@needs_nncf
def test_nncf_int8_is_refused_by_its_gate_or_added_with_the_cpu_default(exported, tmp_path):
    """The API (what `make export-openvino` runs): a gate nothing passes leaves the artifact
    as it was; a passing one adds exactly the graphs the options list and, with timing
    rounds, records the fastest gated CPU engine. The default graphs (the TVP among them)
    and the runtime on them are checked end to end in the `vpp export` test below, which
    quantises them once for both (an NNCF run costs tens of seconds)."""
    import shutil

    import yaml

    from vpp_edge.export import openvino_int8
    from vpp_edge.export.openvino_int8 import PRECISION, add_openvino_int8
    from vpp_edge.export.parity import ParityError
    from vpp_edge.runtime.artifact import Artifact

    root = tmp_path / "art"
    shutil.copytree(exported[0], root)
    defaults = yaml.safe_load((Path(openvino_int8.__file__).with_name("defaults.yaml")).read_text())
    fast = {"int8": {**defaults["int8"], "graphs": ["action_sampler"]}}  # the one graph, to stay quick

    # A gate nothing can pass: refused, and the artifact is left as it was.
    parity = json.loads((root / "parity.json").read_text())
    strict = {**parity, "gates": {**parity["gates"], "int8_action_max_abs": 0.0}}
    (root / "parity.json").write_text(json.dumps(strict))
    before = (root / "manifest.json").read_text()
    with pytest.raises(ParityError, match="OpenVINO INT8 .* fails the gate"):
        add_openvino_int8(root, "transformer", threads=2, options=fast)
    assert (root / "manifest.json").read_text() == before and not (root / PRECISION).exists()

    (root / "parity.json").write_text(json.dumps(parity))
    assert "cpu_default" not in Artifact.open(root).manifest  # only the timing rounds below record it
    section = add_openvino_int8(root, "transformer", threads=2, options=fast, rounds=2)
    assert section["passed"] and set(section["quantization"]) == {"action_sampler"}
    assert section["quantization"]["action_sampler"]["fake_quantize"] > 0
    artifact = Artifact.open(root)
    assert PRECISION in artifact.precisions()
    assert artifact.manifest["graphs"][f"{PRECISION}/action_sampler"]["format"] == "openvino-ir"
    assert json.loads((root / "parity.json").read_text())["precisions"][PRECISION]["passed"]
    # Defaults from data: every CPU engine that passes its gate was timed, the fastest recorded.
    choice = artifact.manifest["cpu_default"]
    times = choice["median_ms"]
    assert {"onnxruntime/fp32", "onnxruntime/int8_cpu", f"openvino/{PRECISION}"} <= set(times)
    assert f"{choice['backend']}/{choice['precision']}" == min(times, key=times.get)


def test_export_without_openvino_leaves_onnx_runtime_fp32_the_default(exported, tmp_path, monkeypatch):
    """Defaults from data, the fallback: `vpp export` (what `make demo` runs first) asks for
    int8_ov; without OpenVINO it says so in one line, the artifact stays as exported, and
    `--backend auto` runs ONNX Runtime FP32. A large model's export does not ask for it."""
    import shutil

    from vpp_edge import extras
    from vpp_edge.export.openvino_int8 import PRECISION, after_export
    from vpp_edge.export.options import load_options
    from vpp_edge.runtime.artifact import Artifact
    from vpp_edge.runtime.engines import choose_backend

    requested = load_options()["precisions"]
    assert PRECISION in requested and PRECISION not in load_options()["large_model"]["precisions"]
    root = tmp_path / "art"
    shutil.copytree(exported[0], root)
    before = (root / "manifest.json").read_text()
    assert after_export(root, ["fp32"]) == []
    monkeypatch.setattr(extras, "is_available", lambda m: m != "openvino" and is_available(m))
    lines = after_export(root, requested)
    assert len(lines) == 1 and "OpenVINO is not installed" in lines[0] and "ONNX Runtime FP32" in lines[0]
    assert (root / "manifest.json").read_text() == before and not (root / PRECISION).exists()
    assert choose_backend(Artifact.open(root), None, ["onnxruntime"])[:2] == ("onnxruntime", None)


@pytest.mark.slow
@needs_nncf
def test_vpp_export_records_cpu_default_and_vpp_run_auto_runs_it(exported, demo_episode, tmp_path, capsys):
    """Defaults from data: `vpp export` (as `make demo` runs it, fewer precisions and frames
    to stay quick) adds int8_ov (NNCF on the default graphs, gated end to end) and records
    the fastest gated CPU engine in the manifest; the runtime runs int8_ov within the INT8
    gate of ONNX Runtime FP32; `vpp run --backend auto` on that artifact runs the recorded
    engine and says so in one line."""
    import yaml

    from vpp_edge.export import openvino_int8
    from vpp_edge.export.graph_cache import export_cache
    from vpp_edge.export.openvino_int8 import PRECISION
    from vpp_edge.runtime.artifact import Artifact
    from vpp_edge.runtime.engines import create_engine
    from vpp_edge.runtime.manifest import read_manifest

    from .conftest import seed_from_pool
    from .test_cli_usability import run_cli, run_on_sim_bridge

    out = tmp_path / "tiny"
    # `exported` is this model with this calibration set: its FP32 and int8_cpu graphs are linked
    # into this export's cache, so the time goes to what this test is about (exporting graphs:
    # tests/test_export*.py).
    seed_from_pool(export_cache(out))
    code, printed, _ = run_cli(["export", "--preset", "tiny", "--out", out, "--precisions", f"fp32,int8_cpu,{PRECISION}",
                                "--parity-samples", 1, "--calibration-samples", 2, "--quiet"], capsys)
    assert code == 0
    manifest = read_manifest(out)
    choice, times = manifest["cpu_default"], manifest["cpu_default"]["median_ms"]
    label = f"{choice['backend']}/{choice['precision']}"
    assert {"onnxruntime/fp32", "onnxruntime/int8_cpu", f"openvino/{PRECISION}"} <= set(times)
    assert label == min(times, key=times.get)
    assert f"fastest CPU engine here that passes its gate: {label}" in printed
    assert f"{PRECISION}/tvp" in manifest["graphs"]

    # int8_ov as the export gated it: every graph of the default options quantised, the TVP's for real.
    defaults = yaml.safe_load((Path(openvino_int8.__file__).with_name("defaults.yaml")).read_text())
    parity = json.loads((out / "parity.json").read_text())
    section = parity["precisions"][PRECISION]
    assert section["passed"] and set(section["quantization"]) == set(defaults["int8"]["graphs"])
    assert section["quantization"]["tvp"]["fake_quantize"] > 0
    artifact = Artifact.open(out)
    assert PRECISION in artifact.precisions()
    assert manifest["graphs"][f"{PRECISION}/tvp"]["format"] == "openvino-ir"
    # The runtime runs it like any precision, and it stays within the INT8 gate of ONNX Runtime FP32.
    frames = np.random.default_rng(2).integers(0, 256, (artifact.preset.num_views, artifact.preset.image_size,
                                                        artifact.preset.image_size, 3), dtype=np.uint8)
    ref = _chunk(artifact, create_engine(artifact, "onnxruntime", threads=2), frames)
    got = _chunk(artifact, create_engine(artifact, "openvino", PRECISION, threads=2, cache_dir=""), frames)
    assert passes(compare(ref, got), parity["gates"]["int8_action_cosine"], parity["gates"]["int8_action_max_abs"])

    code, printed, err = run_on_sim_bridge((out, manifest), demo_episode, tmp_path, capsys, 2, "--backend", "auto")
    assert code == 0, err
    assert f"backend auto: {label} (TensorRT not installed; the artifact's cpu_default" in printed
