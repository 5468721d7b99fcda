"""Sweep definitions (``calibrate/sweeps/<name>.yaml``) and their expansion into points.

A sweep file has these sections (every one optional except ``grid``)::

    model:     {preset: tiny, seed: 0, checkpoint: null}
    data:      {calibration_samples: 8, heldout_samples: 4, heldout_episodes: 1, roots: null}
    int8:      {exclude_modules: [...], exclude_nodes: [], op_types: [...], graphs: [...], options: {}}
    measure:   {warmup: 2, repeats: 10, threads: 2, timeout_s: 600}
    recommend: {objective: p50, tolerance: {action_mse: ..., action_max_abs: ..., feature_cosine: ...}}
    base:      {knob: value}        # values of knobs a sub-grid leaves out (default: the trained model's)
    grid:                           # a list of sub-grids; the sweep is the union of their products
      - {precision: [fp32, fp16, int8], dit_steps: [3, 5, 10]}

Knob names and values are checked here (see :mod:`vpp_edge.calibrate.knobs`), before
anything is exported: a typo costs nothing.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vpp_edge.errors import VPPError
from vpp_edge.precisions import reference
from vpp_edge.presets import Preset

from . import knobs as K

SWEEP_DIR = Path(__file__).with_name("sweeps")

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"preset": "tiny", "seed": 0, "checkpoint": None},
    "data": {"calibration_samples": 8, "heldout_samples": 4, "heldout_episodes": 1, "roots": None},
    "int8": {"exclude_modules": None, "exclude_nodes": [], "op_types": None, "graphs": None, "options": {}},
    "measure": {"warmup": 2, "repeats": 10, "threads": 2, "timeout_s": 600},
    "recommend": {"objective": "p50",
                  "tolerance": {"action_mse": 1e-3, "action_max_abs": 0.1, "feature_cosine": 0.99}},
    "base": {},
}


class SweepSpecError(VPPError, ValueError):
    """A sweep file that cannot be run as written."""


@dataclass(frozen=True)
class Point:
    """One configuration to measure: a value for every knob."""

    id: str
    values: dict[str, Any]
    label: str


@dataclass(frozen=True)
class SweepSpec:
    name: str
    source: str
    sections: dict[str, dict[str, Any]]
    grid: list[dict[str, list[Any]]]

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections[section]

    def context(self) -> dict[str, Any]:
        """What every measured figure depends on besides the point's knobs: results made
        under another context are not reused."""
        return {k: self.sections[k] for k in ("model", "data", "int8", "measure")}

    def context_key(self) -> str:
        return hashlib.sha256(json.dumps(self.context(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def available_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> SweepSpec:
    """A sweep by name (``calibrate/sweeps``) or path, with section ``overrides`` applied."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.is_file():
        if str(name_or_path) not in available_sweeps():
            raise SweepSpecError(f"unknown sweep '{name_or_path}' (shipped: {', '.join(available_sweeps())}; "
                                 "or give a YAML path)")
        path = SWEEP_DIR / f"{name_or_path}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepSpecError(f"sweep file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise SweepSpecError(f"{path}: not valid YAML ({exc})") from None
    return spec_from_dict(data, str(path), overrides)


