"""The runtime config file: which artifact to run, on which backend, at which precision.

``vpp calibrate`` writes one for the configuration it recommends (``recommended.yaml``);
``vpp run --runtime-config FILE`` runs it, and deployment tooling reads the same file.
numpy/YAML only (the robot side imports this). Schema (format version 1)::

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vpp_edge import precisions
from vpp_edge.errors import VPPError
from vpp_edge.runtime.manifest import ArtifactError, read_manifest

FORMAT_NAME = "vpp-edge-runtime-config"
FORMAT_VERSION = 1
BACKENDS = ("auto", "onnxruntime", "openvino", "torch", "tensorrt")
_KEYS = {"format", "format_version", "artifact", "backend", "precision", "threads", "knobs", "measured", "sweep"}


class RuntimeConfigError(VPPError):
    """A runtime config file that is missing, malformed, or points at an unusable artifact."""


@dataclass(frozen=True)
class RuntimeConfig:
    artifact: Path  # resolved
    backend: str
    precision: str
    threads: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # knobs, measured, sweep (not used to run)

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        artifact = self.artifact
        if relative_to is not None:
            try:
                artifact = self.artifact.resolve().relative_to(relative_to.resolve())
            except ValueError:
                pass
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "artifact": str(artifact),
                "backend": self.backend, "precision": self.precision, "threads": self.threads, **self.info}


def write_runtime_config(path: str | Path, config: RuntimeConfig) -> Path:
    """Write ``config`` as YAML; the artifact path is stored relative to the file's folder
    when it lies below it (so the folder can be moved or copied to the robot whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("# Written by 'vpp calibrate': run it with 'vpp run --runtime-config " + path.name + "'.\n"
            + yaml.safe_dump(config.to_dict(relative_to=path.parent), sort_keys=False))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


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
    if data.get("format_version") != FORMAT_VERSION:
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
    info = {k: data[k] for k in ("knobs", "measured", "sweep") if k in data}
    return RuntimeConfig(artifact, data["backend"], data["precision"], threads, info)


def apply_to_args(args: Any) -> RuntimeConfig:
    """``vpp run --runtime-config``: the file's artifact, backend and precision replace
    ``--artifact``, ``--backend`` and ``--precision``."""
    config = load_runtime_config(args.runtime_config)
    args.artifact, args.backend, args.precision = config.artifact, config.backend, config.precision
    return config
