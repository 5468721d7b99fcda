"""The one writer of an artifact's manifest (``vpp export`` and ``vpp calibrate`` both call
:func:`write_artifact_manifest`), against the schema of :mod:`vpp_edge.runtime.manifest`,
where the manifest's readers and checks live.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from vpp_edge import __version__
from vpp_edge.presets import Preset
from vpp_edge.runtime.manifest import FORMAT_NAME, FORMAT_VERSION, tokenizer_entry, write_manifest

TOOLS = ("torch", "onnx", "onnxruntime", "diffusers", "transformers")  # what the graphs are made with


def toolchain() -> dict[str, str]:
    """Python, machine and the versions of the tools that write the graphs."""
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for dist in TOOLS:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def write_artifact_manifest(folder: Path, *, preset: Preset, normalization: dict[str, Any], sigmas: list[float],
                            action_mode: str, graphs: dict[str, dict[str, Any]], source: str,
                            state_normalization: dict[str, Any] | None = None,
                            action_mode_ms: dict[str, float] | None = None, parity: str | None = None,
                            calibration: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``<folder>/manifest.json`` for the graphs in ``folder`` (the tokenizer must be
    saved there already) and return it. The optional parts are written when given:
    ``state_normalization`` for a policy that takes the robot state, ``action_mode_ms`` when
    the action mode was chosen by timing, ``parity`` (the report's file) when the artifact
    was gated, ``calibration`` (precision -> record file) for calibrated precisions."""
    optional = {"state_normalization": state_normalization, "action_mode_ms": action_mode_ms, "parity": parity,
                "calibration": calibration or None}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "vpp_edge_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "preset": preset.to_dict(),
        "normalization": normalization,
        **tokenizer_entry(folder),
        "text_max_length": preset.text.goal_length,  # ids the text graph takes
        "sigmas": [float(s) for s in sigmas],
        "action_mode": action_mode,
        "graphs": graphs,
        "engines": {},
        "toolchain": toolchain(),
        **{k: v for k, v in optional.items() if v is not None},
    }
    write_manifest(folder, manifest)
    return manifest
