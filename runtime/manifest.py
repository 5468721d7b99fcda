"""The artifact manifest: its schema, what every graph and engine is, where it came from,
and checks that a file is the one the manifest describes and an engine fits this machine.

Standard library only: the runtime (and the stdlib-only deploy agent) read and verify
artifacts with this module. :func:`write_manifest` refuses a manifest that does not follow
:data:`SCHEMA`; :func:`read_manifest` checks what it loads against it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpp_edge import precisions
from vpp_edge.errors import VPPError
from vpp_edge.files import read_json
from vpp_edge.graph_spec import ACTION_MODES, GRAPHS

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "vpp-edge-artifact"
FORMAT_VERSION = 1


class ArtifactError(VPPError):
    """An artifact is incomplete, tampered with, or does not fit this machine."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and numpy dtype name of one graph input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"])


@dataclass(frozen=True)
class Field:
    """One key of the manifest: its JSON type(s), whether a reader needs it and whether the
    writer always writes it (the others are written when they apply)."""

    types: tuple[type, ...]
    read: bool  # required on load
    written: bool  # always written
    doc: str


# The manifest's schema, format version FORMAT_VERSION. A reader ignores keys it does not know
# (an artifact may carry notes); the writer writes none.
SCHEMA: dict[str, Field] = {
    "format": Field((str,), True, True, f"'{FORMAT_NAME}'"),
    "format_version": Field((int,), True, True, "this schema's version"),
    "vpp_edge_version": Field((str,), False, True, "the vpp-edge that wrote it"),
    "created": Field((str,), False, True, "ISO 8601 UTC time of writing"),
    "source": Field((str,), False, True, "checkpoint and command it came from"),
    "preset": Field((dict,), True, True, "the model preset (Preset.to_dict)"),
    "normalization": Field((dict,), False, True, "the action normaliser (ActionNormalizer.to_dict)"),
    "state_normalization": Field((dict,), False, False, "the robot-state normaliser of a policy that takes one"),
    "tokenizer": Field((str,), False, True, "the tokenizer file"),
    "tokenizer_sha256": Field((str,), False, False, "its sha256 (written since it was recorded)"),
    "text_max_length": Field((int,), False, True, "token ids the text graph takes"),
    "sigmas": Field((list,), True, True, "the action sampler's noise levels, first to last"),
    "action_mode": Field((str,), False, True, f"how the action head runs: {' | '.join(ACTION_MODES)}"),
    "action_mode_ms": Field((dict,), False, False, "median ms per action mode, when the mode was chosen by timing"),
    "parity": Field((str,), False, False, "the parity report (gated exports; calibrate measures its own)"),
    "calibration": Field((dict,), False, False, "precision -> its INT8 calibration record"),
    "graphs": Field((dict,), True, True, "'<precision>/<graph>' -> graph entry (file, sha256, IO specs)"),
    "engines": Field((dict,), False, True, "'<precision>/<graph>' -> TensorRT engine entry (vpp build-engines)"),
    "toolchain": Field((dict,), False, True, "versions of the tools that wrote the graphs"),
    "cpu_default": Field((dict,), False, False, "the fastest CPU engine that passes its gate (export-openvino)"),
}
ENTRY_KEYS = ("file", "sha256", "precision", "inputs", "outputs")  # every graph and engine entry has them


def schema_errors(manifest: Any, written: bool = False) -> list[str]:
    """What is wrong with ``manifest`` by :data:`SCHEMA` (empty: nothing). ``written``: as the
    writer must write it (every always-written key, no unknown key, complete graph entries)."""
    if not isinstance(manifest, dict):
        return [f"a manifest is a JSON object, not {type(manifest).__name__}"]
    errors = []
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        errors.append(f"not a {FORMAT_NAME} v{FORMAT_VERSION} manifest")
    for key, field in SCHEMA.items():
        if key not in manifest:
            if field.read or (written and field.written):
                errors.append(f"missing '{key}'")
        elif not isinstance(manifest[key], field.types) or isinstance(manifest[key], bool):
            errors.append(f"'{key}' must be {' or '.join(t.__name__ for t in field.types)} ({field.doc}), "
                          f"got {type(manifest[key]).__name__}")
    if written:
        errors += [f"unknown key '{k}' (not in the v{FORMAT_VERSION} schema)" for k in manifest if k not in SCHEMA]
    if isinstance(manifest.get("action_mode"), str) and manifest["action_mode"] not in ACTION_MODES:
        errors.append(f"action_mode '{manifest['action_mode']}' unknown; allowed: {', '.join(ACTION_MODES)}")
    if isinstance(manifest.get("sigmas"), list) and not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) for s in manifest["sigmas"]):
        errors.append("'sigmas' must be numbers")
    for section in ("graphs", "engines"):
        for key, entry in (manifest.get(section) or {}).items() if isinstance(manifest.get(section), dict) else ():
            errors += [f"{section} '{key}': {e}" for e in entry_errors(key, entry, complete=written)]
    return errors