def spec_from_dict(data: Any, source: str = "sweep", overrides: dict[str, dict[str, Any]] | None = None) -> SweepSpec:
    if not isinstance(data, dict):
        raise SweepSpecError(f"{source}: expected a mapping at top level")
    allowed = set(DEFAULTS) | {"name", "grid", "description"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SweepSpecError(f"{source}: unknown section(s) {unknown}; allowed: {sorted(allowed)}")
    sections = copy.deepcopy(DEFAULTS)
    for layer in (data, overrides or {}):
        for name, values in layer.items():
            if name not in DEFAULTS or values is None:
                continue
            if not isinstance(values, dict):
                raise SweepSpecError(f"{source}: section '{name}' must be a mapping")
            if name != "base":
                bad = sorted(set(values) - set(DEFAULTS[name]))
                if bad:
                    raise SweepSpecError(f"{source}: unknown key(s) {bad} in '{name}'; allowed: "
                                         f"{sorted(DEFAULTS[name])}")
            sections[name].update(values)
    for key in ("calibration_samples", "heldout_samples"):
        n = sections["data"][key]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            from .dataset import EmptyCalibrationSetError

            raise EmptyCalibrationSetError(f"{source}: data.{key} must be a positive integer (an empty "
                                           f"{'calibration' if key.startswith('cal') else 'held-out'} set "
                                           f"measures nothing), got {n!r}")
    for key in ("warmup", "repeats", "threads"):
        n = sections["measure"][key]
        if isinstance(n, bool) or not isinstance(n, int) or n < (1 if key == "repeats" else 0):
            raise SweepSpecError(f"{source}: measure.{key} must be a {'positive' if key == 'repeats' else 'non-negative'}"
                                 f" integer, got {n!r}")
    _check_int8(sections["int8"], source)
    grid = data.get("grid")
    if not isinstance(grid, list) or not grid:
        raise SweepSpecError(f"{source}: 'grid' must be a non-empty list of sub-grids (knob: [values])")
    subgrids = []
    for n, sub in enumerate(grid):
        if not isinstance(sub, dict) or not sub:
            raise SweepSpecError(f"{source}: grid entry {n} must be a non-empty mapping of knob -> values")
        out = {}
        for knob, values in sub.items():
            if knob not in K.KNOBS:
                raise K.unknown_knob(str(knob), f"{source}: grid entry {n}: ")
            values = values if isinstance(values, list) else [values]
            if not values:
                raise SweepSpecError(f"{source}: grid entry {n}: knob '{knob}' has no values")
            out[knob] = values
        subgrids.append(out)
    for knob in sections["base"]:
        if knob not in K.KNOBS:
            raise K.unknown_knob(str(knob), f"{source}: base: ")
    return SweepSpec(str(data.get("name") or Path(source).stem), source, sections, subgrids)


def _check_int8(int8: dict[str, Any], source: str) -> None:
    import re

    from vpp_edge.export.qdq import METHODS, calibrator_options

    try:
        for method in METHODS:
            calibrator_options(method, int8.get("options"))
    except ValueError as exc:
        raise SweepSpecError(f"{source}: int8.options: {exc}") from None
    for pattern in [*(int8.get("exclude_nodes") or []), *(int8.get("exclude_modules") or [])]:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise SweepSpecError(f"{source}: int8 exclusion {pattern!r} is not a regular expression ({exc})") from None


def _point_id(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def expand(spec: SweepSpec, preset: Preset, available_backends: list[str] | None = None
           ) -> tuple[list[Point], list[tuple[Point, str]]]:
    """The sweep's points (deduplicated, model configurations kept together) and the
    points skipped with the reason (backend not installed, combination not supported)."""
    base = K.base_values(preset)
    for knob, value in spec["base"].items():
        K.check_value(knob, value, preset, f"{spec.source}: base: ")
        base[knob] = value
    points: dict[str, Point] = {}
    skipped: dict[str, tuple[Point, str]] = {}
    for n, sub in enumerate(spec.grid):
        names = list(sub)
        for combo in itertools.product(*(sub[k] for k in names)):
            values = dict(base)
            for knob, value in zip(names, combo):
                K.check_value(knob, value, preset, f"{spec.source}: grid entry {n}: ")
                values[knob] = value
            values = K.normalize(values)
            point = Point(_point_id(values), values, K.describe(values, base))
            why = _unsupported(values, available_backends)
            if why:
                skipped.setdefault(point.id, (point, why))
            else:
                points.setdefault(point.id, point)
    model_key = {p.id: json.dumps({k: p.values[k] for k in K.MODEL_KNOBS}, sort_keys=True) for p in points.values()}
    first = {}
    for p in points.values():
        first.setdefault(model_key[p.id], len(first))
    ordered = sorted(points.values(), key=lambda p: first[model_key[p.id]])  # stable: grid order inside
    return ordered, list(skipped.values())


def _unsupported(values: dict[str, Any], available: list[str] | None) -> str | None:
    backend = values["backend"]
    if available is not None and backend not in available:
        return f"backend '{backend}' is not installed here (available: {', '.join(available) or 'none'})"
    if backend == "torch" and values["precision"] != reference():  # it runs the checkpoint, not graphs
        return "the PyTorch backend runs the FP32 model only"
    if backend == "tensorrt":
        return "TensorRT points need engines built on the target ('vpp build-engines'); sweep them there"
    return None
