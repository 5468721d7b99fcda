"""TensorRT backend: deserialised engines with device buffers allocated once, one CUDA
stream, and the static-shape graph captured as a CUDA graph after the first run.

Kept thin and explicit so it can be checked on a real Jetson (TensorRT 10 API,
cuda-python runtime bindings); nothing here can run on machines without an NVIDIA GPU.
"""

from __future__ import annotations

import numpy as np

from vpp_edge.export.manifest import ArtifactError, check_engine_fits, verify_entry
from vpp_edge.extras import require

from .base import Engine


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        cudart = require("cuda", "TensorRT buffers (cuda-python)").cudart
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class _EngineRunner:
    """One engine: its context, fixed device buffers, host outputs and optional CUDA graph."""

    def __init__(self, trt, cudart, runtime, plan: bytes, stream, use_cuda_graph: bool):
        self.cudart, self.stream, self.use_cuda_graph = cudart, stream, use_cuda_graph
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError("TensorRT could not deserialise the engine (built with another version?)")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs, self.device = {}, {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            host = np.empty(shape, dtype)
            self.device[name] = _check(cudart.cudaMalloc(host.nbytes))
            self.context.set_tensor_address(name, self.device[name])
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs)[name] = host
        self.graph_exec = None

    def _copy(self, dst, src, nbytes, kind):
        _check(self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        h2d, d2h = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, host in self.inputs.items():
            np.copyto(host, feeds[name], casting="same_kind")
            self._copy(self.device[name], host.ctypes.data, host.nbytes, h2d)
        if self.graph_exec is not None:
            _check(self.cudart.cudaGraphLaunch(self.graph_exec, self.stream))
        elif not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")
        elif self.use_cuda_graph:  # the first run warmed up; capture the static-shape step now
            mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
            _check(self.cudart.cudaStreamBeginCapture(self.stream, mode))
            self.context.execute_async_v3(self.stream)
            graph = _check(self.cudart.cudaStreamEndCapture(self.stream))
            self.graph_exec = _check(self.cudart.cudaGraphInstantiate(graph, 0))
        for name, host in self.outputs.items():
            self._copy(host.ctypes.data, self.device[name], host.nbytes, d2h)
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return self.outputs

    def close(self) -> None:
        for ptr in self.device.values():
            self.cudart.cudaFree(ptr)
        self.device.clear()


class TrtEngine(Engine):
    backend = "tensorrt"

    def __init__(self, *args, use_cuda_graph: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_cuda_graph = use_cuda_graph
        self._runners: dict[str, _EngineRunner] = {}

    def load(self) -> "TrtEngine":
        trt = require("tensorrt", "the TensorRT backend")
        from vpp_edge.export.tensorrt_build import machine_info

        cudart = _cudart()
        machine = machine_info()
        engines = self.artifact.manifest.get("engines", {})
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._stream = _check(cudart.cudaStreamCreate())
        for name in self.graphs:
            key = f"{self.precision}/{name}"
            if key not in engines:
                raise ArtifactError(f"no TensorRT engine '{key}' in {self.artifact.root}; run 'vpp build-engines'")
            check_engine_fits(key, engines[key], machine)
            plan = verify_entry(self.artifact.root, key, engines[key]).read_bytes()
            self._runners[name] = _EngineRunner(trt, cudart, runtime, plan, self._stream, self.use_cuda_graph)
        return self

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._runners[graph].run(feeds)

    def close(self) -> None:
        for runner in self._runners.values():
            runner.close()
        self._runners.clear()
