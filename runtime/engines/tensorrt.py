"""TensorRT backend: deserialised engines with device buffers allocated once, one CUDA
stream for every engine, each static-shape engine captured as a CUDA graph after its
first run, and the tensors passed between engines left on the device.

Between the TVP, the Video Former and the action head nothing goes through host memory:
an output that another loaded engine takes as an input of the same name, shape and dtype
(``condition``/``goal`` of the text encoder, ``features`` of the TVP, ``tokens`` of the
Former, ``context`` of the action context) is returned as a :class:`DeviceTensor`, and the
consumer's input is bound to the producer's buffer at load time (no copy at all). Only
outputs no engine consumes come back to the host: the action chunk (``actions``, or
``x_next`` of each step of the one-step sampler, which the inpainting edits on the host).
With ``sync_stages`` (the default) each engine's run waits for the stream, so the
per-stage wall times the runtime reports (tvp_ms, former_ms, ...) are the stages' own; with
``sync_stages=False`` engines are only queued and the stream is synchronised just before
host outputs are read (the earlier stages' times then measure queueing).

No torch: device memory and the stream come from cuda-python's runtime bindings.

API boundary, checked against the documentation: every TensorRT call below exists in
TensorRT 10.3's Python API (``tensorrt.Runtime``, ``Logger``, ``nptype``, ``TensorIOMode``;
``Runtime.deserialize_cuda_engine``; ``ICudaEngine.num_io_tensors``, ``get_tensor_name``,
``get_tensor_shape``, ``get_tensor_dtype``, ``get_tensor_mode``,
``create_execution_context``; ``IExecutionContext.set_tensor_address(name, int)`` and
``execute_async_v3(stream_handle: int) -> bool``), and every CUDA call in the runtime
module of cuda-python 12.6 (``cuda.bindings.runtime`` and ``cuda.cudart``, checked by
import) and 13.x: ``cudaMalloc``, ``cudaFree``, ``cudaMemcpyAsync``, ``cudaStreamCreate``,
``cudaStreamDestroy``, ``cudaStreamSynchronize``, ``cudaStreamBeginCapture``,
``cudaStreamEndCapture``, ``cudaGraphInstantiate(graph, flags)``, ``cudaGraphLaunch``,
``cudaGraphExecDestroy``, ``cudaGraphDestroy``. tests/test_tensorrt_engine.py runs this
file against a stand-in of exactly those calls (no GPU here).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from vpp_edge.errors import MissingDependencyError
from ..manifest import ArtifactError, check_engine_fits, machine_info, verify_entry
from vpp_edge.extras import require

from . import ENGINES
from .base import Engine

# Where cuda-python keeps its runtime (cudart) bindings, newest layout first: 12.6+ and
# 13.x have ``cuda.bindings.runtime`` (13 dropped ``cuda.cudart``); older releases only
# ``cuda.cudart``, a submodule that `import cuda` does not load (an attribute lookup on the
# package fails), so each is imported as a module.
CUDART_MODULES = ("cuda.bindings.runtime", "cuda.cudart")


def cudart_module() -> ModuleType:
    """cuda-python's CUDA runtime bindings, whichever layout the installed version has."""
    for name in CUDART_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError("the TensorRT backend needs cuda-python (its CUDA runtime bindings, "
                                 f"{' or '.join(CUDART_MODULES)}): it is in the robot lock "
                                 "(requirements/robot-jp6.txt); pip install cuda-python==<your CUDA version>")


