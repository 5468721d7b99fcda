"""The TensorRT backend's buffer, stream, CUDA-graph and device-chaining logic, run against
a stand-in of the vendor API at its boundary (no GPU here): a fake ``tensorrt`` module
with only the TensorRT 10.3 Python calls the wrapper may use (Runtime, Logger, nptype,
TensorIOMode, ICudaEngine's tensor queries, IExecutionContext.set_tensor_address and
execute_async_v3) and a fake cuda-python runtime module (cudaMalloc/Free, cudaMemcpyAsync,
streams, stream capture, graphs) whose device memory is host bytearrays. Anything else the
wrapper touched would be an AttributeError here.

The fake engines compute small, known functions of their inputs, so a wrong binding, a
stale buffer or a graph replayed on the wrong addresses gives wrong numbers.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest

from vpp_edge.runtime.predict_step import encode_text, predict_actions

# -- the vendor boundary: cuda-python's runtime module ------------------------------------


class _Enum:
    def __init__(self, **members):
        self.__dict__.update(members)


class FakeCudart(types.ModuleType):
    """cuda-python's runtime bindings: calls return (err, value...); err 0 is success."""

    def __init__(self):
        super().__init__("cuda.bindings.runtime")
        self.memory: dict[int, bytearray] = {}
        self.freed: list[int] = []
        self.calls: list[tuple] = []
        self.capture: list | None = None  # ops recorded while a stream captures
        self.graphs: dict[int, list] = {}
        self._next = 0x1000
        self.cudaMemcpyKind = _Enum(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)
        self.cudaStreamCaptureMode = _Enum(cudaStreamCaptureModeGlobal=0)

    def _handle(self) -> int:
        self._next += 0x1000
        return self._next

    def cudaMalloc(self, size):
        ptr = self._handle()
        self.memory[ptr] = bytearray(size)
        return 0, ptr

    def cudaFree(self, ptr):
        assert ptr in self.memory, f"free of an unknown or freed address {ptr:#x}"
        del self.memory[ptr]
        self.freed.append(ptr)
        return (0,)

    def cudaStreamCreate(self):
        return 0, self._handle()

    def cudaStreamDestroy(self, stream):
        self.calls.append(("stream_destroy", stream))
        return (0,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        assert isinstance(dst, int) and isinstance(src, int)
        self.calls.append(("memcpy", kind, dst, src, count))
        if kind == 1:
            self.memory[dst][:count] = ctypes.string_at(src, count)
        elif kind == 2:
            ctypes.memmove(dst, bytes(self.memory[src][:count]), count)
        else:
            self.memory[dst][:count] = self.memory[src][:count]
        return (0,)

    def cudaStreamSynchronize(self, stream):
        self.calls.append(("sync", stream))
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capture = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capture = self.capture, None
        handle = self._handle()
        self.graphs[handle] = graph
        return 0, handle

    def cudaGraphInstantiate(self, graph, flags):
        return 0, ("exec", graph)

    def cudaGraphLaunch(self, graph_exec, stream):
        self.calls.append(("graph_launch", graph_exec))
        for op in self.graphs[graph_exec[1]]:
            op()
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (0,)

    def cudaGraphDestroy(self, graph):
        return (0,)

    def view(self, ptr: int, shape, dtype) -> np.ndarray:
        return np.frombuffer(self.memory[ptr], dtype=dtype).reshape(shape)


# -- the vendor boundary: TensorRT 10.3's Python API -----------------------------------------

F32, I64, U8 = "float32", "int64", "uint8"
# name: (inputs, outputs, compute) -- tiny static shapes, known functions
ENGINES = {
    "text": ({"input_ids": ((1, 4), I64), "attention_mask": ((1, 4), I64)},
             {"condition": ((1, 4), F32), "goal": ((1, 2), F32)},
             lambda i: {"condition": (i["input_ids"] * i["attention_mask"]).astype(np.float32),
                        "goal": np.full((1, 2), float(i["input_ids"].sum()), np.float32)}),
    "tvp": ({"frames": ((1, 1, 2, 2, 3), U8), "condition": ((1, 4), F32), "noise": ((1, 8), F32)},
            {"features": ((1, 8), F32)},
            lambda i: {"features": (i["frames"].reshape(1, -1)[:, :8].astype(np.float32) + i["noise"]
                                    + i["condition"].sum())}),
    "former": ({"features": ((1, 8), F32)}, {"tokens": ((1, 4), F32)},
               lambda i: {"tokens": i["features"][:, :4] * 2 - i["features"][:, 4:]}),
    "action_sampler": ({"tokens": ((1, 4), F32), "goal": ((1, 2), F32), "action_noise": ((1, 3, 2), F32)},
                       {"actions": ((1, 3, 2), F32)},
                       lambda i: {"actions": i["action_noise"] + i["tokens"].sum() - i["goal"].sum()}),
    "action_context": ({"tokens": ((1, 4), F32), "goal": ((1, 2), F32)}, {"context": ((1, 6), F32)},
                       lambda i: {"context": np.concatenate([i["tokens"], i["goal"]], axis=1)}),
    "action_step": ({"context": ((1, 6), F32), "x": ((1, 3, 2), F32), "sigma": ((1,), F32),
                     "sigma_next": ((1,), F32)}, {"x_next": ((1, 3, 2), F32)},
                    lambda i: {"x_next": i["x"] * (i["sigma_next"] / i["sigma"]) + i["context"].mean()}),
}


def reference(graph: str, feeds: dict) -> dict:
    """What each fake engine computes, on the host: the expected numbers."""
    return {k: v.astype(np.float32) for k, v in ENGINES[graph][2](
        {k: np.asarray(v).astype(ENGINES[graph][0][k][1]) for k, v in feeds.items()}).items()}


class FakeContext:
    __slots__ = ("engine", "cudart", "addresses")

    def __init__(self, engine, cudart):
        self.engine, self.cudart, self.addresses = engine, cudart, {}

    def set_tensor_address(self, name: str, memory: int) -> bool:
        assert isinstance(memory, int) and name in self.engine.tensors
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert isinstance(stream_handle, int)
        op = self._compute
        if self.cudart.capture is not None:
            self.cudart.capture.append(op)  # captured: replayed by cudaGraphLaunch
        else:
            op()
        return True

    def _compute(self) -> None:
        inputs, outputs, fn = ENGINES[self.engine.graph]
        feeds = {n: self.cudart.view(self.addresses[n], s, d).copy() for n, (s, d) in inputs.items()}
        for name, value in fn(feeds).items():
            shape, dtype = outputs[name]
            self.cudart.view(self.addresses[name], shape, dtype)[...] = value.astype(dtype)


class FakeCudaEngine:
    __slots__ = ("graph", "tensors", "names", "cudart")

    def __init__(self, graph, cudart):
        inputs, outputs, _ = ENGINES[graph]
        self.graph, self.cudart = graph, cudart
        self.tensors = {**{n: (s, d, "INPUT") for n, (s, d) in inputs.items()},
                        **{n: (s, d, "OUTPUT") for n, (s, d) in outputs.items()}}
        self.names = list(self.tensors)

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_shape(self, name: str) -> tuple:
        return self.tensors[name][0]

    def get_tensor_dtype(self, name: str) -> str:
        return self.tensors[name][1]

    def get_tensor_mode(self, name: str) -> str:
        return self.tensors[name][2]

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self, self.cudart)


