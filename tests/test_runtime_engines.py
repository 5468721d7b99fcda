"""Engines over an exported artifact: ONNX Runtime vs the PyTorch reference, buffers
allocated once, verified files, clear errors, NaN never passed on."""

import shutil

import numpy as np
import pytest

from vpp_edge.errors import MissingDependencyError
from vpp_edge.export.parity import compare
from vpp_edge.runtime.artifact import Artifact
from vpp_edge.runtime.engines import available_backends, create_engine
from vpp_edge.runtime.engines.onnxruntime import OrtEngine
from vpp_edge.runtime.manifest import ArtifactError
from vpp_edge.runtime.policy import EngineOutputError, RuntimePolicy
from vpp_edge.training.checkpoints import save_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tiny_policy, tmp_path_factory):
    return save_checkpoint(*tiny_policy, tmp_path_factory.mktemp("ck") / "tiny")


def frames_of(preset, value=0):
    rng = np.random.default_rng(value)
    return rng.integers(0, 256, (preset.num_views, preset.image_size, preset.image_size, 3), dtype=np.uint8)


def test_onnxruntime_matches_the_pytorch_backend(exported, checkpoint):
    artifact = Artifact.open(exported[0])
    chunks = {}
    for backend, opts in (("onnxruntime", {}), ("torch", {"checkpoint": checkpoint})):
        with create_engine(artifact, backend, **opts) as engine:
            policy = RuntimePolicy(artifact, engine, seed=3)
            policy.set_instruction("push the red block to the green target")
            chunks[backend] = policy.infer(frames_of(artifact.preset))
    ort, ref = chunks["onnxruntime"], chunks["torch"]
    assert ort.actions.shape == (10, 7) and ort.actions.dtype == np.float32
    assert compare(ref.normalized, ort.normalized)["cosine"] > 0.9999
    assert set(ort.timings_ms) == {"tvp", "former", "action_head"}


@pytest.mark.parametrize("precision", ["fp16", "int8", "int8_cpu"])
def test_lower_precisions_stay_close(exported, precision):
    artifact = Artifact.open(exported[0])
    out = {}
    for p in ("fp32", precision):
        with create_engine(artifact, "onnxruntime", precision=p) as engine:
            policy = RuntimePolicy(artifact, engine, seed=0)
            policy.set_instruction("open the drawer")
            out[p] = policy.infer(frames_of(artifact.preset, 1)).normalized
    assert compare(out["fp32"], out[precision])["cosine"] > 0.98


def test_output_buffers_are_allocated_once_and_text_runs_once(exported):
    artifact = Artifact.open(exported[0])
    engine = OrtEngine(artifact, "fp32").load()
    calls = []
    run = engine.run
    engine.run = lambda g, f: calls.append(g) or run(g, f)
    policy = RuntimePolicy(artifact, engine)
    assert policy.set_instruction("open the drawer") > 0 and policy.set_instruction("open the drawer") == 0
    before = {g: {n: v.data_ptr() for n, v in outs.items()} for g, outs in engine._outputs.items()}
    a = policy.infer(frames_of(artifact.preset))
    b = policy.infer(frames_of(artifact.preset))
    after = {g: {n: v.data_ptr() for n, v in outs.items()} for g, outs in engine._outputs.items()}
    assert before == after, "IO-bound outputs reuse their buffers"
    assert calls.count("text") == 1 and calls.count("tvp") == 2
    assert not np.array_equal(a.actions, b.actions), "fresh noise per inference"
    with pytest.raises(ValueError, match="expected uint8 frames"):
        policy.infer(frames_of(artifact.preset)[:1])


def test_nan_from_an_engine_never_becomes_a_chunk(exported):
    artifact = Artifact.open(exported[0])

    class NaNEngine(OrtEngine):  # fault injection at the engine boundary
        def run(self, graph, feeds):
            out = super().run(graph, feeds)
            return {k: np.full_like(v, np.nan) for k, v in out.items()} if graph.startswith("action") else out

    policy = RuntimePolicy(artifact, NaNEngine(artifact, "fp32").load())
    policy.set_instruction("open the drawer")
    with pytest.raises(EngineOutputError, match="invalid chunk"):
        policy.infer(frames_of(artifact.preset))


