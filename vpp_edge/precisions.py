"""The precisions an artifact holds graphs in, as a registry: one :class:`PrecisionSpec` per
precision says how its graphs are derived, which parity gate they must pass, which engine
backends run them and from which graphs TensorRT builds engines of it. Export, calibration,
the runtime, deployment and the reports ask this module instead of keeping lists.

A new precision is one :func:`register` call (here for the built-in ones) plus, when it is
derived in a new way, the code that derives it (``export/derive.py`` for what ``vpp export``
writes itself). Standard library only: the robot side and ``vpp --help`` import it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

# How a precision's graphs come to be.
TRACED = "traced"  # exported from PyTorch (the reference every other precision derives from)
FLOAT16 = "float16"  # ONNX float16 conversion of the traced graphs
QDQ = "qdq"  # ONNX Runtime static quantisation (Q/DQ nodes), calibrated on observations
NNCF = "nncf"  # NNCF quantisation into OpenVINO IR, added to an exported artifact afterwards
DERIVATIONS = (TRACED, FLOAT16, QDQ, NNCF)
GATES = ("fp32", "fp16", "int8")  # which thresholds of the export options' ``gates`` apply


@dataclass(frozen=True)
class QdqFormat:
    """How a Q/DQ precision is quantised for the engine that runs it. Weights are always
    int8, symmetric, per output channel."""

    activation: str  # onnxruntime.quantization.QuantType name of the activations
    symmetric: bool  # symmetric activation ranges (zero point 0)
    ort_fusions: bool  # quantise (and keep float) ONNX Runtime's fused graph, runnable there only
    options: str | None = None  # export options section whose op_types/graphs/exclude_modules replace int8's


@dataclass(frozen=True)
class PrecisionSpec:
    name: str
    summary: str  # one line for help texts
    derivation: str  # one of DERIVATIONS
    gate: str  # one of GATES
    engines: tuple[str, ...]  # the backends it is made for (ONNX Runtime and OpenVINO read any ONNX graph, at no gain)
    tensorrt_source: str | None = None  # precision of the graphs TensorRT builds these engines from
    qdq: QdqFormat | None = None  # the Q/DQ format (derivation QDQ only)
    colour: str = "#7f7f7f"  # its colour in the calibration plots

    @property
    def exported(self) -> bool:
        """Whether ``vpp export`` writes it (the others are added to an artifact afterwards)."""
        return self.derivation in (TRACED, FLOAT16, QDQ)

    @property
    def calibrated(self) -> bool:
        """Whether ``vpp export``/``vpp calibrate`` calibrate it on observations (a method applies)."""
        return self.derivation == QDQ


_REGISTRY: dict[str, PrecisionSpec] = {}


def register(spec: PrecisionSpec) -> PrecisionSpec:
    """Add ``spec``; a second, different spec under a taken name is a bug and refused."""
    if spec.derivation not in DERIVATIONS or spec.gate not in GATES:
        raise ValueError(f"precision '{spec.name}': derivation must be one of {DERIVATIONS}, gate one of {GATES}")
    if (spec.derivation == QDQ) != (spec.qdq is not None):
        raise ValueError(f"precision '{spec.name}': a Q/DQ format goes with derivation '{QDQ}' and only with it")
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ValueError(f"precision '{spec.name}' is registered already")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove ``name`` (a test that registers an example cleans up after itself)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> PrecisionSpec:
    """The spec of ``name``; ValueError naming the closest precision and all of them otherwise."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"precision '{name}' unknown{hint}; allowed: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """Every precision an artifact may hold, in registration order (fp32 first)."""
    return tuple(_REGISTRY)


def exported() -> tuple[str, ...]:
    """The precisions ``vpp export`` writes (fp32 first: every other one derives from it)."""
    return tuple(n for n, s in _REGISTRY.items() if s.exported)


def calibrated() -> tuple[str, ...]:
    """The precisions quantised with a calibration method (``vpp export``'s INT8 ones)."""
    return tuple(n for n, s in _REGISTRY.items() if s.calibrated)


def reference() -> str:
    """The precision every other one is derived from and compared with."""
    return next(n for n, s in _REGISTRY.items() if s.derivation == TRACED)


def engine_sources() -> dict[str, str]:
    """TensorRT engine precision -> precision of the ONNX graphs it is built from."""
    return {n: s.tensorrt_source for n, s in _REGISTRY.items() if s.tensorrt_source}


def describe(selection: tuple[str, ...] | None = None) -> str:
    """``fp32 (...) | fp16 (...)``: the precisions with their summaries, for help texts."""
    return " | ".join(f"{n} ({_REGISTRY[n].summary})" for n in (selection or names()))


register(PrecisionSpec("fp32", "the traced graphs", TRACED, "fp32", ("onnxruntime", "openvino", "torch"),
                       colour="#1f77b4"))
register(PrecisionSpec("fp16", "float16 weights and activations", FLOAT16, "fp16", ("tensorrt",),
                       tensorrt_source="fp32", colour="#ff7f0e"))
# TensorRT's explicit quantisation: symmetric int8 activations (zero point 0).
register(PrecisionSpec("int8", "Q/DQ for TensorRT", QDQ, "int8", ("tensorrt",), tensorrt_source="int8",
                       qdq=QdqFormat("QInt8", symmetric=True, ort_fusions=False), colour="#2ca02c"))
# ONNX Runtime's CPU kernels (U8S8, VNNI where the CPU has it): uint8 activations with a zero
# point, on a graph with ONNX Runtime's contrib fusions (attention, gelu, norms).
register(PrecisionSpec("int8_cpu", "Q/DQ for ONNX Runtime on a CPU", QDQ, "int8", ("onnxruntime",),
                       qdq=QdqFormat("QUInt8", symmetric=False, ort_fusions=True, options="int8_cpu"),
                       colour="#9467bd"))
# NNCF INT8 for OpenVINO, written by export/openvino_int8.py into an exported artifact.
register(PrecisionSpec("int8_ov", "NNCF INT8 for OpenVINO", NNCF, "int8", ("openvino",), colour="#8c564b"))
