"""INT8 calibration results as data: the activation scales of a QDQ graph, and the
calibration record (``int8/calibration.json``) saved with an artifact.

The scales are the calibrator's output (one symmetric range per activation tensor); the
record says how they were obtained (method, options, exclusions, which frames), so a
deployment can audit them, compare two calibrations, or rebuild an engine with them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

CALIBRATION_FORMAT = "vpp-edge-int8-calibration/1"
CALIBRATION_FILE = "calibration.json"
RANGES_SUFFIX = ".ranges.json"  # ONNX Runtime's calibration cache (activation ranges) of one graph
# Options of ONNX Runtime's calibrators (onnxruntime.quantization.calibrate.create_calibrator)
# per method, with our defaults. quantize_static() does not forward the histogram sizes,
# and with its 128 bins the entropy search has a single candidate (the full range, i.e.
# minmax): so the ranges are computed here and handed over as a calibration cache.
# ORT's entropy search is pure Python and grows with num_bins / num_quantized_bins
# (256 / 128: 65 candidate ranges per tensor, about 30 s for the tiny TVP on 2 cores).
CALIBRATOR_DEFAULTS = {"minmax": {"moving_average": False, "averaging_constant": 0.01},
                       "entropy": {"num_bins": 256, "num_quantized_bins": 128},
                       "percentile": {"num_bins": 2048, "percentile": 99.999}}
METHODS = tuple(CALIBRATOR_DEFAULTS)


def calibrator_options(method: str, options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The calibrator options of ``method``: our defaults, overridden by ``options[method]``
    (``options`` maps method -> {option: value}; unknown names are an error)."""
    if method not in CALIBRATOR_DEFAULTS:
        raise ValueError(f"INT8 calibration '{method}' unknown; allowed: {list(METHODS)}")
    options = options or {}
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ValueError("options must map a calibration method to {option: value}")
    unknown = sorted(set(options) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown calibration method(s) {unknown}; allowed: {list(METHODS)}")
    defaults = CALIBRATOR_DEFAULTS[method]
    given = options.get(method) or {}
    bad = sorted(set(given) - set(defaults))
    if bad:
        raise ValueError(f"unknown {method} option(s) {bad}; allowed: {sorted(defaults)}")
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


class _Reader:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def compute_ranges(model: str | Path, feeds: list[dict[str, np.ndarray]], method: str, options: dict[str, Any],
                   op_types: list[str], cache: str | Path, symmetric: bool = True) -> Path:
    """Calibrate ``model`` on ``feeds`` with ``method`` and write ONNX Runtime's calibration
    cache (activation ranges, ``symmetric`` for TensorRT) to ``cache``, for
    ``quantize_int8(calibration_cache=)``."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if not feeds:
        raise ValueError(f"{model}: INT8 calibration needs at least one observation")
    extra = {"symmetric": symmetric, **calibrator_options(method, options)}
    with tempfile.TemporaryDirectory(prefix="vpp-calib-") as tmp:
        calibrator = create_calibrator(Path(model), list(op_types), augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                       calibrate_method=methods[method], extra_options=extra,
                                       use_external_data_format=True)
        calibrator.collect_data(_Reader(feeds))
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, Path(cache))
    return Path(cache)


def _array(init: onnx.TensorProto, base: Path) -> np.ndarray:
    if uses_external_data(init):
        load_external_data_for_tensor(init, str(base))
    return numpy_helper.to_array(init)


def activation_scales(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{tensor: {"scale", "zero_point", "range"}}`` of every QuantizeLinear in a QDQ graph
    (the activations: quantized weights are stored already quantized, without one).
    ``range`` is the float interval [low, high] the integer type covers: [-127, 127] * scale
    for symmetric int8 (TensorRT's), [0 - zp, 255 - zp] * scale for uint8 with zero point zp."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    # The TorchScript exporter (modelopt's Q/DQ graphs) writes scales as Constant nodes.
    inits.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR})
    out: dict[str, dict[str, Any]] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[1] not in inits or node.input[0] in inits:
            continue  # a weight's pair (modelopt keeps float weights behind one) is no activation
        scale = _array(inits[node.input[1]], path.parent).astype(np.float64)
        zero = _array(inits[node.input[2]], path.parent) if len(node.input) > 2 and node.input[2] in inits else None
        low, high = (0.0 - zero, 255.0 - zero) if zero is not None and zero.dtype == np.uint8 else (-127.0, 127.0)
        span = [(low * scale).tolist(), (high * scale).tolist()]
        entry: dict[str, Any] = {"scale": scale.tolist(),
                                 "zero_point": None if zero is None else zero.tolist(),
                                 "range": span}
        out[node.input[0]] = entry
    return out


def write_record(folder: str | Path, method: str, options: dict[str, Any], graphs: dict[str, dict[str, Any]],
                 observations: list[str], calibration_sha256: str) -> Path:
    """``<folder>/calibration.json``: how the INT8 graphs in ``folder`` were calibrated."""
    record = {"format": CALIBRATION_FORMAT, "method": method, "options": options,
              "calibration_set_sha256": calibration_sha256, "observations": observations, "graphs": graphs}
    path = Path(folder) / CALIBRATION_FILE
    path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return path
