"""ONNX files: export from PyTorch, check, FP16 and INT8 (QDQ) variants, ORT sessions."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Collection, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from vpp_edge import precisions
from vpp_edge.errors import VPPError
from vpp_edge.precisions import QdqFormat
from vpp_edge.runtime.manifest import TensorSpec, sha256_file

log = logging.getLogger(__name__)
TWO_GB = 2**31


class ExportError(VPPError):
    """A graph could not be exported, checked or converted."""


@contextlib.contextmanager
def quiet_tools() -> Iterator[io.StringIO]:
    """The exporter, onnxscript's passes and ONNX Runtime's quantizer/FP16 converter report
    every pass at INFO (torch.onnx also warns that torchvision is absent, the quantizer
    advises pre-processing on the root logger): ERROR only while they run, the progress
    bar says what is being done instead. Yields what they printed (for error messages)."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "onnxruntime", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        printed = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield printed
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(module, args: tuple, input_names: Sequence[str], output_names: Sequence[str], path: Path,
                opset: int, external_data_bytes: int = TWO_GB) -> None:
    """Export ``module`` with torch's ONNX exporter (static shapes), then check it by path.
    Weights reaching ``external_data_bytes`` in all go to ``<path>.data``, written from the
    module's own tensors (the exported graph refers to them, it holds no copy)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), quiet_tools() as quiet:
            program = torch.onnx.export(module.eval(), args, input_names=list(input_names),
                                        output_names=list(output_names), dynamo=True, opset_version=opset,
                                        verbose=False, optimize=True)
            weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                          if v.const_value is not None)
            program.save(str(path), external_data=weights >= external_data_bytes)
            del program
    except Exception as exc:
        raise ExportError(f"{path.name}: torch.onnx.export failed: {exc}\n{quiet.getvalue()[-2000:]}") from exc
    check(path)


def check(path: Path) -> None:
    """``onnx.checker`` by path, so models with external data beyond 2 GB are checked too."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: ONNX checker: {exc}") from None


def external_files(path: Path) -> list[Path]:
    """External-data files a model refers to."""
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return [path.parent / n for n in sorted(names)]


def _is_large(path: Path) -> bool:
    """Whether a model with its external data reaches protobuf's 2 GB limit."""
    return path.stat().st_size + sum(p.stat().st_size for p in external_files(path)) >= TWO_GB


def graph_entry(path: Path, root: Path, precision: str) -> dict:
    """Manifest entry: file hash, external data, precision, opset, IO names/shapes/dtypes."""
    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    def specs(values: Iterable) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            out.append(TensorSpec(v.name, tuple(d.dim_value for d in t.shape.dim), dtype).to_dict())
        return out

    return {
        "file": str(path.relative_to(root)),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "external_data": [{"file": str(p.relative_to(root)), "sha256": sha256_file(p)} for p in external_files(path)],
        "precision": precision,
        "opset": opset,
        "inputs": specs(model.graph.input),
        "outputs": specs(model.graph.output),
    }


