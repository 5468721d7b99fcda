"""The artifact manifest: what every graph and engine is, where it came from, and checks
that a file is the one the manifest describes and an engine fits this machine.

numpy/JSON only: the runtime reads and verifies artifacts with this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpp_edge.errors import VPPError
from vpp_edge.files import read_json

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "vpp-edge-artifact"
FORMAT_VERSION = 1
# int8: Q/DQ graphs for TensorRT; int8_cpu: Q/DQ graphs for ONNX Runtime's CPU kernels.
PRECISIONS = ("fp32", "fp16", "int8", "int8_cpu")
INT8_PRECISIONS = ("int8", "int8_cpu")
# Added to an exported artifact afterwards: int8_ov, NNCF INT8 for OpenVINO (export/openvino_int8.py).
RUNTIME_PRECISIONS = (*PRECISIONS, "int8_ov")


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


def read_manifest(artifact: str | Path) -> dict[str, Any]:
    """Parse and sanity-check ``<artifact>/manifest.json``."""
    path = Path(artifact) / MANIFEST_FILE
    manifest = read_json(path, ArtifactError, f"is {artifact} an export artifact? run 'vpp export'")
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} manifest")
    for key in ("preset", "graphs", "sigmas"):
        if key not in manifest:
            raise ArtifactError(f"{path}: missing '{key}'")
    return manifest


def manifest_precisions(manifest: dict[str, Any]) -> list[str]:
    """The precisions an artifact holds graphs of (the folder part of ``fp32/tvp``)."""
    return sorted({key.split("/")[0] for key in manifest["graphs"]})


def write_manifest(artifact: str | Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest through a temporary file and a rename (never half-written)."""
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


def check_engine_fits(key: str, entry: dict[str, Any], machine: dict[str, Any]) -> None:
    """Refuse an engine built for another GPU or TensorRT version (engines are not portable)."""
    for field in ("tensorrt_version", "gpu_name", "compute_capability"):
        built, here = entry.get(field), machine.get(field)
        if built != here:
            raise ArtifactError(f"engine '{key}' was built with {field}={built!r}, this machine has {here!r}; "
                                "rebuild it here with 'vpp build-engines'")
