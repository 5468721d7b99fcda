"""The knobs a sweep turns, and how each one changes the deployed model.

Three kinds:

* ``runtime`` knobs pick how an artifact runs (backend, precision);
* ``artifact`` knobs change the artifact but not its graphs (action-head mode, INT8
  calibration method);
* ``model`` knobs change the model configuration (the preset the artifact is exported
  from): some change graph constants (TVP timestep), some graph shapes (frames, views).
  They start from the trained model's preset and may only *reduce* what it was trained
  with, because the weights must still fit (see :mod:`vpp_edge.calibrate.variants`).

No torch here: grids are validated before anything heavy is imported.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from vpp_edge import precisions
from vpp_edge.errors import VPPError
from vpp_edge.graph_spec import ACTION_MODES
from vpp_edge.presets import Preset

BACKENDS = ("onnxruntime", "openvino", "torch", "tensorrt")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
NOT_APPLICABLE = "-"  # value of a knob that does not apply to a point (calibration of an FP32 point)


class KnobError(VPPError, ValueError):
    """An unknown knob, or a value a knob cannot take for this model."""


@dataclass(frozen=True)
class Knob:
    name: str
    kind: str  # runtime | artifact | model
    help: str
    base: Callable[[Preset], Any]  # the value the trained model / a plain export uses
    check: Callable[[Any, Preset], str | None]  # None if fine, else why not
    changes: Callable[[Any, Preset], dict[str, Any]] | None = None  # model knobs: Preset.replace() arguments
    changes_inputs: bool = False  # what the policy is fed (cameras, frames): never recommended unless opted in


def _choice(allowed: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> Callable[[Any, Preset], str | None]:
    """``allowed``: the values, or a function giving them when asked (a registry that grows)."""
    def check(v: Any, _p: Preset) -> str | None:
        values = allowed() if callable(allowed) else allowed
        return None if v in values else f"must be one of {list(values)}"

    return check


def _int_range(lo: Callable[[Preset], int], hi: Callable[[Preset], int], why: str) -> Callable[[Any, Preset], str | None]:
    def check(v: Any, p: Preset) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {v!r}"
        if not lo(p) <= v <= hi(p):
            return f"must be in [{lo(p)}, {hi(p)}] for preset '{p.name}' ({why})"
        return None

    return check


def _extract_layer_check(v: Any, p: Preset) -> str | None:
    why = _int_range(lambda _: 0, lambda q: q.tvp.extract_layer_idx,
                     "the Former's input layer only covers the up-blocks it was trained on")(v, p)
    if why is None and v != p.tvp.extract_layer_idx and not p.tvp.use_all_layer:
        return "needs tvp.use_all_layer (then earlier layers are a prefix of the trained feature channels)"
    return why


KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("precision", "runtime", f"graph precision: {precisions.describe(precisions.exported())}",
         lambda p: precisions.reference(), _choice(precisions.exported)),
    Knob("backend", "runtime", "engine backend: onnxruntime | openvino | torch | tensorrt (the ones installed)",
         lambda p: "onnxruntime", _choice(BACKENDS)),
    Knob("action_mode", "artifact", "action head: 'sampler' (one unrolled graph) or 'step' (one graph per DDIM step)",
         lambda p: "sampler", _choice(ACTION_MODES)),
    Knob("calibration", "artifact", "INT8 calibration method: minmax | entropy | percentile (INT8 points only)",
         lambda p: "minmax", _choice(CALIBRATION_METHODS + (NOT_APPLICABLE,))),
    Knob("tvp_timesteps", "model", "N of the TVP scheduler's set_timesteps(N): the one step's noise level",
         lambda p: p.tvp.timesteps, _int_range(lambda _: 1, lambda _: 1000, "scheduler steps"),
         lambda v, p: {"tvp": {"timesteps": v}}),
    Knob("dit_steps", "model", "DDIM sampling steps of the diffusion action head",
         lambda p: p.action_head.num_steps, _int_range(lambda _: 1, lambda _: 100, "sampler steps"),
         lambda v, p: {"action_head": {"num_steps": v}}),
    Knob("frames", "model", "frames the TVP predicts and the Video Former reads (at most the trained number)",
         lambda p: p.former.num_frames,
         _int_range(lambda _: 1, lambda q: q.former.num_frames, "the Former has per-frame queries for these only"),
         lambda v, p: {"tvp": {"num_frames": v}, "former": {"num_frames": v}}, changes_inputs=True),
    Knob("extract_layer", "model", "TVP up-block the features are taken from (at most the trained one)",
         lambda p: p.tvp.extract_layer_idx, _extract_layer_check,
         lambda v, p: {"tvp": {"extract_layer_idx": v}}),
    Knob("views", "model", "cameras used: the first N of the preset's views",
         lambda p: p.num_views, _int_range(lambda _: 1, lambda q: q.num_views, "cameras the model was trained with"),
         lambda v, p: {"views": list(p.views[:v])}, changes_inputs=True),
)}

MODEL_KNOBS = tuple(k for k, knob in KNOBS.items() if knob.kind == "model")
INPUT_KNOBS = tuple(k for k, knob in KNOBS.items() if knob.changes_inputs)


def input_changes(values: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The knobs of ``values`` that change the policy's inputs (cameras, frames) from ``base``
    (the trained configuration), with their values; empty when the inputs are the trained ones."""
    return {k: values[k] for k in INPUT_KNOBS if k in values and values[k] != base.get(k)}


