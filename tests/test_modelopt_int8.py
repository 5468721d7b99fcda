"""NVIDIA's INT8 path (export/modelopt_int8.py, issue 20) on a small module: modelopt's PTQ
calibrated in PyTorch, excluded modules kept in float, a Q/DQ ONNX graph that ONNX Runtime
runs close to the fake-quantised module. Skipped without the optional nvidia-modelopt."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from vpp_edge.export import modelopt_int8

from .conftest import pooled

pytestmark = pytest.mark.skipif(not modelopt_int8.available(), reason="nvidia-modelopt not installed")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.body(torch.relu(self.conv_in(x))))
        return self.head(y.mean(dim=(2, 3)))


def test_module_path_of_a_quantizer():
    assert modelopt_int8.module_of("unet.down.0.input_quantizer") == "unet.down.0"
    assert modelopt_int8.module_of("head.weight_quantizer") == "head"


def test_quantize_excludes_and_exports_qdq(tmp_path):
    torch.manual_seed(0)
    model = Small().eval()
    calib = [torch.randn(1, 3, 16, 16) for _ in range(2)]
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)

    def loop(m):
        for c in calib:
            m(c)

    modelopt_int8.quantize(model, loop, exclude_modules=[r"\.?conv_in$"])
    assert modelopt_int8.quantized_layers(model) == 2  # body and head; conv_in stays in float
    assert not model.conv_in.input_quantizer.is_enabled and model.body.input_quantizer.is_enabled
    with torch.no_grad():
        fake = model(x)
    assert 0 < (fake - ref).abs().max() < 0.1  # quantised, and close

    path = tmp_path / "small" / "small.onnx"
    modelopt_int8.export_qdq(model, (x,), path, ("x",), ("y",), opset=18)
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == ["x"]  # the weights are initializers, inline (small)
    assert sorted(p.name for p in path.parent.iterdir()) == ["small.onnx"]
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 4  # 2 layers x (input, weight)
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, fake.numpy(), atol=1e-4)


@pytest.mark.slow
def test_large_model_int8_quantises_tvp_in_pytorch_and_passes_the_action_gate(tiny_preset, tmp_path):
    """With the large-model threshold forced down, `int8` takes the TVP graph from modelopt's
    PTQ (the other graphs: ONNX Runtime's quantiser, here kept in float), the end-to-end
    action-chunk gate holds, the calibration record has its activation scales, and the
    policy computes in float again afterwards."""
    from vpp_edge.export.artifact import export_artifact
    from vpp_edge.export.graph_cache import export_cache
    from vpp_edge.export.graphs import GRAPHS
    from vpp_edge.export.options import load_options
    from vpp_edge.training.models import build_policy
    from vpp_edge.training.models.graph_modules import TVPGraph

    policy, tok = build_policy(tiny_preset, seed=0)  # its own: quantisation inserts modules in place
    probe = [p.detach().clone() for p in policy.parameters()][:3]
    options = load_options(precisions=["fp32", "int8"], parity_samples=1, calibration_samples=1,
                           large_model={"weight_bytes": 0}, int8={"graphs": ["tvp"]})
    out = tmp_path / "art"
    with pooled(export_cache(out)):  # the tiny FP32 graphs, if the session exported them: modelopt's INT8 runs fresh
        manifest = export_artifact(policy, tok, out, options, source="test", progress=False)
    assert {"int8/tvp", "fp32/tvp"} <= set(manifest["graphs"])
    parity = json.loads((out / "parity.json").read_text())["precisions"]["int8"]
    assert parity["passed"] and "modelopt" in parity["quantization"]["tvp"]["quantizer"]
    assert parity["quantization"]["tvp"]["quantize_nodes"] > 0
    assert 0 < parity["graphs"]["tvp"]["features"]["max_abs"]  # quantised, not the FP32 graph
    record = json.loads((out / "int8" / "calibration.json").read_text())
    assert record["graphs"]["tvp"]["activation_scales"]
    ops = {n.op_type for n in onnx.load(str(out / "int8" / "tvp.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert set(manifest["graphs"]) == {f"{p}/{n}" for p in ("fp32", "int8") for n in GRAPHS}
    # The quantisers are disabled again: the policy's TVP computes what it computed before.
    from modelopt.torch.quantization.nn import TensorQuantizer

    assert not any(m.is_enabled for m in TVPGraph(policy).modules() if isinstance(m, TensorQuantizer))
    assert all(torch.equal(a, b) for a, b in zip(probe, policy.parameters()))


def test_export_writes_the_weights_once_from_the_module_into_one_data_file(tmp_path):
    """export_qdq exports without the exporter's weights (its encoder would first copy them
    all into a scratch protobuf) and, past its threshold (forced to 0 here), streams the
    module's own tensors into <graph>.data: every weight an external initializer there,
    byte for byte the module's, no weight left as a graph input, and ONNX Runtime runs the
    graph as the float module."""
    from onnx.external_data_helper import uses_external_data

    torch.manual_seed(0)
    model, x = Small().eval(), torch.randn(1, 3, 16, 16)
    path = tmp_path / "g" / "small.onnx"
    written = modelopt_int8.export_qdq(model, (x,), path, ("x",), ("y",), opset=18, external_from=0)
    weights = torch.jit._unique_state_dict(model)
    assert written == sum(t.numel() * t.element_size() for t in weights.values())
    assert sorted(p.name for p in path.parent.iterdir()) == ["small.onnx", "small.onnx.data"]
    bare = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in bare.graph.input] == ["x"]
    assert {t.name for t in bare.graph.initializer} == set(weights)
    assert all(uses_external_data(t) and {e.key: e.value for e in t.external_data}["location"] == "small.onnx.data"
               for t in bare.graph.initializer)
    loaded = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for name, tensor in weights.items():
        np.testing.assert_array_equal(loaded[name], tensor.numpy())
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5)
