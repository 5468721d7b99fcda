"""ONNX Runtime backend: CPU or CUDA execution provider, IO binding into buffers
allocated once per graph."""

from __future__ import annotations

import numpy as np

from vpp_edge.extras import require

from . import ENGINES
from .base import Engine

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OrtEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, *args, device: str = "cpu", threads: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.device = device
        self.threads = threads
        self._sessions: dict = {}
        self._bindings: dict = {}
        self._outputs: dict = {}

    def load(self) -> "OrtEngine":
        ort = require("onnxruntime", "the ONNX Runtime backend")
        if self.device not in PROVIDERS:
            raise ValueError(f"onnxruntime device '{self.device}' unknown; allowed: {sorted(PROVIDERS)}")
        provider = PROVIDERS[self.device]
        available = ort.get_available_providers()
        if provider not in available:
            raise RuntimeError(f"ONNX Runtime here has no {provider} (available: {', '.join(available)}); "
                               "install onnxruntime-gpu for CUDA")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        # Idle worker threads must sleep, not spin: spinning steals the cores the control
        # loop and the camera threads need between inferences.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        ort_device = "cuda" if self.device == "cuda" else "cpu"
        for name in self.graphs:
            path, _, outputs = self.artifact.graph(self.precision, name)
            providers = [provider] if provider == PROVIDERS["cpu"] else [provider, PROVIDERS["cpu"]]
            sess = ort.InferenceSession(str(path), opts, providers=providers)
            binding = sess.io_binding()
            values = {}
            for spec in outputs:  # output buffers allocated once, reused every call
                values[spec.name] = ort.OrtValue.ortvalue_from_shape_and_type(list(spec.shape), np.dtype(spec.dtype),
                                                                              ort_device, 0)
                binding.bind_ortvalue_output(spec.name, values[spec.name])
            self._sessions[name], self._bindings[name], self._outputs[name] = sess, binding, values
        return self

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess, binding = self._sessions[graph], self._bindings[graph]
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        sess.run_with_iobinding(binding)
        return {name: value.numpy() for name, value in self._outputs[graph].items()}

    def close(self) -> None:
        self._sessions.clear()
        self._bindings.clear()
        self._outputs.clear()


@ENGINES.register("onnxruntime", requires="onnxruntime", default_precision="fp32", cpu=True)
def _build(artifact, precision: str, threads: int = 0, **options) -> Engine:
    return OrtEngine(artifact, precision, threads=threads, **options)