def _check(result: Any) -> Any:
    """The value of a cuda-python call ``(err, value...)``; raises on an error code."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (rest or None)


@dataclass(frozen=True)
class DeviceTensor:
    """An engine output left in device memory for the next engine. ``np.asarray`` on it
    copies it to the host (for code that needs the values, e.g. parity checks)."""

    runner: "_EngineRunner"
    name: str
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.runner.fetch(self.name)
        return out if dtype is None else out.astype(dtype)


class _EngineRunner:
    """One engine: its context, device buffers, host buffers and CUDA graph."""

    def __init__(self, trt: ModuleType, cudart: ModuleType, runtime: Any, plan: bytes, stream: Any,
                 use_cuda_graph: bool, sync: bool = True):
        self.cudart, self.stream, self.use_cuda_graph, self.sync = cudart, stream, use_cuda_graph, sync
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError("TensorRT could not deserialise the engine (built with another version?)")
        self.context = self.engine.create_execution_context()
        self.inputs: dict[str, np.ndarray] = {}  # host staging buffers, by tensor name
        self.outputs: dict[str, np.ndarray] = {}
        self.device: dict[str, int] = {}  # device address bound to each tensor
        self.owned: set[str] = set()  # buffers this runner allocated (the rest belong to a producer)
        self.on_device: set[str] = set()  # outputs another engine consumes: they stay on the device
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            host = np.empty(shape, dtype)
            self._bind(name, int(_check(cudart.cudaMalloc(host.nbytes))))
            self.owned.add(name)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs)[name] = host
        self.graph = self.graph_exec = None

    def _bind(self, name: str, ptr: int) -> None:
        self.device[name] = ptr
        if not self.context.set_tensor_address(name, ptr):
            raise RuntimeError(f"TensorRT refused the address of tensor '{name}'")

    def takes(self, name: str, producer: "_EngineRunner") -> bool:
        """Read input ``name`` straight from ``producer``'s output buffer (same shape and
        dtype), freeing this runner's own; before the first run (graphs capture addresses)."""
        mine, theirs = self.inputs.get(name), producer.outputs.get(name)
        if mine is None or theirs is None or mine.shape != theirs.shape or mine.dtype != theirs.dtype:
            return False
        if name in self.owned:
            _check(self.cudart.cudaFree(self.device[name]))
            self.owned.discard(name)
        self._bind(name, producer.device[name])
        producer.on_device.add(name)
        return True

    def _copy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        _check(self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def _feed(self, name: str, value: Any) -> None:
        kinds = self.cudart.cudaMemcpyKind
        host = self.inputs[name]
        if isinstance(value, DeviceTensor) and value.dtype == host.dtype and value.nbytes == host.nbytes:
            if value.ptr != self.device[name]:  # bound to another buffer: copy on the device
                self._copy(self.device[name], value.ptr, host.nbytes, kinds.cudaMemcpyDeviceToDevice)
            return
        np.copyto(host, np.asarray(value), casting="same_kind")
        self._copy(self.device[name], host.ctypes.data, host.nbytes, kinds.cudaMemcpyHostToDevice)

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        for name in self.inputs:
            self._feed(name, feeds[name])
        if self.graph_exec is not None:
            _check(self.cudart.cudaGraphLaunch(self.graph_exec, self.stream))
        elif not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execution failed")
        elif self.use_cuda_graph:  # the first run warmed up; capture the static-shape step now
            mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
            _check(self.cudart.cudaStreamBeginCapture(self.stream, mode))
            captured = self.context.execute_async_v3(int(self.stream))
            self.graph = _check(self.cudart.cudaStreamEndCapture(self.stream))
            if not captured:
                raise RuntimeError("TensorRT execution failed while capturing its CUDA graph")
            self.graph_exec = _check(self.cudart.cudaGraphInstantiate(self.graph, 0))
        out: dict[str, Any] = {}
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, host in self.outputs.items():
            if name in self.on_device:
                out[name] = DeviceTensor(self, name, self.device[name], host.shape, host.dtype)
            else:
                self._copy(host.ctypes.data, self.device[name], host.nbytes, d2h)
                out[name] = host
        if self.sync or len(out) > len(self.on_device):  # host outputs are read after this
            _check(self.cudart.cudaStreamSynchronize(self.stream))
        return out

    def fetch(self, name: str) -> np.ndarray:
        """A copy of output ``name`` on the host (waits for the stream)."""
        host = np.empty_like(self.outputs[name])
        self._copy(host.ctypes.data, self.device[name], host.nbytes, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return host

    def close(self) -> None:
        if self.graph_exec is not None:
            self.cudart.cudaGraphExecDestroy(self.graph_exec)
            self.cudart.cudaGraphDestroy(self.graph)
            self.graph = self.graph_exec = None
        for name in sorted(self.owned):
            self.cudart.cudaFree(self.device[name])
        self.owned.clear()
        self.device.clear()


class TrtEngine(Engine):
    backend = "tensorrt"

    def __init__(self, *args, use_cuda_graph: bool = True, sync_stages: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_cuda_graph, self.sync_stages = use_cuda_graph, sync_stages
        self._runners: dict[str, _EngineRunner] = {}
        self._cudart: ModuleType | None = None
        self._stream: Any = None

    def load(self) -> "TrtEngine":
        trt = require("tensorrt", "the TensorRT backend")
        cudart = self._cudart = cudart_module()
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
            self._runners[name] = _EngineRunner(trt, cudart, runtime, plan, self._stream, self.use_cuda_graph,
                                                self.sync_stages)
        self.links = link_on_device(self._runners)
        return self

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        """Outputs of ``graph``: numpy arrays for the host, :class:`DeviceTensor` for what
        another engine consumes (pass it on as a feed; ``np.asarray`` copies it home)."""
        return self._runners[graph].run(feeds)

    def close(self) -> None:
        for runner in self._runners.values():
            runner.close()
        self._runners.clear()
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None


def link_on_device(runners: dict[str, _EngineRunner]) -> list[tuple[str, str, str]]:
    """Bind every input that another engine produces (same name, shape, dtype) to that
    engine's output buffer: (producer, tensor, consumer) for each link made."""
    links = []
    for consumer_name, consumer in runners.items():
        for tensor in consumer.inputs:
            for producer_name, producer in runners.items():
                if producer is not consumer and consumer.takes(tensor, producer):
                    links.append((producer_name, tensor, consumer_name))
                    break
    return links


@ENGINES.register("tensorrt", requires="tensorrt", default_precision="fp16", cpu=False)
def _build(artifact, precision: str, threads: int = 0, **options) -> Engine:
    return TrtEngine(artifact, precision, **options)  # on the GPU: no CPU threads to set
