"""INT8 Q/DQ graphs by NVIDIA's path for TensorRT (issue 20): post-training quantisation in
PyTorch with nvidia-modelopt (``modelopt.torch.quantization``), exported as a Q/DQ ONNX graph.

Why: ONNX Runtime's static quantiser (:mod:`.qdq`, :func:`.onnx_io.quantize_int8`) calibrates
by adding every activation of the graph as a graph output and keeping them per sample, which
does not fit a 1.5 B-parameter UNet over 2 views x 16 frames in the export's memory bound.
modelopt calibrates inside the PyTorch forward instead: each quantised layer's input
quantiser keeps one running maximum (``amax``), so calibration costs what a forward costs.

The recipe is modelopt's ``INT8_DEFAULT_CFG`` (TensorRT's explicit quantisation: int8
weights per output channel, int8 activations per tensor, both symmetric, max calibration),
with the export options' ``int8.exclude_modules`` kept in float. Only the TorchScript
exporter (``dynamo=False``) turns modelopt's quantisers into QuantizeLinear /
DequantizeLinear; the graph keeps its FP32 weights, each behind a Q/DQ pair, which TensorRT
folds into int8 weights when it builds the engine.

Optional: ``pip install 'vpp-edge[modelopt]'``; :func:`available` says whether it is there.
"""

from __future__ import annotations

import copy
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import onnx
import torch
from torch import nn

from vpp_edge.extras import is_available, require

QUANTIZER_SUFFIXES = (".input_quantizer", ".weight_quantizer", ".output_quantizer")


def available() -> bool:
    """Whether nvidia-modelopt is installed."""
    return is_available("modelopt")


def _mtq():
    require("modelopt")
    with warnings.catch_warnings():  # it warns about untested transformers versions on import
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
    return mtq


def module_of(quantizer: str) -> str:
    """The module path a quantizer's name belongs to (``a.b.input_quantizer`` -> ``a.b``)."""
    for suffix in QUANTIZER_SUFFIXES:
        if quantizer.endswith(suffix):
            return quantizer[: -len(suffix)]
    return quantizer


def quantize(module: nn.Module, forward_loop: Callable[[nn.Module], None],
             exclude_modules: Sequence[str] = ()) -> nn.Module:
    """Insert modelopt's INT8 quantisers into ``module`` (in place) and calibrate them by
    running ``forward_loop(module)`` (real observations). Layers whose module path matches a
    regex of ``exclude_modules`` (searched, as for ONNX Runtime's quantiser) stay in float."""
    mtq = _mtq()
    rx = [re.compile(p) for p in exclude_modules]
    with torch.no_grad():
        module = mtq.quantize(module, copy.deepcopy(mtq.INT8_DEFAULT_CFG), forward_loop=forward_loop)
    if rx:
        mtq.disable_quantizer(module, lambda name: any(r.search(module_of(name)) for r in rx))
    return module


def quantized_layers(module: nn.Module) -> int:
    """How many layers of ``module`` quantise their input (calibrated and enabled)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return sum(1 for name, m in module.named_modules()
               if isinstance(m, TensorQuantizer) and name.endswith(".input_quantizer") and m.is_enabled)


def export_qdq(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: Iterable[str],
               output_names: Iterable[str], opset: int) -> None:
    """Write the quantised ``module`` as a Q/DQ ONNX graph to ``path`` (external data when
    the weights need it). The TorchScript exporter: modelopt's quantisers have ONNX
    symbolics (QuantizeLinear / DequantizeLinear) there only."""
    _mtq()  # registers the quantisers' symbolics
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=list(input_names),
                          output_names=list(output_names), dynamo=False, opset_version=max(opset, 13),
                          do_constant_folding=True)


def _disable(module: nn.Module, which: Callable[[str, nn.Module], bool]) -> None:
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, m in module.named_modules():
        if isinstance(m, TensorQuantizer) and which(name, m):
            m.disable()


def version() -> str:
    """nvidia-modelopt's version (part of a cached graph's key)."""
    import importlib.metadata

    return importlib.metadata.version("nvidia-modelopt")


def inline_constants(model: onnx.ModelProto, base: Path) -> int:
    """Read back into the graph the Constant nodes' tensors that the TorchScript exporter
    wrote as external data beside a large graph (the weight quantizers' per-channel scales:
    kilobytes each); only initializers stay external. Returns how many."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    count = 0
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and uses_external_data(attr.t):
                load_external_data_for_tensor(attr.t, str(base))
                attr.t.data_location = onnx.TensorProto.DEFAULT
                del attr.t.external_data[:]
                count += 1
    return count


def derive(module: nn.Module, calibration: Sequence[tuple[torch.Tensor, ...]], dst: Path,
           input_names: Sequence[str], output_names: Sequence[str], opset: int,
           exclude_modules: Sequence[str] = ()) -> dict:
    """The INT8 Q/DQ graph of ``module`` (a graph adapter of the policy, quantised in place
    and then returned to float) at ``dst``, calibrated on ``calibration`` (its inputs on
    real observations), its weights in one ``<dst>.data`` file when it has external data.
    Returns what the export records."""
    from . import external_data, onnx_io

    if not calibration:
        raise onnx_io.ExportError(f"{dst.name}: INT8 calibration needs at least one observation")

    def loop(_: nn.Module) -> None:
        for args in calibration:
            module(*args)

    quantize(module, loop, exclude_modules)
    # Layers the graph never ran (other parts of the policy the adapter holds) keep no range.
    _disable(module, lambda name, q: name.endswith(".input_quantizer") and getattr(q, "amax", None) is None)
    layers = quantized_layers(module)
    try:
        with tempfile.TemporaryDirectory(prefix="vpp-modelopt-", dir=dst.parent) as tmp:
            # The TorchScript exporter writes a large graph's weights one file per tensor:
            # gathered into <dst>.data tensor by tensor, as every other graph's.
            raw = Path(tmp) / dst.name
            export_qdq(module, tuple(calibration[0]), raw, input_names, output_names, opset)
            model = external_data.load_graph(raw)
            inline_constants(model, raw.parent)
            sources = external_data.external_initializers(model)
            if sources:
                external_data.stream_external_data(model, raw.parent, sources, dst, lambda a, _: a)
                onnx.save(model, str(dst))
            else:
                shutil.move(raw, dst)
    finally:
        _disable(module, lambda name, q: True)  # the policy computes in float again
    onnx_io.check(dst)
    n_q = sum(1 for n in external_data.load_graph(dst).graph.node if n.op_type == "QuantizeLinear")
    return {"quantizer": f"nvidia-modelopt {version()} (INT8_DEFAULT_CFG, max calibration)",
            "quantized_layers": layers, "quantize_nodes": n_q, "samples": len(calibration)}
