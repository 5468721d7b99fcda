"""Engine backends and the factory that picks one from the artifact and the config."""

from __future__ import annotations

from vpp_edge.errors import MissingDependencyError
from vpp_edge.extras import is_available

from ..artifact import Artifact
from .base import Engine

BACKENDS = {"tensorrt": "tensorrt", "onnxruntime": "onnxruntime", "openvino": "openvino", "torch": "torch"}
# openvino: the FP32 graphs, run in bf16 where the CPU has it natively (see engines/openvino.py).
DEFAULT_PRECISION = {"tensorrt": "fp16", "onnxruntime": "fp32", "openvino": "fp32", "torch": "fp32"}


def available_backends() -> list[str]:
    return [name for name, module in BACKENDS.items() if is_available(module)]


def create_engine(artifact: Artifact, backend: str = "auto", precision: str | None = None, **options) -> Engine:
    """An unloaded engine for ``backend`` (``auto``: TensorRT when it and engines for this
    artifact are present, else ONNX Runtime). ``threads`` (an option, 0: the backend's
    choice) sets the CPU inference threads of ONNX Runtime, OpenVINO and torch; TensorRT,
    on the GPU, has none."""
    threads = options.pop("threads", 0) or 0
    available = available_backends()
    if backend == "auto":
        has_engines = bool(artifact.manifest.get("engines"))
        backend = "tensorrt" if "tensorrt" in available and has_engines else "onnxruntime"
    if backend not in BACKENDS:
        raise ValueError(f"backend '{backend}' unknown; allowed: auto, {', '.join(BACKENDS)}")
    if backend not in available:
        raise MissingDependencyError(f"backend '{backend}' is not installed here; available: "
                                     f"{', '.join(available) or 'none'}")
    precision = precision or DEFAULT_PRECISION[backend]
    if backend == "tensorrt":
        from .tensorrt import TrtEngine

        return TrtEngine(artifact, precision, **options)
    if backend == "onnxruntime":
        from .onnxruntime import OrtEngine

        return OrtEngine(artifact, precision, threads=threads, **options)
    if backend == "openvino":
        from .openvino import OvEngine

        return OvEngine(artifact, precision, threads=threads, **options)
    from .torch_backend import TorchEngine

    if threads:
        import torch

        torch.set_num_threads(threads)

    return TorchEngine(artifact, precision, **options)


__all__ = ["Engine", "available_backends", "create_engine"]
