"""vpp export: graphs, parity gates, FP16/INT8 variants, manifest and engine selection."""

import contextlib
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from vpp_edge.cli import EXIT_MISSING_DEPENDENCY, EXIT_PARITY, main
from vpp_edge.errors import VPPError
from vpp_edge.export import artifact as art
from vpp_edge.export import onnx_io
from vpp_edge.export.graph_cache import export_cache
from vpp_edge.export.graphs import GRAPHS
from vpp_edge.export.options import load_options
from vpp_edge.export.parity import ParityError, compare, evaluate_precision
from vpp_edge.export.tensorrt_build import select_graphs
from vpp_edge.observations import sample_observations
from vpp_edge.runtime.manifest import ArtifactError, check_engine_fits, read_manifest, sha256_file, verify_entry
from vpp_edge.runtime.predict_step import encode_text, predict_actions

from .conftest import pooled

pytestmark = pytest.mark.slow


def test_artifact_is_complete_and_self_describing(exported, tiny_preset):
    out, manifest = exported
    assert read_manifest(out) == manifest
    assert set(manifest["graphs"]) == {f"{p}/{g}" for p in ("fp32", "fp16", "int8", "int8_cpu") for g in GRAPHS}
    for key, entry in manifest["graphs"].items():
        assert verify_entry(out, key, entry).is_file()
        assert entry["opset"] >= 17
    tvp = manifest["graphs"]["fp32/tvp"]
    assert tvp["inputs"][0] == {"name": "frames", "shape": [1, 2, 256, 256, 3], "dtype": "uint8"}
    assert tvp["inputs"][2]["shape"] == [1, 2, tiny_preset.tvp.num_frames, 4, 32, 32]
    assert manifest["graphs"]["fp32/action_sampler"]["outputs"][0]["shape"] == [1, 10, 7]
    assert manifest["action_mode"] in ("sampler", "step") and set(manifest["action_mode_ms"]) == {"sampler", "step"}
    assert len(manifest["sigmas"]) == tiny_preset.action_head.num_steps + 1
    assert (out / "tokenizer.json").is_file() and manifest["preset"]["name"] == "tiny"
    report = json.loads((out / "parity.json").read_text())
    assert all(section["passed"] for section in report["precisions"].values())
    assert report["precisions"]["fp32"]["actions"]["cosine"] >= 0.9999
    assert report["precisions"]["int8"]["quantization"]["tvp"]["quantize_nodes"] > 0
    assert report["precisions"]["int8_cpu"]["quantization"]["tvp"]["fusions"]["sdpa"] > 0
    assert "| fp16 | **action chunk** |" in (out / "parity.md").read_text()


