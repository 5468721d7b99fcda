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

import contextlib
import copy
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import onnx
import onnx.numpy_helper
import torch
from torch import nn

from vpp_edge.extras import is_available, require

from .phases import map_large_allocations

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
    map_large_allocations()
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
               output_names: Iterable[str], opset: int, external_from: int | None = None) -> int:
    """Write the quantised ``module`` as a Q/DQ ONNX graph to ``path`` (:func:`attach_weights`:
    its weights in one ``<path>.data`` when they reach ``external_from`` bytes, protobuf's
    2 GB by default, else inline). The TorchScript exporter: modelopt's quantisers have ONNX
    symbolics (QuantizeLinear / DequantizeLinear) there only. Returns the weight bytes.

    Why without the exporter's weights (``export_params=False``): its C++ encoder first
    serialises every initializer into a scratch protobuf only to learn whether the graph
    passes 2 GB, a second copy of all the weights (5.6 GB of the paper-scale UNet), then
    writes a large graph's tensors one file each; without constant folding the weights stay
    the module's own tensors, graph inputs named as in its state dict."""
    from .onnx_io import TWO_GB

    _mtq()  # registers the quantisers' symbolics
    map_large_allocations()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=list(input_names),
                          output_names=list(output_names), dynamo=False, opset_version=max(opset, 13),
                          export_params=False, do_constant_folding=False)
    model = onnx.load(str(path), load_external_data=False)
    weights = torch.jit._unique_state_dict(module)
    used = {v.name for v in model.graph.input} & set(weights)
    total = sum(weights[n].numel() * weights[n].element_size() for n in used)
    attach_weights(model, weights, path, external=total >= (TWO_GB if external_from is None else external_from))
    onnx.save(model, str(path))
    return total


def attach_weights(model: onnx.ModelProto, weights: Mapping[str, torch.Tensor], path: Path, external: bool) -> int:
    """Turn the graph inputs of ``model`` named in ``weights`` into initializers: inline, or
    (``external``) written one tensor at a time straight from the module's memory to
    ``<path>.data`` in the layout of :func:`.external_data.stream_external_data`. Returns
    the bytes."""
    from .external_data import ALIGNMENT

    data_name = f"{path.name}.data"
    written, kept = 0, []
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(path.parent / data_name, "wb")) if external else None
        for value in model.graph.input:
            tensor = weights.get(value.name)
            if tensor is None:
                kept.append(value)
                continue
            arr = tensor.detach().cpu().contiguous().numpy()
            if out is None:
                model.graph.initializer.append(onnx.numpy_helper.from_array(arr, value.name))
            else:
                out.write(b"\0" * (-out.tell() % ALIGNMENT))
                offset = out.tell()
                out.write(memoryview(arr).cast("B"))  # from the tensor's memory, no copy
                init = model.graph.initializer.add()
                init.name, init.data_type = value.name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
                init.dims.extend(arr.shape)
                for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                    entry = init.external_data.add()
                    entry.key, entry.value = key, val
                init.data_location = onnx.TensorProto.EXTERNAL
            written += arr.nbytes
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return written


def _disable(module: nn.Module, which: Callable[[str, nn.Module], bool]) -> None:
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, m in module.named_modules():
        if isinstance(m, TensorQuantizer) and which(name, m):
            m.disable()


def version() -> str:
    """nvidia-modelopt's version (part of a cached graph's key)."""
    import importlib.metadata

    return importlib.metadata.version("nvidia-modelopt")


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
        dst.parent.mkdir(parents=True, exist_ok=True)
        export_qdq(module, tuple(calibration[0]), dst, input_names, output_names, opset)
    finally:
        _disable(module, lambda name, q: True)  # the policy computes in float again
    onnx_io.check(dst)
    n_q = sum(1 for n in external_data.load_graph(dst).graph.node if n.op_type == "QuantizeLinear")
    return {"quantizer": f"nvidia-modelopt {version()} (INT8_DEFAULT_CFG, max calibration)",
            "quantized_layers": layers, "quantize_nodes": n_q, "samples": len(calibration)}