def unknown_knob(name: str, where: str = "") -> KnobError:
    close = difflib.get_close_matches(name, list(KNOBS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return KnobError(f"{where}unknown knob '{name}'{hint} (knobs: {', '.join(KNOBS)})")


def base_values(preset: Preset) -> dict[str, Any]:
    """Every knob at the value the trained model uses."""
    return {name: knob.base(preset) for name, knob in KNOBS.items()}


def check_value(name: str, value: Any, preset: Preset, where: str = "") -> None:
    if name not in KNOBS:
        raise unknown_knob(name, where)
    why = KNOBS[name].check(value, preset)
    if why:
        raise KnobError(f"{where}knob '{name}' = {value!r} {why}")


def normalize(values: dict[str, Any]) -> dict[str, Any]:
    """Knob values with the ones that do not apply blanked, so equal points compare equal."""
    out = dict(values)
    if out.get("precision") not in precisions.calibrated():
        out["calibration"] = NOT_APPLICABLE
    elif out.get("calibration") == NOT_APPLICABLE:
        raise KnobError("an INT8 point needs a calibration method")
    return out


def model_preset(base: Preset, values: dict[str, Any]) -> Preset:
    """The preset of the model configuration the ``model`` knobs describe."""
    changes: dict[str, Any] = {}
    for name in MODEL_KNOBS:
        if name in values and values[name] != KNOBS[name].base(base):
            check_value(name, values[name], base)
            for section, value in KNOBS[name].changes(values[name], base).items():
                if isinstance(value, dict):
                    changes[section] = {**changes.get(section, {}), **value}
                else:
                    changes[section] = value
    return base.replace(**changes) if changes else base


def describe(values: dict[str, Any], base: dict[str, Any]) -> str:
    """Short label: precision/backend, then every other knob that differs from ``base``
    (the un-normalised base: its ``calibration`` is the default INT8 method)."""
    parts = [values["precision"]]
    if values["backend"] != base["backend"]:
        parts.append(values["backend"])
    for name in KNOBS:
        if name in ("precision", "backend") or values.get(name) == base.get(name):
            continue
        if name == "calibration" and values[name] in (NOT_APPLICABLE, base.get(name)):
            continue
        parts.append(f"{name}={values[name]}")
    return " ".join(parts)
