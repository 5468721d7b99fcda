"""One description per robot (``vpp_edge/robots/<name>.yaml``), read by both sides.

The runtime's robot config (:func:`vpp_edge.runtime.robot_config.load_robot_config`) and the
bridge's config (:func:`vpp_edge.firmware_bridge.config.load_bridge_config`) are two views of
the same file, so they cannot drift. Facts both sides use are written once at the top::

    name, dim, control_hz, delta_dims
    watchdog: {hold_s, stop_s}          # runtime watchdog_hold_s/_stop_s = bridge hold_after_s/stop_after_s

and what only one side uses sits in its section::

    runtime: {action_low, action_high, max_delta, stale_observation_s,     # the safety gate
              policy_state (optional: the policy's robot-state input)}
    bridge:  {servo_hz, state_hz, setpoint_low, setpoint_high,             # what it accepts
              max_step, max_vel, max_acc, max_tracking_error}
    driver:  {kind, ...}                                                    # the bridge's driver and its settings

``driver.kind`` is required and names the bridge's driver (a name of ``DRIVERS`` in
``firmware_bridge/factory.py``), not the robot: robots that share hardware or a simulator (a
second Panda cell, a sim variant) share a driver kind, each with its own settings. The
bridge refuses an unknown kind when it reads the description.

Reading a description also checks that the two sides fit together: whatever the runtime's
safety gate lets through, the bridge accepts (delta actions no larger than one accepted
step; absolute ones inside the setpoint bounds and their per-step change within one step).
Robot side: numpy and PyYAML only (Python >= 3.10).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vpp_edge.config_schema import check_keys
from vpp_edge.files import named_config

ROBOTS_DIR = Path(__file__).with_name("robots")

SHARED = ("name", "dim", "control_hz", "delta_dims", "watchdog")
WATCHDOG = ("hold_s", "stop_s")
RUNTIME = ("action_low", "action_high", "max_delta", "stale_observation_s")
# policy_state: where a policy that takes the robot state (action_head.use_proprio) finds it in
# the bridge's state reply, e.g. [ee_pose, "joints[0:12]"] (runtime/proprio.py).
RUNTIME_OPTIONAL = ("policy_state",)
BRIDGE = ("servo_hz", "state_hz", "setpoint_low", "setpoint_high", "max_step", "max_vel", "max_acc",
          "max_tracking_error")
_VECTORS = {"runtime": ("action_low", "action_high", "max_delta"),
            "bridge": ("setpoint_low", "setpoint_high", "max_step", "max_vel", "max_acc", "max_tracking_error")}


def known_robots() -> list[str]:
    return sorted(p.stem for p in ROBOTS_DIR.glob("*.yaml"))


def _keys(data: object, expected: tuple[str, ...], where: str, error: type[Exception],
          optional: tuple[str, ...] = ()) -> dict:
    return check_keys(data, expected, where, optional, error)


def read_robot_description(name_or_path: str | Path, error: type[Exception], what: str = "robot") -> tuple[dict, str]:
    """(description, source) of a shipped robot by name or of a YAML file; ``error`` is raised,
    naming the file, when it is missing, malformed or its runtime and bridge parts do not fit."""
    path = named_config(name_or_path, ROBOTS_DIR, error, what)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise error(f"{path}: cannot read ({exc})") from None
    source = str(path)
    check_robot_description(data, source, error)
    return data, source


# runtime.policy_state: where a state-taking policy's robot state sits in the bridge's state reply
# (read by runtime/proprio.py).
FIELDS = ("joints", "ee_pose", "target")  # the arrays of runtime.protocol.RobotState
_PART = re.compile(r"^(?P<field>[a-z_]+)(\[(?P<start>\d*):(?P<stop>\d*)\])?$")


def parse_state_layout(spec: Any, where: str = "policy_state",
                       error: type[Exception] = ValueError) -> tuple[tuple[str, slice], ...]:
    """``["ee_pose", "joints[0:12]"]`` -> ((field, slice), ...); ``error`` names a bad entry."""
    if not isinstance(spec, (list, tuple)) or not spec:
        raise error(f"{where}: expected a non-empty list of state fields ({', '.join(FIELDS)}), each optionally "
                    f"sliced as name[start:stop]; got {spec!r}")
    parts = []
    for entry in spec:
        m = _PART.match(entry) if isinstance(entry, str) else None
        if m is None or m["field"] not in FIELDS:
            raise error(f"{where}: {entry!r} is not one of {', '.join(FIELDS)}, optionally sliced as name[start:stop]")
        start, stop = (int(m[k]) if m[k] else None for k in ("start", "stop"))
        if start is not None and stop is not None and stop <= start:
            raise error(f"{where}: {entry!r} selects nothing")
        parts.append((m["field"], slice(start, stop)))
    return tuple(parts)


def check_robot_description(data: object, source: str, error: type[Exception]) -> None:
    """Structure, vector lengths and the fit of the runtime's limits inside the bridge's."""
    _keys(data, (*SHARED, "runtime", "bridge", "driver"), source, error)
    _keys(data["watchdog"], WATCHDOG, f"{source}: watchdog", error)
    _keys(data["runtime"], RUNTIME, f"{source}: runtime", error, optional=RUNTIME_OPTIONAL)
    if "policy_state" in data["runtime"]:
        parse_state_layout(data["runtime"]["policy_state"], f"{source}: runtime.policy_state", error)
    _keys(data["bridge"], BRIDGE, f"{source}: bridge", error)
    driver = data["driver"]
    if not isinstance(driver, dict) or not isinstance(driver.get("kind"), str) or not driver["kind"]:
        raise error(f"{source}: 'driver' must be a mapping naming its kind (driver: {{kind: franka, ...settings}}), "
                    f"got {driver!r}")
    n = data["dim"]
    if not isinstance(n, int) or n <= 0:
        raise error(f"{source}: 'dim' must be a positive integer")
    vectors = {"delta_dims": data["delta_dims"]}
    for section, keys in _VECTORS.items():
        vectors.update({f"{section}.{k}": data[section][k] for k in keys})
    for key, values in vectors.items():
        if not isinstance(values, list) or len(values) != n:
            raise error(f"{source}: '{key}' must have {n} values (dim)")
    try:
        rt = {k: np.asarray(data["runtime"][k], np.float64) for k in _VECTORS["runtime"]}
        br = {k: np.asarray(data["bridge"][k], np.float64) for k in _VECTORS["bridge"]}
    except (TypeError, ValueError) as exc:
        raise error(f"{source}: limits must be numbers ({exc})") from None
    delta = np.asarray(data["delta_dims"], bool)
    biggest = np.maximum(np.abs(rt["action_low"]), np.abs(rt["action_high"]))
    too_big = (delta & (biggest > br["max_step"] + 1e-12)) | (~delta & (
        (rt["action_low"] < br["setpoint_low"]) | (rt["action_high"] > br["setpoint_high"])
        | (rt["max_delta"] > br["max_step"] + 1e-12)))
    if np.any(too_big):
        dims = [int(i) for i in np.flatnonzero(too_big)]
        raise error(f"{source}: the runtime's limits let through actions the bridge refuses in dimension(s) {dims} "
                    "(delta actions must fit in bridge.max_step; absolute ones inside bridge.setpoint_low/high "
                    "with runtime.max_delta <= bridge.max_step)")


def runtime_part(data: dict) -> dict:
    """The fields of the runtime's ``RobotConfig``."""
    return {"name": data["name"], "control_hz": data["control_hz"], "action_dim": data["dim"],
            **data["runtime"], "watchdog_hold_s": data["watchdog"]["hold_s"],
            "watchdog_stop_s": data["watchdog"]["stop_s"]}


def bridge_part(data: dict) -> dict:
    """The fields of the bridge's ``BridgeConfig``."""
    return {"name": data["name"], "dim": data["dim"], "delta_dims": data["delta_dims"], **data["bridge"],
            "hold_after_s": data["watchdog"]["hold_s"], "stop_after_s": data["watchdog"]["stop_s"],
            "driver_kind": data["driver"]["kind"],
            "driver": {k: v for k, v in data["driver"].items() if k != "kind"}}
