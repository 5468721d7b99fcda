"""Optional components: detect them, and fail with an install hint when one is needed.

Heavy or hardware-specific parts are extras, never hard dependencies; code that needs
one calls :func:`require` and the user gets one clear line instead of an ImportError
from deep inside a stack.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass

from vpp_edge.errors import MissingDependencyError


@dataclass(frozen=True)
class Extra:
    module: str
    distribution: str
    purpose: str
    install: str


EXTRAS: dict[str, Extra] = {
    e.module: e
    for e in (
        Extra("torch", "torch", "model, training, export, PyTorch backend", "make install"),
        Extra("onnxruntime", "onnxruntime", "ONNX Runtime backend (CPU)", "pip install onnxruntime"),
        Extra("openvino", "openvino", "OpenVINO backend (CPU: bf16, NNCF INT8)", "pip install openvino"),
        Extra("nncf", "nncf", "NNCF INT8 quantisation for OpenVINO (export)", "pip install nncf"),
        Extra("modelopt", "nvidia-modelopt", "INT8 Q/DQ for TensorRT by PTQ in PyTorch (export, paper scale)",
              "pip install 'vpp-edge[modelopt]'"),
        Extra("tensorrt", "tensorrt", "TensorRT engines", "JetPack on Jetson; pip install tensorrt on x86"),
        Extra("torch_tensorrt", "torch-tensorrt", "torch-tensorrt compilation", "pip install torch-tensorrt"),
        Extra("polygraphy", "polygraphy", "TensorRT engine building/inspection", "pip install polygraphy"),
        Extra("nvidia.dali", "nvidia-dali-cuda120", "DALI camera decoding", "pip install nvidia-dali-cuda120"),
        Extra("metaworld", "metaworld", "MetaWorld simulator bridge and evaluation", "make install"),
        Extra("zmq", "pyzmq", "ZeroMQ link runtime <-> bridge", "pip install pyzmq"),
        Extra("rerun", "rerun-sdk", "rerun recordings of a run (--rerun FILE.rrd)", "pip install rerun-sdk==0.41.0"),
        Extra("franky", "franky-control", "Franka Panda driver", "pip install franky-control"),
        Extra("xarm", "xarm-python-sdk", "xArm driver", "pip install xarm-python-sdk"),
        Extra("xhand_controller", "xhand_controller", "XHand driver (RobotEra SDK, not on PyPI)",
              "install RobotEra's xhand_controller wheel"),
    )
}


def is_available(module: str) -> bool:
    """True if ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package of a dotted name
        return False


def version(module: str) -> str | None:
    extra = EXTRAS.get(module)
    try:
        return importlib.metadata.version(extra.distribution if extra else module)
    except importlib.metadata.PackageNotFoundError:
        return None


def require(module: str, feature: str | None = None):
    """Import and return ``module``, or raise :class:`MissingDependencyError` with a hint."""
    if not is_available(module):
        extra = EXTRAS.get(module)
        what = feature or (extra.purpose if extra else module)
        hint = f"; install it with: {extra.install}" if extra else ""
        raise MissingDependencyError(f"{what} needs the optional package '{module}', which is not installed{hint}")
    return importlib.import_module(module)


def report() -> list[tuple[str, str, str]]:
    """(module, version or 'missing', purpose) for every known extra."""
    return [(m, (version(m) or "installed") if is_available(m) else "missing", e.purpose) for m, e in EXTRAS.items()]
