"""Engine backends (a registry, :data:`ENGINES`) and the factory that picks one from the
artifact and the config.

A backend is one module with an :class:`~.base.Engine` subclass and a builder decorated
``@ENGINES.register(name, requires=<importable module>, default_precision=..., cpu=...)``,
plus its line in ``ENGINES``' built-ins below. Builders take ``(artifact, precision,
threads, **options)``; ``threads`` (0: the backend's choice) is theirs to apply or ignore.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from vpp_edge.errors import ConfigError, MissingDependencyError
from vpp_edge.extras import is_available
from vpp_edge.registry import Registry

from ..artifact import Artifact
from .base import Engine

log = logging.getLogger(__name__)

EngineBuilder = Callable[..., Engine]

ENGINES: Registry[EngineBuilder] = Registry("engine backend", {
    "tensorrt": "vpp_edge.runtime.engines.tensorrt",
    "onnxruntime": "vpp_edge.runtime.engines.onnxruntime",
    "openvino": "vpp_edge.runtime.engines.openvino",
    "torch": "vpp_edge.runtime.engines.torch_backend",
})
BACKENDS = ENGINES  # the names (``in``, iteration), as before the registry


def backend_info(name: str) -> dict[str, Any]:
    """``requires`` (module that must import), ``default_precision``, ``cpu`` of a backend."""
    return ENGINES.info(name)


def default_precision(backend: str) -> str:
    """What ``backend`` runs when no precision is asked for (TensorRT fp16; the CPU backends fp32;
    openvino: the FP32 graphs, run in bf16 where the CPU has it natively, see engines/openvino.py)."""
    return backend_info(backend)["default_precision"]


def available_backends() -> list[str]:
    return [name for name in ENGINES.names() if is_available(backend_info(name)["requires"])]


def choose_backend(artifact: Artifact, precision: str | None, available: list[str]) -> tuple[str, str | None, str]:
    """``--backend auto``: (backend, precision, why). TensorRT when it is installed and engines
    were built for this artifact here; else the artifact's ``cpu_default`` (the fastest CPU
    engine that passed its gate, measured at export: export/openvino_int8.py) when it is
    installed here, its graphs are in the artifact (a deploy bundle may leave them home) and
    no other precision was asked for; else ONNX Runtime."""
    if "tensorrt" in available and artifact.manifest.get("engines"):
        return "tensorrt", precision, "TensorRT engines built for this artifact"
    why = "TensorRT not installed" if "tensorrt" not in available else "no TensorRT engines in the artifact"
    cpu = artifact.manifest.get("cpu_default") or {}
    backend, cpu_precision = cpu.get("backend"), cpu.get("precision")
    shipped = cpu_precision in artifact.precisions()
    if backend in available and shipped and (precision is None or precision == cpu_precision):
        ms = (cpu.get("median_ms") or {}).get(f"{backend}/{cpu_precision}")
        measured = f", {ms:.1f} ms" if isinstance(ms, (int, float)) else ""
        where = f" on {cpu['measured_on']}" if cpu.get("measured_on") else ""
        return backend, cpu_precision, (f"{why}; the artifact's cpu_default (fastest CPU engine measured at "
                                        f"export{where}{measured})")
    if backend is not None and backend not in available:
        why += f"; the artifact's cpu_default {backend}/{cpu_precision} is not installed here"
    elif backend is not None and not shipped:
        why += f"; the artifact's cpu_default {backend}/{cpu_precision} has no graphs here"
    elif backend is not None:
        why += f"; {precision} asked for, not the artifact's cpu_default {backend}/{cpu_precision}"
    return "onnxruntime", precision, f"{why}: ONNX Runtime"


def create_engine(artifact: Artifact, backend: str = "auto", precision: str | None = None, **options) -> Engine:
    """An unloaded engine for ``backend`` (``auto``: see :func:`choose_backend`; the choice is
    logged in one line and kept as ``engine.choice``). ``threads`` (an option, 0: the
    backend's choice) sets the CPU inference threads of ONNX Runtime, OpenVINO and torch;
    TensorRT, on the GPU, has none."""
    threads = options.pop("threads", 0) or 0
    available = available_backends()
    choice = None
    if backend == "auto":
        backend, precision, why = choose_backend(artifact, precision, available)
        choice = f"backend auto: {backend}/{precision or default_precision(backend)} ({why})"
        log.info("%s", choice)
    if backend not in ENGINES:
        raise ConfigError(f"backend '{backend}' unknown; allowed: auto, {', '.join(ENGINES)}")
    if backend not in available:
        raise MissingDependencyError(f"backend '{backend}' is not installed here; available: "
                                     f"{', '.join(available) or 'none'}")
    engine = ENGINES.get(backend)(artifact, precision or default_precision(backend), threads, **options)
    engine.choice = choice
    return engine


__all__ = ["ENGINES", "Engine", "available_backends", "choose_backend", "create_engine", "default_precision"]