def entry_errors(key: str, entry: Any, complete: bool = True) -> list[str]:
    """What is wrong with one graph/engine entry ``key`` (``<precision>/<graph>``)."""
    precision, _, graph = str(key).partition("/")
    errors = []
    if precision not in precisions.names():
        errors.append(f"precision '{precision}' unknown; allowed: {', '.join(precisions.names())}")
    if graph not in GRAPHS:
        errors.append(f"graph '{graph}' unknown; allowed: {', '.join(GRAPHS)}")
    if not isinstance(entry, dict):
        return [*errors, "an entry is a JSON object"]
    if complete:
        errors += [f"missing '{k}'" for k in ENTRY_KEYS if k not in entry]
    return errors


def read_manifest(artifact: str | Path) -> dict[str, Any]:
    """Parse ``<artifact>/manifest.json`` and check it against :data:`SCHEMA`."""
    path = Path(artifact) / MANIFEST_FILE
    manifest = read_json(path, ArtifactError, f"is {artifact} an export artifact? run 'vpp export'")
    errors = schema_errors(manifest)
    if errors:
        raise ArtifactError(f"{path}: {'; '.join(errors)}")
    return manifest


def manifest_precisions(manifest: dict[str, Any]) -> list[str]:
    """The precisions an artifact holds graphs of (the folder part of ``fp32/tvp``)."""
    return sorted({key.split("/")[0] for key in manifest["graphs"]})


def write_manifest(artifact: str | Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest through a temporary file and a rename (never half-written), after
    checking it against :data:`SCHEMA` as written (a writer's bug never reaches a robot)."""
    errors = schema_errors(manifest, written=True)
    if errors:
        raise ArtifactError(f"{artifact}: refusing to write an invalid manifest: {'; '.join(errors)}")
    path = Path(artifact) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    tmp.replace(path)
    return path


def confined(artifact: str | Path, relative: Any, key: str) -> Path:
    """``artifact / relative``, refused unless it is a relative path that stays inside the
    artifact folder (a manifest is data from disk: it must not point the runtime elsewhere)."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute() or \
            ".." in Path(relative).parts:
        raise ArtifactError(f"{artifact}: '{key}' names {relative!r}, not a path inside the artifact")
    root = Path(artifact).resolve()
    path = (root / relative).resolve()
    if root not in path.parents:
        raise ArtifactError(f"{artifact}: '{key}' names {relative!r}, which leads outside the artifact")
    return Path(artifact) / relative


def verify_file(artifact: str | Path, relative: Any, sha256: Any, key: str) -> Path:
    """The confined file ``relative`` after checking that it exists and has hash ``sha256``."""
    path = confined(artifact, relative, key)
    if not path.is_file():
        raise ArtifactError(f"{path}: file of '{key}' is missing")
    digest = sha256_file(path)
    if digest != sha256:
        raise ArtifactError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                            f"{str(sha256)[:12]}... for '{key}' (file changed after export)")
    return path


def verify_entry(artifact: str | Path, key: str, entry: dict[str, Any]) -> Path:
    """The file of a graph/engine entry, after checking it exists and its hash matches
    (and those of its external data)."""
    path = verify_file(artifact, entry["file"], entry["sha256"], key)
    for extra in entry.get("external_data", []):
        verify_file(artifact, extra["file"], extra["sha256"], f"{key} external data")
    return path


def tokenizer_entry(artifact: str | Path) -> dict[str, str]:
    """The manifest's record of the tokenizer file written into ``artifact``."""
    from vpp_edge.tokenizer import TOKENIZER_FILE  # numpy and tokenizers: not for the stdlib-only deploy agent

    return {"tokenizer": TOKENIZER_FILE, "tokenizer_sha256": sha256_file(Path(artifact) / TOKENIZER_FILE)}


def machine_info() -> dict[str, Any]:
    """TensorRT version, GPU name and compute capability of this machine (None when unknown)."""
    info: dict[str, Any] = {"tensorrt_version": None, "gpu_name": None, "compute_capability": None}
    try:
        import tensorrt as trt

        info["tensorrt_version"] = trt.__version__
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()[0]
        name, cap = (x.strip() for x in out.split(","))
        info.update(gpu_name=name, compute_capability=cap)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        model = Path("/proc/device-tree/model")  # Jetson: no nvidia-smi GPU query
        if model.is_file():
            info["gpu_name"] = model.read_text(errors="ignore").strip("\x00 \n")
    return info


def check_engine_fits(key: str, entry: dict[str, Any], machine: dict[str, Any]) -> None:
    """Refuse an engine built for another GPU or TensorRT version (engines are not portable)."""
    for field in ("tensorrt_version", "gpu_name", "compute_capability"):
        built, here = entry.get(field), machine.get(field)
        if built != here:
            raise ArtifactError(f"engine '{key}' was built with {field}={built!r}, this machine has {here!r}; "
                                "rebuild it here with 'vpp build-engines'")