def test_modified_artifact_and_missing_backends_are_refused(exported, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(exported[0], copy)
    with open(copy / "fp32" / "tvp.onnx", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(ArtifactError, match="sha256 .* does not match"):
        OrtEngine(Artifact.open(copy), "fp32").load()
    artifact = Artifact.open(exported[0])
    assert "onnxruntime" in available_backends()
    if "tensorrt" not in available_backends():
        with pytest.raises(MissingDependencyError, match="backend 'tensorrt' is not installed here; available: "):
            create_engine(artifact, "tensorrt")
    with pytest.raises(ValueError, match="backend 'jax' unknown"):
        create_engine(artifact, "jax")
    with pytest.raises(ArtifactError, match="no graph 'fp64/text'"):
        OrtEngine(artifact, "fp64").load()
    with pytest.raises(RuntimeError, match="no CUDAExecutionProvider"):
        OrtEngine(artifact, "fp32", device="cuda").load()


def test_robot_side_imports_no_torch(exported):
    """runtime/ (ONNX Runtime path) and the protocol load without torch, diffusers or transformers."""
    import subprocess
    import sys

    code = f"""
import sys, numpy as np
from vpp_edge.runtime.artifact import Artifact
from vpp_edge.runtime.engines import create_engine
from vpp_edge.runtime.policy import RuntimePolicy
from vpp_edge.runtime import protocol, transport, loop, link
from vpp_edge.runtime.cameras import factory, network, opencv
from vpp_edge.firmware_bridge import bridge, factory as drivers
art = Artifact.open({str(exported[0])!r})
with create_engine(art, "onnxruntime") as engine:
    policy = RuntimePolicy(art, engine)
    policy.set_instruction("open the drawer")
    chunk = policy.infer(np.zeros((2, 256, 256, 3), np.uint8))
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print("HEAVY", heavy, chunk.actions.shape)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "HEAVY [] (10, 7)" in out.stdout


def test_real_time_chunking_inpaints_the_previous_chunk(exported):
    """The sampler continues the plan: the new chunk starts where the old one was going."""
    from vpp_edge.runtime.predict_step import inpainting_weights

    w = inpainting_weights(6, 2)
    assert w.tolist()[:2] == [1.0, 1.0] and np.all(np.diff(w[1:]) < 0) and 0 < w[-1] < w[2]
    artifact = Artifact.open(exported[0])
    with create_engine(artifact, "onnxruntime") as engine:
        policy = RuntimePolicy(artifact, engine, seed=0)
        policy.set_instruction("open the drawer")
        first = policy.infer(frames_of(artifact.preset, 1))
        delay = 2
        prefix = first.actions[delay:]
        free = policy.infer(frames_of(artifact.preset, 2))
        rtc = policy.infer(frames_of(artifact.preset, 2), prefix=prefix, delay_steps=len(prefix))
        soft = policy.infer(frames_of(artifact.preset, 2), prefix=prefix, delay_steps=delay)
    np.testing.assert_allclose(rtc.actions[: len(prefix)], prefix, atol=1e-5)  # hard mask: kept exactly
    np.testing.assert_allclose(soft.actions[:delay], prefix[:delay], atol=1e-5)  # in-flight actions kept

    def jump(chunk):  # step from the last action of the old chunk to the first of the new one
        return float(np.linalg.norm(chunk.actions[0] - first.actions[delay - 1]))

    within = float(np.linalg.norm(first.actions[delay] - first.actions[delay - 1]))
    assert jump(soft) == pytest.approx(within, abs=1e-4), "switching adds no jump of its own"

    def disagreement(chunk):  # how far the new chunk departs from what the robot was going to do
        return float(np.linalg.norm(chunk.actions[: len(prefix)] - prefix))

    assert disagreement(soft) < 0.5 * disagreement(free)
