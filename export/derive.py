"""Every precision's graph from the traced FP32 graph, the way its :class:`~vpp_edge.precisions.PrecisionSpec`
says: one derivation for ``vpp export`` and for the graph cache of ``vpp calibrate``, and one
INT8 calibration record for both.

INT8 (Q/DQ) graphs are calibrated here, not by ``quantize_static``: it does not forward the
histogram calibrators' options (:mod:`.qdq`), so the activation ranges are computed first and
handed over as its calibration cache.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vpp_edge import precisions

from . import onnx_io, qdq

RECORDED = ("excluded_nodes", "quantize_nodes", "samples")  # what the record keeps of a quantised graph
KEPT = {"kept": "fp32"}  # the record of a graph a Q/DQ precision leaves in float


def int8_settings(int8: dict[str, Any], options: dict[str, Any], precision: str) -> dict[str, Any]:
    """Quantizer settings of the Q/DQ ``precision``: ``int8`` (the export options' section, or a
    sweep's), with ``op_types``, ``graphs`` and ``exclude_modules`` from the options section
    its format names (``int8_cpu``), if any."""
    section = onnx_io.qdq_format(precision).options
    if section is None:
        return int8
    return {**int8, **{k: options[section][k] for k in ("op_types", "graphs", "exclude_modules")}}


def quantizes(precision: str, name: str, options: dict[str, Any], int8: dict[str, Any]) -> bool:
    """Whether ``precision`` quantises graph ``name`` (else it keeps it in float)."""
    spec = precisions.get(precision)
    return spec.qdq is not None and name in int8_settings(int8, options, precision)["graphs"]


def derive_graph(precision: str, name: str, fp32: Path, dst: Path, options: dict[str, Any],
                 int8: dict[str, Any] | None = None, feeds: list[dict[str, np.ndarray]] | None = None,
                 method: str = "minmax", ranges: Path | None = None) -> dict[str, Any]:
    """Write graph ``name`` of ``precision`` to ``dst`` from its FP32 graph ``fp32``; returns
    what was done. ``options``: the export options (opset, fp16, int8, int8_cpu); ``int8``:
    quantizer settings (default ``options["int8"]``); ``feeds``: the graph's inputs on the
    calibration observations; ``ranges``: where to keep the activation ranges (default: a
    temporary file)."""
    spec = precisions.get(precision)
    if spec.derivation == precisions.FLOAT16:
        keep = list(options["fp16"]["keep_fp32_ops"])
        onnx_io.convert_fp16(fp32, dst, keep)
        return {"keep_fp32_ops": keep}
    if spec.derivation != precisions.QDQ:
        raise onnx_io.ExportError(f"precision '{precision}' is not derived from the FP32 graphs here "
                                  f"(derivation '{spec.derivation}')")
    int8 = options["int8"] if int8 is None else int8
    if not quantizes(precision, name, options, int8):  # e.g. the text graph: runs once per instruction
        return {**KEPT, "fusions": onnx_io.keep_float(fp32, dst, precision)}
    s = int8_settings(int8, options, precision)
    with tempfile.TemporaryDirectory(prefix="vpp-ranges-") as tmp:
        ranges = ranges or Path(tmp) / f"{name}{qdq.RANGES_SUFFIX}"
        with onnx_io.graph_to_quantize(fp32, precision) as (src, fusions), \
                onnx_io.quiet_tools():  # the histogram calibrators print their progress
            qdq.compute_ranges(src, feeds or [], method, s.get("options"), s["op_types"], ranges,
                               symmetric=spec.qdq.symmetric)
            info = onnx_io.quantize_int8(src, dst, feeds or [], s["op_types"], s["exclude_modules"], method,
                                         s.get("exclude_nodes", []), calibration_cache=ranges, variant=precision)
    info["samples"] = len(feeds or [])
    if fusions:
        info["fusions"] = fusions
    return info


def record_graph(info: dict[str, Any], graph: Path) -> dict[str, Any]:
    """The calibration record's entry of one graph: :data:`KEPT`, or the quantiser's figures
    and the activation scales of the Q/DQ graph file ``graph``."""
    if info.get("kept"):
        return dict(KEPT)
    return {**{k: info[k] for k in RECORDED if k in info}, "activation_scales": qdq.activation_scales(graph)}


def write_calibration(folder: Path, precision: str, options: dict[str, Any], int8: dict[str, Any], method: str,
                      graphs: dict[str, dict[str, Any]], sources: list[str], digest: str) -> str:
    """``<folder>/calibration.json`` for the Q/DQ ``precision`` (``graphs``: name -> record
    entry); returns its path relative to the artifact (the manifest's ``calibration``)."""
    s = int8_settings(int8, options, precision)
    qdq.write_record(folder, method, {"calibrator": qdq.calibrator_options(method, s.get("options")),
                                      "op_types": s["op_types"], "exclude_modules": s["exclude_modules"],
                                      "exclude_nodes": s.get("exclude_nodes", [])},
                     graphs, sources, digest)
    return f"{precision}/{qdq.CALIBRATION_FILE}"
