"""OpenVINO backend (CPU): the artifact's ONNX graphs compiled by OpenVINO's CPU plugin.

The graphs are the ones the other backends run (``fp32/*.onnx``, or the NNCF INT8 graphs
``int8_ov/*.onnx``); OpenVINO reads ONNX directly, so the artifact holds no second format.
What is chosen here rather than at export:

* the inference precision: ``bf16`` where the CPU has native bf16 (AVX512_BF16 or AMX),
  ``f32`` otherwise; ``inference_precision`` overrides it (``f32`` when bf16 costs too
  much accuracy for a model, ``bf16`` to insist and fail where it is not native);
* the thread count (``threads``, 0: OpenVINO's choice) and the performance hint
  (``latency``: one stream, what a control loop wants; ``throughput`` for batch work);
* the model cache: compiled blobs in ``cache_dir`` (default ``~/.cache/vpp-edge/openvino``,
  ``$VPP_OPENVINO_CACHE`` overrides, an empty string turns it off), keyed by OpenVINO on the
  graph and the settings, so a restart skips the compilation.

Robot side: numpy and openvino only, no torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from vpp_edge.extras import require

from . import ENGINES
from .base import Engine

# Our names -> OpenVINO's element type names for INFERENCE_PRECISION_HINT.
INFERENCE_PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16"}
HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
CACHE_ENV = "VPP_OPENVINO_CACHE"


def default_cache_dir() -> Path:
    """Where compiled models are cached: ``$VPP_OPENVINO_CACHE``, else
    ``$XDG_CACHE_HOME/vpp-edge/openvino`` (``~/.cache/vpp-edge/openvino``)."""
    if os.environ.get(CACHE_ENV) is not None:
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vpp-edge" / "openvino"


def choose_inference_precision(capabilities: Iterable[str], requested: str = "auto") -> str:
    """The CPU plugin's inference precision (``bf16`` or ``f32``) for a CPU with these
    ``OPTIMIZATION_CAPABILITIES``: ``auto`` takes bf16 where it is native, else f32; an
    explicit ``f32``/``fp32``/``bf16`` is kept, and bf16 on a CPU without it is refused
    (OpenVINO would quietly run f32 and the figures would lie)."""
    caps = {c.upper() for c in capabilities}
    if requested == "auto":
        return "bf16" if "BF16" in caps else "f32"
    if requested not in INFERENCE_PRECISIONS:
        raise ValueError(f"OpenVINO inference precision '{requested}' unknown; allowed: auto, "
                         f"{', '.join(INFERENCE_PRECISIONS)}")
    chosen = INFERENCE_PRECISIONS[requested]
    if chosen == "bf16" and "BF16" not in caps:
        raise ValueError(f"this CPU has no native bf16 (OpenVINO capabilities: {', '.join(sorted(caps))}); "
                         "use inference precision 'f32' or 'auto'")
    return chosen


def compile_config(inference_precision: str, threads: int = 0, hint: str = "latency",
                   pin_threads: bool | None = None) -> dict[str, str]:
    """Properties for ``Core.compile_model`` on the CPU (string keys, OpenVINO's names).
    ``pin_threads``: pin the inference threads to cores (None: OpenVINO's choice)."""
    if hint not in HINTS:
        raise ValueError(f"OpenVINO performance hint '{hint}' unknown; allowed: {', '.join(HINTS)}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    config = {"PERFORMANCE_HINT": HINTS[hint], "INFERENCE_PRECISION_HINT": inference_precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    if pin_threads is not None:
        config["ENABLE_CPU_PINNING"] = "YES" if pin_threads else "NO"
    return config


def cpu_summary() -> str:
    """One line for ``vpp doctor``: OpenVINO's version, the CPU, its capabilities and the
    inference precision the backend would choose on it."""
    ov = require("openvino", "the OpenVINO backend")
    core = ov.Core()
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return (f"openvino {ov.get_version()}: {core.get_property('CPU', 'FULL_DEVICE_NAME')}, capabilities "
            f"{' '.join(caps)}; FP32 graphs run in {choose_inference_precision(caps)}")


class OvEngine(Engine):
    """One compiled model and one infer request per graph; inputs are shared with OpenVINO
    (no copy) and outputs are views of the request's buffers, valid until the next call of
    that graph, as with the ONNX Runtime backend."""

    backend = "openvino"

    def __init__(self, *args, threads: int = 0, hint: str = "latency", inference_precision: str = "auto",
                 cache_dir: str | Path | None = None, device: str = "CPU", pin_threads: bool | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.threads = threads
        self.hint = hint
        self.pin_threads = pin_threads
        self.requested_precision = inference_precision
        self.inference_precision = ""  # chosen at load
        self.cache_dir = default_cache_dir() if cache_dir is None else (Path(cache_dir) if cache_dir else None)
        self.device = device.upper()
        self.compile_ms: dict[str, float] = {}  # per graph: read + compile (or load from the cache)
        self._requests: dict = {}
        self._outputs: dict[str, list[str]] = {}

    def load(self) -> "OvEngine":
        ov = require("openvino", "the OpenVINO backend")
        if self.device != "CPU":
            raise ValueError(f"OpenVINO device '{self.device}' is not supported here; allowed: CPU")
        core = ov.Core()
        caps = core.get_property(self.device, "OPTIMIZATION_CAPABILITIES")
        self.inference_precision = choose_inference_precision(caps, self.requested_precision)
        config = compile_config(self.inference_precision, self.threads, self.hint, self.pin_threads)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(self.cache_dir)})
        for name in self.graphs:
            path, _, outputs = self.artifact.graph(self.precision, name)
            start = time.perf_counter()
            # From the path (not read_model first), so a cached blob skips reading the graph too.
            compiled = core.compile_model(str(path), self.device, config)
            self.compile_ms[name] = (time.perf_counter() - start) * 1e3
            self._requests[name] = compiled.create_infer_request()
            self._outputs[name] = [spec.name for spec in outputs]
        return self

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._requests[graph]
        inputs = {name: np.ascontiguousarray(value) for name, value in feeds.items()}
        result = request.infer(inputs, share_inputs=True, share_outputs=True)
        return {name: result[name] for name in self._outputs[graph]}

    def close(self) -> None:
        self._requests.clear()
        self._outputs.clear()


@ENGINES.register("openvino", requires="openvino", default_precision="fp32", cpu=True)
def _build(artifact, precision: str, threads: int = 0, **options) -> Engine:
    return OvEngine(artifact, precision, threads=threads, **options)