def fake_tensorrt(cudart: FakeCudart) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0.30"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, serialized_engine: bytes):
            return FakeCudaEngine(json.loads(serialized_engine)["graph"], cudart)

    trt.Logger, trt.Runtime = Logger, Runtime
    trt.TensorIOMode = _Enum(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = np.dtype
    return trt


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """The fake vendor modules installed where `import tensorrt` and cuda-python's runtime
    module are looked up, and an artifact whose manifest lists one fake plan per graph."""
    cudart = FakeCudart()
    cuda_pkg, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda_pkg.__path__, bindings.__path__ = [], []
    for name, module in (("tensorrt", fake_tensorrt(cudart)), ("cuda", cuda_pkg), ("cuda.bindings", bindings),
                         ("cuda.bindings.runtime", cudart)):
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # found by importlib.util.find_spec
        monkeypatch.setitem(sys.modules, name, module)
    from vpp_edge.export.tensorrt_build import machine_info

    machine = machine_info()
    engines = {}
    for graph in ENGINES:
        plan = tmp_path / "engines" / "fp16" / f"{graph}.plan"
        plan.parent.mkdir(parents=True, exist_ok=True)
        plan.write_bytes(json.dumps({"graph": graph}).encode())
        engines[f"fp16/{graph}"] = {"file": str(plan.relative_to(tmp_path)),
                                    "sha256": hashlib.sha256(plan.read_bytes()).hexdigest(), **machine}
    artifact = types.SimpleNamespace(root=tmp_path, manifest={"engines": engines})
    return cudart, artifact


def _copies(cudart: FakeCudart, kind: int) -> list[tuple]:
    return [c for c in cudart.calls if c[0] == "memcpy" and c[1] == kind]


def test_cudart_import_takes_either_layout(monkeypatch):
    from vpp_edge.errors import MissingDependencyError
    from vpp_edge.runtime.engines import tensorrt as backend

    old = types.ModuleType("cuda.cudart")  # cuda-python < 12.6: a submodule `import cuda` does not load
    cuda_pkg = types.ModuleType("cuda")
    cuda_pkg.__path__ = []
    monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
    monkeypatch.setitem(sys.modules, "cuda.cudart", old)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # absent
    assert backend.cudart_module() is old
    new = types.ModuleType("cuda.bindings.runtime")
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.ModuleType("cuda.bindings"))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", new)
    assert backend.cudart_module() is new
    for name in ("cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match="needs cuda-python"):
        backend.cudart_module()


def test_engines_chain_on_the_device_and_only_the_chunk_comes_home(gpu):
    from vpp_edge.runtime.engines.tensorrt import DeviceTensor, TrtEngine

    cudart, artifact = gpu
    engine = TrtEngine(artifact, "fp16", sync_stages=False).load()
    assert sorted(engine.links) == sorted([
        ("text", "condition", "tvp"), ("text", "goal", "action_sampler"), ("tvp", "features", "former"),
        ("former", "tokens", "action_sampler"), ("text", "goal", "action_context"),
        ("former", "tokens", "action_context"), ("action_context", "context", "action_step")])
    allocated = len(cudart.memory)

    rng = np.random.default_rng(0)
    ids, mask = np.array([[3, 1, 4, 1]]), np.array([[1, 1, 1, 0]])
    condition, goal = encode_text(engine.run, ids, mask)
    assert isinstance(condition, DeviceTensor) and isinstance(goal, DeviceTensor)
    ref_text = reference("text", {"input_ids": ids, "attention_mask": mask})

    def ref_run(graph, feeds):
        return reference(graph, {k: ref_text[k] if k in ref_text and isinstance(v, DeviceTensor) else v
                                 for k, v in feeds.items()})

    sigmas = [4.0, 2.0, 1.0, 0.0 + 1e-3]
    for step in range(3):  # 1st run: TensorRT directly; then the captured CUDA graphs
        frames = rng.integers(0, 255, (1, 1, 2, 2, 3), dtype=np.uint8)
        noise, action_noise = rng.standard_normal((1, 8), np.float32), rng.standard_normal((1, 3, 2), np.float32)
        cudart.calls.clear()
        got = predict_actions(engine.run, condition, goal, frames, noise, action_noise, sigmas, "sampler")
        want = predict_actions(ref_run, ref_text["condition"], ref_text["goal"], frames, noise, action_noise,
                               sigmas, "sampler")
        np.testing.assert_allclose(got, want, rtol=1e-6)
        # host -> device: frames and the two noises only; device -> host: the action chunk only
        h2d = {c[2] for c in _copies(cudart, 1)}
        assert h2d == {engine._runners["tvp"].device["frames"], engine._runners["tvp"].device["noise"],
                       engine._runners["action_sampler"].device["action_noise"]}
        assert [c[4] for c in _copies(cudart, 2)] == [got.nbytes] and not _copies(cudart, 3)
        assert sum(c[0] == "sync" for c in cudart.calls) == 1  # one wait per step, for the chunk (sync_stages off)
        launches = sum(c[0] == "graph_launch" for c in cudart.calls)
        assert launches == (0 if step == 0 else 3)  # tvp, former, action_sampler replayed as graphs

        got = predict_actions(engine.run, condition, goal, frames, noise, action_noise, sigmas, "step")
        want = predict_actions(ref_run, ref_text["condition"], ref_text["goal"], frames, noise, action_noise,
                               sigmas, "step")
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert len(cudart.memory) == allocated  # no allocation per step

    features = engine.run("tvp", {"frames": frames, "condition": condition, "noise": noise})["features"]
    np.testing.assert_allclose(np.asarray(features),  # on request, a device tensor comes home
                               reference("tvp", {"frames": frames, "condition": ref_text["condition"],
                                                 "noise": noise})["features"])
    engine.close()
    assert not cudart.memory  # every buffer freed, the shared ones once
    assert len(cudart.freed) == len(set(cudart.freed)) and ("stream_destroy",) == cudart.calls[-1][:1]


def test_stage_timings_wait_for_each_engine_by_default(gpu):
    from vpp_edge.runtime.engines.tensorrt import TrtEngine

    cudart, artifact = gpu
    engine = TrtEngine(artifact, "fp16").load()
    condition, goal = encode_text(engine.run, np.array([[1, 2, 3, 4]]), np.ones((1, 4), np.int64))
    rng = np.random.default_rng(2)
    cudart.calls.clear()
    predict_actions(engine.run, condition, goal, rng.integers(0, 255, (1, 1, 2, 2, 3), dtype=np.uint8),
                    rng.standard_normal((1, 8), np.float32), rng.standard_normal((1, 3, 2), np.float32), [1.0],
                    "sampler")
    assert sum(c[0] == "sync" for c in cudart.calls) == 3  # tvp, former, action_sampler: each stage's own time
    assert [c[4] for c in _copies(cudart, 2)] == [3 * 2 * 4] and not _copies(cudart, 3)  # still only the chunk


def test_a_device_tensor_fed_to_an_unlinked_input_is_copied_on_the_device(gpu):
    from vpp_edge.runtime.engines.tensorrt import TrtEngine

    cudart, artifact = gpu
    engine = TrtEngine(artifact, "fp16", graphs=("tvp", "former"), use_cuda_graph=False).load()
    rng = np.random.default_rng(1)
    condition = rng.standard_normal((1, 4), np.float32)
    feeds = {"frames": rng.integers(0, 255, (1, 1, 2, 2, 3), dtype=np.uint8), "condition": condition,
             "noise": rng.standard_normal((1, 8), np.float32)}
    features = engine.run("tvp", feeds)["features"]
    cudart.calls.clear()
    tokens = engine.run("former", {"features": features})["tokens"]
    assert not _copies(cudart, 3) and not _copies(cudart, 1)
    np.testing.assert_allclose(tokens, reference("former", {"features": reference("tvp", feeds)["features"]})["tokens"])
    assert not any(c[0] == "graph_launch" for c in cudart.calls)  # use_cuda_graph=False

    # a consumer bound to its own buffer (e.g. loaded separately) gets a device-to-device copy
    other = TrtEngine(artifact, "fp16", graphs=("former",), use_cuda_graph=False).load()
    cudart.calls.clear()
    tokens = other.run("former", {"features": features})["tokens"]
    assert len(_copies(cudart, 3)) == 1 and not _copies(cudart, 1)
    np.testing.assert_allclose(tokens, reference("former", {"features": reference("tvp", feeds)["features"]})["tokens"])


def test_network_flags_make_explicit_batch_networks_on_tensorrt_8_and_10():
    from vpp_edge.export.tensorrt_build import network_flags

    trt10 = types.SimpleNamespace(__version__="10.3.0.30")
    trt8 = types.SimpleNamespace(__version__="8.6.2.3",
                                 NetworkDefinitionCreationFlag=types.SimpleNamespace(EXPLICIT_BATCH=0))
    assert network_flags(trt10) == 0  # TensorRT 10: explicit batch is the only mode
    assert network_flags(trt8) == 1  # 1 << EXPLICIT_BATCH: the ONNX parser needs it on 8.x