def session(path: Path, threads: int = 0, lean: bool = False) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with full graph optimisation and quiet logging.

    ``lean``: for a session that must hold little memory more than run fast (the parity
    workers): no CPU memory arena (it grew by 3.7 GB on the paper-scale TVP graph's second
    forward) and no prepacked copies of the weights (they double a session's weights)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if lean:
        opts.enable_cpu_mem_arena = False
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _drop_duplicate_nodes(graph: onnx.GraphProto) -> None:
    """Remove repeated identical nodes that redefine an output.

    The FP16 converter inserts one Cast per (value, FP32-kept consumer) and names it after
    the value, so a value (or a constant the exporter deduplicated) feeding two kept
    consumers gets two identical Casts with the same output name. The first suffices.
    """
    seen: dict[str, bytes] = {}
    keep = []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        clash = [o for o in node.output if o in seen]
        if clash:
            first = seen[clash[0]]
            if _same_computation(first, node):
                continue
            raise ExportError(f"two different nodes define '{clash[0]}' in graph '{graph.name}'")
        for o in node.output:
            seen[o] = key
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _same_computation(first: bytes, node: onnx.NodeProto) -> bool:
    a = onnx.NodeProto.FromString(first)
    return (a.op_type, list(a.input), list(a.output), [x.SerializeToString() for x in a.attribute]) == (
        node.op_type, list(node.input), list(node.output), [x.SerializeToString() for x in node.attribute])


def convert_fp16(src: Path, dst: Path, keep_fp32_ops: Sequence[str]) -> None:
    """FP16 weights and activations, FP32 inputs/outputs, ``keep_fp32_ops`` in FP32; external
    data converted tensor by tensor (:func:`.external_data.convert_fp16`)."""
    from .external_data import convert_fp16 as streaming_fp16

    # the converter appends some Cast nodes after their consumers, and duplicates some
    streaming_fp16(src, dst, keep_fp32_ops, graph_fixes=(_drop_duplicate_nodes, _toposort))


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so every input is produced before it is consumed (stable Kahn sort)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError(f"graph '{graph.name}' has a cycle or an undefined input "
                              f"(e.g. {[i for i in pending[0].input if i not in available]})")
        ready_ids = {id(n) for n in ready}
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def module_path(node: onnx.NodeProto) -> str:
    """The PyTorch module a node came from (the exporter records name scopes)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '") for s in prop.value.strip("[]").split(",")]
            return scopes[-2] if len(scopes) > 1 else ""
    return ""


def nodes_matching(path: Path, patterns: Sequence[str], op_types: Sequence[str]) -> list[str]:
    """Names of ``op_types`` nodes whose module path matches any regex in ``patterns``."""
    model = onnx.load(str(path), load_external_data=False)
    rx = [re.compile(p) for p in patterns]
    return [n.name for n in model.graph.node
            if n.op_type in op_types and any(r.search(module_path(n)) for r in rx)]


class _Feeds:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - part of the reader protocol
        pass


# The ONNX Runtime graphs' opset: the first with ONNX's own Attention (see ort_rules).
ORT_OPSET = 23


def fuse_for_onnxruntime(src: Path, dst: Path, skip_rules: Collection[str] = ()) -> dict[str, int]:
    """ONNX Runtime contrib-op fusions of onnxscript (SDPA -> MultiHeadAttention, Gelu),
    then the exact rewrites of :mod:`.ort_rules` for ONNX Runtime's CPU kernels, at opset
    :data:`ORT_OPSET`: the graph then runs on ONNX Runtime only. Returns how often each
    fusion and rule applied; ``skip_rules``: rules left out. InstanceNormalization ->
    GroupNorm (optimize_for_ort's last step) is left out on purpose: ONNX Runtime has no
    CPU kernel for GroupNorm."""
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
    from onnxscript import version_converter
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import _core, fused_matmul_rule_sets, softmax

    from .ort_rules import apply_rules

    model = ir.load(str(src))
    with quiet_tools():
        version_converter.convert_version(model, ORT_OPSET)
        model, counts = _core.fuse_xformers(model)
        rewrite(model, [*softmax.rules.rules, *fused_matmul_rule_sets.fused_matmul_rule_sets()])
        counts.update(apply_rules(model, skip_rules))
        # The quantiser takes only initializers for weights (a Constant is an activation to it);
        # the rewrites leave replaced weights unused.
        LiftConstantsToInitializersPass()(model)
        RemoveUnusedNodesPass()(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(dst), external_data=f"{dst.name}.data" if _is_large(src) else None)
    check(dst)
    return {k: v for k, v in counts.items() if v}


def qdq_format(variant: str) -> QdqFormat:
    """How the Q/DQ precision ``variant`` is quantised (the precision registry's record)."""
    if variant not in precisions.calibrated():
        raise ExportError(f"INT8 variant '{variant}' unknown; allowed: {sorted(precisions.calibrated())}")
    return precisions.get(variant).qdq


@contextlib.contextmanager
def graph_to_quantize(src: Path, variant: str) -> Iterator[tuple[Path, dict[str, int]]]:
    """The graph that INT8 ``variant`` calibrates and quantises, with the fusions applied to
    it: ``src`` itself for TensorRT's format (its fusions are ONNX Runtime's own), the graph
    of :func:`fuse_for_onnxruntime` (in a temporary folder) for ``int8_cpu``. Calibrate on
    the graph you quantise: the rewrites name some tensors anew. Convolutions keep their
    node names and module paths through them, so INT8 exclusions still apply."""
    if not qdq_format(variant).ort_fusions:
        yield src, {}
        return
    with tempfile.TemporaryDirectory(prefix="vpp-fuse-") as tmp:
        fused = Path(tmp) / src.name
        yield fused, fuse_for_onnxruntime(src, fused)


def keep_float(src: Path, dst: Path, variant: str) -> dict[str, int]:
    """A graph that INT8 ``variant`` leaves in float (the text encoder, say): a copy of
    ``src`` for TensorRT's format, the graph of :func:`fuse_for_onnxruntime` for
    ``int8_cpu``, whose whole chain runs on ONNX Runtime. Returns the fusions applied."""
    if qdq_format(variant).ort_fusions:
        return fuse_for_onnxruntime(src, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for f in [src, *external_files(src)]:
        shutil.copy2(f, dst.parent / f.name)
    return {}


def quantize_int8(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]], op_types: Sequence[str],
                  exclude_modules: Sequence[str], method: str, exclude_nodes: Sequence[str] = (),
                  calibration_cache: Path | None = None, variant: str = "int8") -> dict:
    """Explicit (QDQ) INT8 in the format of ``variant`` (see :func:`qdq_format`) of ``src``
    (as :func:`graph_to_quantize` gives it): per-channel int8 weights, activations calibrated
    on real observations; returns what was excluded. ``exclude_nodes``: node-name regexes
    also kept in float. ``calibration_cache``: ONNX Runtime's JSON of activation ranges:
    read instead of calibrating when it exists, else written."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ExportError(f"INT8 calibration '{method}' unknown; allowed: {sorted(methods)}")
    fmt = qdq_format(variant)
    if not calibration and not (calibration_cache and Path(calibration_cache).is_file()):
        raise ExportError(f"{src.name}: INT8 calibration needs at least one observation")
    excluded = nodes_matching(src, exclude_modules, op_types)
    if exclude_nodes:
        rx = [re.compile(p) for p in exclude_nodes]
        model = onnx.load(str(src), load_external_data=False)
        excluded += [n.name for n in model.graph.node
                     if n.name not in excluded and any(r.search(n.name) for r in rx)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    with quiet_tools():
        quantize_static(str(src), str(dst), _Feeds(calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(op_types), per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=getattr(QuantType, fmt.activation), nodes_to_exclude=excluded,
                        calibrate_method=methods[method], use_external_data_format=_is_large(src),
                        calibration_cache_path=calibration_cache,
                        extra_options={"ActivationSymmetric": fmt.symmetric, "WeightSymmetric": True})
    check(dst)
    model = onnx.load(str(dst), load_external_data=False)
    n_q = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")
    return {"excluded_nodes": len(excluded), "quantize_nodes": n_q}