def test_graphs_are_deterministic_and_quantised_as_asked(exported):
    out, manifest = exported
    for key in manifest["graphs"]:
        model = onnx.load(str(out / manifest["graphs"][key]["file"]), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        assert not ops & {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}
        if key.startswith("int8/") and not key.endswith("/text"):
            assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        if key.startswith("int8_cpu/") and key != "int8_cpu/tvp":  # only the TVP is quantised for CPUs;
            assert "QuantizeLinear" not in ops  # the others are FP32, fused for ONNX Runtime
            assert manifest["graphs"][key]["opset"] == onnx_io.ORT_OPSET
        if key == "fp32/tvp":
            assert {"LayerNormalization", "Softmax", "MatMul"} <= ops  # native norms; attention as MatMul-Softmax
    int8_tvp = onnx.load(str(out / "int8/tvp.onnx"))
    zero_points = [numpy_helper.to_array(i) for i in int8_tvp.graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(np.all(z == 0) for z in zero_points), "symmetric, as TensorRT expects"


def test_cpu_int8_is_in_onnx_runtime_cpu_format(exported):
    """int8_cpu: uint8 activations with zero points and int8 per-channel weights, on the
    convolutions only, over ONNX Runtime's fused attention; the VAE's first convolution is
    quantised (it reads the 8-bit image), the UNet's is not."""
    out, _ = exported
    model = onnx.load(str(out / "int8_cpu/tvp.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    ops = {n.op_type for n in model.graph.node}
    assert "MultiHeadAttention" in ops and "Softmax" not in ops  # every attention fused
    assert "com.microsoft" in {o.domain for o in model.opset_import}
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activations and all(inits[n.input[2]].dtype == np.uint8 for n in activations)
    stored = [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert {a.dtype for a in stored} == {np.dtype(np.int8), np.dtype(np.int32)}  # weights, biases
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
               and inits[n.input[0]].dtype == np.int8]
    assert all(inits[n.input[1]].size == inits[n.input[0]].shape[0] > 1 for n in weights)  # per output channel
    assert {c.op_type for n in weights for c in consumers[n.output[0]]} == {"Conv"}  # convolutions only
    convs = {onnx_io.module_path(n): n for n in model.graph.node if n.op_type == "Conv"}
    is_quantized = {path: n.input[1] in producer and producer[n.input[1]].op_type == "DequantizeLinear"
                    for path, n in convs.items()}
    assert is_quantized["policy.tvp.vae.encoder.conv_in"] and not is_quantized["policy.tvp.unet.conv_in"]
    rgb = inits[producer[convs["policy.tvp.vae.encoder.conv_in"].input[1]].input[0]]
    assert rgb.shape[1] == 4 and not rgb[:, 3].any()  # a zero input channel: ort_rules.PadInputChannels
    assert sum(is_quantized.values()) > len(is_quantized) // 2
    record = json.loads((out / "int8_cpu" / "calibration.json").read_text())
    scales = record["graphs"]["tvp"]["activation_scales"]
    assert record["options"]["op_types"] == ["Conv"] and all(s["range"][0] <= 0 < s["range"][1] for s in scales.values())


def test_onnx_chain_reproduces_pytorch_on_new_observations(exported, tiny_policy, tiny_preset):
    """What the runtime will do: tokens -> text graph -> TVP -> Former -> action head in ORT."""
    out, manifest = exported
    policy, tok = tiny_policy
    sessions = {g: onnx_io.session(out / manifest["graphs"][f"fp32/{g}"]["file"]) for g in GRAPHS}
    run = art.runner(sessions)
    obs = sample_observations(tiny_preset.num_views, tiny_preset.image_size, 1, offset=5)[0]
    ref = art.reference(policy, tok, obs, seed=42)
    ids, mask = tok([obs.instruction])
    condition, goal = encode_text(run, ids, mask)
    for mode in ("sampler", "step"):
        actions = predict_actions(run, condition, goal, obs.frames[None], ref["noise"].numpy(),
                                  ref["action_noise"].numpy(), manifest["sigmas"], mode)
        assert compare(ref["actions"].numpy(), actions)["cosine"] > 0.9999
    with pytest.raises(ValueError, match="action_mode 'fast' unknown"):
        predict_actions(run, condition, goal, obs.frames[None], ref["noise"].numpy(), ref["action_noise"].numpy(),
                        manifest["sigmas"], "fast")


def test_a_perturbed_graph_fails_its_gate(exported, tiny_policy, tiny_preset, tmp_path):
    out, manifest = exported
    policy, tok = tiny_policy
    bad = tmp_path / "former.onnx"
    model = onnx.load(str(out / "fp32" / "former.onnx"))
    weights = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = numpy_helper.to_array(weights)
    weights.CopyFrom(numpy_helper.from_array(arr + np.random.default_rng(0).normal(0, 0.5, arr.shape).astype(arr.dtype),
                                             weights.name))
    onnx.save(model, str(bad))
    paths = {g: out / "fp32" / f"{g}.onnx" for g in GRAPHS} | {"former": bad}
    obs = sample_observations(tiny_preset.num_views, tiny_preset.image_size, 1)
    refs = [art._numpy(art.reference(policy, tok, obs[0], seed=0))]
    gates = load_options()["gates"]
    scale, offset = np.ones(7, np.float32), np.zeros(7, np.float32)
    section = evaluate_precision("fp32", paths, refs, manifest["sigmas"], "sampler", scale, offset, gates)
    assert not section["passed"]
    assert section["graphs"]["former"]["tokens"]["gate"] == "FAIL"
    assert section["graphs"]["tvp"]["features"]["gate"] == "pass"


def test_failed_gate_stops_export_and_leaves_no_artifact(tiny_policy, tmp_path, monkeypatch, capsys):
    """Export with a graph corrupted on the way out: exit 4, no artifact, a report beside it."""
    real_export = onnx_io.export_onnx

    def corrupting_export(module, args, inputs, outputs, path, opset, *rest):
        real_export(module, args, inputs, outputs, path, opset, *rest)
        if path.stem == "action_context":
            model = onnx.load(str(path))
            for init in model.graph.initializer:
                arr = numpy_helper.to_array(init)
                if arr.dtype == np.float32 and arr.size > 100:
                    init.CopyFrom(numpy_helper.from_array(-arr, init.name))
            onnx.save(model, str(path))

    monkeypatch.setattr(onnx_io, "export_onnx", corrupting_export)
    out = tmp_path / "art"

    def entries(cache):
        return {f"{e.parent.name}/{e.name}" for e in cache.glob("*/*")}

    # The export's cache (beside ``out``) seeded with the session's graphs but action_context,
    # which is exported (and corrupted) fresh; the assertions run inside the block, so a
    # failed export's graph never reaches the pool.
    with pooled(export_cache(out), skip=("action_context",)) as cache:
        seeded = entries(cache)
        code = main(["export", "--preset", "tiny", "--out", str(out), "--precisions", "fp32", "--parity-samples",
                     "1", "--quiet"])
        assert code == EXIT_PARITY
        assert "parity gate failed for fp32" in capsys.readouterr().err
        assert not out.exists() and (tmp_path / "art.parity-failed.md").is_file()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p != cache] == [], \
            "temporary folder removed"
        # The cache keeps what it held before (a cache holding no graph is removed), no
        # temporary entry folder, and none of the failed export's graphs.
        assert not cache.exists() or (entries(cache) and not list(cache.rglob(".*")))
        assert entries(cache) <= seeded and not any(e.startswith("fp32/action_context-") for e in entries(cache))


def test_interrupted_export_leaves_nothing(tiny_policy, tmp_path, monkeypatch):
    policy, tok = tiny_policy

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_io, "export_onnx", interrupt)
    with pytest.raises(KeyboardInterrupt):
        art.export_artifact(policy, tok, tmp_path / "art", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_export_options_are_clear(tmp_path):
    with pytest.raises(VPPError, match="unknown export option 'colour'"):
        load_options(colour="red")
    with pytest.raises(VPPError, match="must include fp32"):
        load_options(precisions=["fp16"])
    with pytest.raises(VPPError, match="fp8"):
        load_options(precisions=["fp32", "fp8"])
    with pytest.raises(onnx_io.ExportError, match="at least one observation"):
        onnx_io.quantize_int8(tmp_path / "x.onnx", tmp_path / "y.onnx", [], ["MatMul"], [], "minmax")
    with pytest.raises(onnx_io.ExportError, match="calibration 'magic' unknown"):
        onnx_io.quantize_int8(tmp_path / "x.onnx", tmp_path / "y.onnx", [{}], ["MatMul"], [], "magic")
    with pytest.raises(onnx_io.ExportError, match=r"INT8 variant 'int4' unknown; allowed: \['int8', 'int8_cpu'\]"):
        onnx_io.quantize_int8(tmp_path / "x.onnx", tmp_path / "y.onnx", [{}], ["MatMul"], [], "minmax", variant="int4")


def test_empty_calibration_set_is_refused(tiny_policy, tmp_path):
    policy, tok = tiny_policy
    options = load_options(calibration_samples=0)
    with pytest.raises(VPPError, match="empty calibration set"):
        art.export_artifact(policy, tok, tmp_path / "art", options, progress=False)


def test_tampered_or_missing_files_are_refused(exported, tmp_path):
    out, manifest = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    entry = manifest["graphs"]["fp32/former"]
    with open(copy / entry["file"], "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="does not match the manifest.*fp32/former"):
        verify_entry(copy, "fp32/former", entry)
    (copy / entry["file"]).unlink()
    with pytest.raises(ArtifactError, match="file of 'fp32/former' is missing"):
        verify_entry(copy, "fp32/former", entry)
    with pytest.raises(ArtifactError, match="not found"):
        read_manifest(tmp_path)


def test_manifest_paths_stay_inside_the_artifact_and_the_tokenizer_is_verified(exported, tmp_path):
    from vpp_edge.runtime.artifact import Artifact

    out, manifest = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (tmp_path / "outside.onnx").write_bytes(b"not yours")
    entry = dict(manifest["graphs"]["fp32/former"], sha256=sha256_file(tmp_path / "outside.onnx"))
    for name in ("../outside.onnx", str(tmp_path / "outside.onnx"), ""):
        with pytest.raises(ArtifactError, match="not a path inside the artifact"):
            verify_entry(copy, "fp32/former", dict(entry, file=name))
    (copy / "link.onnx").symlink_to(tmp_path / "outside.onnx")
    with pytest.raises(ArtifactError, match="leads outside the artifact"):
        verify_entry(copy, "fp32/former", dict(entry, file="link.onnx"))

    assert manifest["tokenizer_sha256"] == sha256_file(out / "tokenizer.json")
    Artifact.open(copy).tokenizer()
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="does not match the manifest.*'tokenizer'"):
        Artifact.open(copy).tokenizer()


def test_external_data_is_recorded_and_verified(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 256])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 256])
    w = numpy_helper.from_array(np.ones((256, 256), np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    path = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    entry = onnx_io.graph_entry(path, tmp_path, "fp32")
    assert entry["external_data"] == [{"file": "m.onnx.data", "sha256": sha256_file(tmp_path / "m.onnx.data")}]
    verify_entry(tmp_path, "m", entry)
    (tmp_path / "m.onnx.data").write_bytes(b"changed")
    with pytest.raises(ArtifactError, match="does not match the manifest.*'m external data'"):
        verify_entry(tmp_path, "m", entry)


def test_engine_selection_and_compatibility(exported):
    out, manifest = exported
    assert set(select_graphs(manifest, "fp16").values()) == {f"fp32/{g}" for g in GRAPHS}
    assert set(select_graphs(manifest, "int8").values()) == {f"int8/{g}" for g in GRAPHS}
    only_fp32 = {**manifest, "graphs": {k: v for k, v in manifest["graphs"].items() if k.startswith("fp32/")}}
    with pytest.raises(ArtifactError, match="no int8 graphs"):
        select_graphs(only_fp32, "int8")
    with pytest.raises(ArtifactError, match="engine precision 'fp64' unknown"):
        select_graphs(manifest, "fp64")
    engine = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7"}
    check_engine_fits("fp16/tvp", engine, dict(engine))
    with pytest.raises(ArtifactError, match="gpu_name='Orin', this machine has 'NVIDIA H100'"):
        check_engine_fits("fp16/tvp", engine, {**engine, "gpu_name": "NVIDIA H100"})


def test_build_engines_without_tensorrt_says_so(exported, capsys):
    out, _ = exported
    before = (out / "manifest.json").read_bytes()
    assert main(["build-engines", "--artifact", str(out)]) == EXIT_MISSING_DEPENDENCY
    assert "TensorRT not available" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before


def test_parity_compare_handles_edge_cases():
    assert compare(np.zeros(3), np.zeros(3)) == {"max_abs": 0.0, "cosine": 1.0}
    assert compare(np.ones(3), np.array([1.0, np.nan, 1.0]))["max_abs"] == float("inf")
    with pytest.raises(ParityError, match="shape mismatch"):
        compare(np.ones(3), np.ones(4))


def test_group_norms_are_rewritten_for_onnx_runtime_with_the_same_result(tmp_path):
    """One channel per group -> one InstanceNormalization carrying the channel affine;
    several stay as exported (rewriting them did not pay: bench/ort_rules_bench.py). Same
    outputs as PyTorch."""
    import torch

    class Norms(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.per_channel = torch.nn.GroupNorm(8, 8, eps=1e-6)
            self.grouped = torch.nn.GroupNorm(4, 16)
            self.conv = torch.nn.Conv2d(8, 16, 1)

        def forward(self, x):
            return self.grouped(self.conv(torch.nn.functional.silu(self.per_channel(x))))

    torch.manual_seed(0)
    module = Norms()
    for norm in (module.per_channel, module.grouped):  # a non-trivial affine
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 12, 10) * 3 + 1
    src, dst = tmp_path / "norms.onnx", tmp_path / "fused.onnx"
    onnx_io.export_onnx(module, (x,), ["x"], ["y"], src, opset=18)
    counts = onnx_io.fuse_for_onnxruntime(src, dst)
    assert counts["group_norm_per_channel"] == 1
    nodes = onnx.load(str(dst)).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("InstanceNormalization") == 2 and "LayerNormalization" not in ops
    instance = next(n for n in nodes if n.op_type == "InstanceNormalization")
    assert instance.input[0] == "x"  # on the input itself: no Reshape around it
    assert [a.f for a in instance.attribute if a.name == "epsilon"] == [pytest.approx(1e-6)]
    with torch.no_grad():
        expected = module(x).numpy()
    got = onnx_io.session(dst).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_onnx_runtime_rewrites_keep_the_tvp_graphs_numbers(exported, tmp_path):
    """Every rewrite of export/ort_rules.py applies to the real TVP graph, and the fused
    FP32 graph computes what the exported one does (the int8_cpu graphs are quantised
    from it)."""
    from collections import Counter

    from vpp_edge.export.ort_rules import RULES

    out, _ = exported
    src, dst = out / "fp32" / "tvp.onnx", tmp_path / "tvp.onnx"
    counts = onnx_io.fuse_for_onnxruntime(src, dst)
    assert all(counts.get(name, 0) > 0 for name in RULES), counts
    ops = Counter(n.op_type for n in onnx.load(str(dst)).graph.node)
    assert ops["SkipLayerNormalization"] == 0 and ops["MultiHeadAttention"] > 0
    exported_session, fused = onnx_io.session(src), onnx_io.session(dst)
    rng = np.random.default_rng(0)
    feeds = {i.name: (rng.integers(0, 256, i.shape, dtype=np.uint8) if i.type == "tensor(uint8)"
                      else rng.standard_normal(i.shape).astype(np.float32)) for i in exported_session.get_inputs()}
    expected, got = exported_session.run(None, feeds)[0], fused.run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_attention_and_channel_padding_are_rewritten_exactly(tmp_path):
    """Short-key MultiHeadAttention -> ONNX Attention (long keys keep MultiHeadAttention's
    flash path); a 3-channel convolution gets a zero input channel under its own name;
    Transposes stay as they are (their rewrite did not pay: bench/ort_rules_bench.py).
    ONNX Runtime computes the same numbers."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    shapes = {"q": [2, 16, 32], "k": [2, 4, 32], "v": [2, 4, 32], "lq": [1, 8, 32], "lk": [1, 1024, 32],
              "lv": [1, 1024, 32], "x": [1, 3, 8, 8], "t": [1, 2, 4, 8, 128], "s": [2, 3, 4, 5]}
    outputs = {"short": [2, 16, 32], "long": [1, 8, 32], "conv": [1, 4, 8, 8], "tokens": [1, 4, 2, 128, 8],
               "small": [3, 2, 5, 4]}
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["short"], domain="com.microsoft", num_heads=2),
        helper.make_node("MultiHeadAttention", ["lq", "lk", "lv"], ["long"], domain="com.microsoft", num_heads=2),
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="rgb_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["t"], ["tokens"], perm=[0, 2, 1, 4, 3]),
        helper.make_node("Transpose", ["s"], ["small"], perm=[1, 0, 3, 2]),
    ]
    graph = helper.make_graph(
        nodes, "rules", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.arange(4, dtype=np.float32), "b")])
    src, dst = tmp_path / "rules.onnx", tmp_path / "fused.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # what this ONNX Runtime reads
    onnx.save(model, str(src))
    counts = onnx_io.fuse_for_onnxruntime(src, dst)
    assert counts == {"attention_for_short_keys": 1, "pad_input_channels": 1}
    model = onnx.load(str(dst))
    assert {o.domain: o.version for o in model.opset_import}[""] == onnx_io.ORT_OPSET
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Attention") == ops.count("MultiHeadAttention") == 1
    assert ops.count("Transpose") == 2 and "Gather" not in ops
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    padded = next(i for i in model.graph.initializer if i.name == conv.input[1])
    assert conv.name == "rgb_conv" and list(padded.dims) == [4, 4, 3, 3]  # an initializer, as the quantiser needs
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    expected, got = onnx_io.session(src).run(None, feeds), onnx_io.session(dst).run(None, feeds)
    for name, e, g in zip(outputs, expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(got[3], expected[3])  # a pure reordering
    # A rule can be left out (what bench/ort_rules_bench.py measures each one's worth with)
    unpadded = tmp_path / "unpadded.onnx"
    assert "pad_input_channels" not in onnx_io.fuse_for_onnxruntime(src, unpadded, skip_rules=["pad_input_channels"])
    conv = next(n for n in onnx.load(str(unpadded)).graph.node if n.op_type == "Conv")
    assert conv.input[1] == "w"
    with pytest.raises(ValueError, match=r"unknown rules \['no_such_rule'\]"):
        onnx_io.fuse_for_onnxruntime(src, unpadded, skip_rules=["no_such_rule"])


def test_artifact_gives_the_official_actions_for_any_length(exported, tiny_policy, tiny_preset):
    """Runtime tokenizer (77 ids, warns past 20) + FP32 graphs vs PyTorch fed the official
    text passes (written independently in test_official_text): goal and actions < 1e-4 for
    instructions shorter and longer than the video condition's 20 tokens."""
    from vpp_edge.runtime.artifact import Artifact
    from vpp_edge.tokenizer import InstructionTruncatedWarning

    from .test_official_text import INSTRUCTIONS, official_condition, official_goal

    out, manifest = exported
    policy, _ = tiny_policy
    tok = Artifact.open(out).tokenizer()
    assert (tok.max_length, tok.condition_length, manifest["text_max_length"]) == (77, 20, 77)
    run = art.runner({g: onnx_io.session(out / manifest["graphs"][f"fp32/{g}"]["file"]) for g in GRAPHS})
    obs = sample_observations(tiny_preset.num_views, tiny_preset.image_size, 1, offset=3)[0]
    noise = policy.make_noise(1, 5)
    clip = policy.text_encoder.clip
    for count in (17, 50):
        text = INSTRUCTIONS[count]
        with pytest.warns(InstructionTruncatedWarning, match=f"{count} tokens") if count > 20 else \
                contextlib.nullcontext():
            ids, mask = tok([text])
        condition, goal = encode_text(run, ids, mask)
        actions = predict_actions(run, condition, goal, obs.frames[None], noise.tvp.numpy(), noise.action.numpy(),
                                  manifest["sigmas"], "sampler")
        with torch.no_grad():
            ref_goal = official_goal(clip, text)
            frames = torch.from_numpy(obs.frames)[None].permute(0, 1, 4, 2, 3).float() * (2 / 255) - 1
            feats = policy.predictive_features(frames, official_condition(clip, text, True), noise.tvp)
            ref = policy.sample_actions(policy.former(feats), ref_goal, noise.action)
        assert np.abs(goal - ref_goal.numpy()).max() < 1e-4
        assert np.abs(actions - ref.numpy()).max() < 1e-4, text
