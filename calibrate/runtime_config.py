"""The runtime config file: which artifact to run, on which backend, at which precision.

``vpp calibrate`` writes one for the configuration it recommends (``recommended.yaml``);
``vpp run --runtime-config FILE`` runs it, and deployment tooling reads the same file.
numpy/YAML only (the robot side imports this). The config is the runtime's
:class:`~vpp_edge.runtime.config.RuntimeConfig` (runtime/config.py); this module adds the
calibration's checks of the artifact. Schema (format version 1; version 2 adds every key of
the runtime's config: robot, cameras, smoothing, instruction, ...)::

    format: vpp-edge-runtime-config
    format_version: 1
    artifact: recommended/artifact   # export artifact folder; relative paths are relative to this file
    backend: onnxruntime             # auto | onnxruntime | openvino | torch | tensorrt: what was measured
    precision: int8                  # a precision of vpp_edge.precisions: graphs of the artifact to run
    threads: 2                       # CPU threads the measurement used (0: the backend's choice)
    knobs: {...}                     # informational: every knob of the chosen point
    measured: {...}                  # informational: latency (ms), errors, memory (MB) as measured
    sweep: {...}                     # informational: sweep name, point id, objective, tolerance, machine

The model knobs (frames, views, sampler steps, ...) are baked into the artifact (its
manifest's preset, sigmas and action mode), so ``artifact`` + ``precision`` fully define
what runs. A deployment target may run another ``backend`` (TensorRT engines built on a
Jetson) with the same artifact and precision; the measured figures then no longer apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vpp_edge import precisions
from vpp_edge.errors import ConfigError
from vpp_edge.runtime.config import (FORMAT_NAME, FORMAT_VERSION, READS_VERSIONS, RuntimeConfig,
                                     config_from_dict)
from vpp_edge.runtime.config import write_runtime_config as _write
from vpp_edge.runtime.manifest import ArtifactError, read_manifest

BACKENDS = ("auto", "onnxruntime", "openvino", "torch", "tensorrt")
_KEYS = {"format", "format_version", "artifact", "backend", "precision", "threads", "knobs", "measured", "sweep",
         *RuntimeConfig.__dataclass_fields__}  # format 2: every key of the runtime's config
RuntimeConfigError = ConfigError  # the one ConfigError (issue 21); the old name stays importable


def write_runtime_config(path: str | Path, config: RuntimeConfig) -> Path:
    """Write ``config`` (the runtime's :class:`~vpp_edge.runtime.config.RuntimeConfig`) as YAML;
    the artifact path is stored relative to the file's folder when it lies below it."""
    return _write(path, config, f"# Written by 'vpp calibrate': run it with 'vpp run --runtime-config {Path(path).name}'.\n")


def load_runtime_config(path: str | Path) -> RuntimeConfig:
    """Read and check a runtime config; the artifact must exist and hold the precision."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RuntimeConfigError(f"runtime config not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RuntimeConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise RuntimeConfigError(f"{path}: not a runtime config (expected 'format: {FORMAT_NAME}')")
    if data.get("format_version") not in READS_VERSIONS:
        raise RuntimeConfigError(f"{path}: format_version {data.get('format_version')!r} is not supported "
                                 f"(this vpp-edge reads {FORMAT_VERSION})")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise RuntimeConfigError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    missing = [k for k in ("artifact", "backend", "precision") if not data.get(k)]
    if missing:
        raise RuntimeConfigError(f"{path}: missing {missing}")
    if data["backend"] not in BACKENDS:
        raise RuntimeConfigError(f"{path}: backend '{data['backend']}' unknown; allowed: {list(BACKENDS)}")
    if data["precision"] not in precisions.names():
        raise RuntimeConfigError(f"{path}: precision '{data['precision']}' unknown; "
                                 f"allowed: {list(precisions.names())}")
    threads = data.get("threads") or 0
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise RuntimeConfigError(f"{path}: threads must be a non-negative integer, got {threads!r}")
    artifact = Path(data["artifact"])
    if not artifact.is_absolute():
        artifact = path.parent / artifact
    try:
        manifest = read_manifest(artifact)
    except ArtifactError as exc:
        raise RuntimeConfigError(f"{path}: artifact {artifact}: {exc}") from None
    if not any(k.startswith(f"{data['precision']}/") for k in manifest["graphs"]):
        raise RuntimeConfigError(f"{path}: artifact {artifact} has no {data['precision']} graphs")
    return config_from_dict(data, str(path), base=path.parent)  # the other keys checked as the runtime does


def apply_to_args(args: Any) -> RuntimeConfig:
    """``vpp run --runtime-config``: the file's artifact, backend and precision replace
    ``--artifact``, ``--backend`` and ``--precision``."""
    config = load_runtime_config(args.runtime_config)
    args.artifact, args.backend, args.precision = config.artifact, config.backend, config.precision
    return config
