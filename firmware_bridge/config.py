"""Bridge configs: the bridge's view of the robot's one description (``vpp_edge/robots/<name>.yaml``,
shared with the runtime; see :mod:`vpp_edge.robot_description`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from vpp_edge.config_schema import check_keys
from vpp_edge.errors import ConfigError
from vpp_edge.robot_description import ROBOTS_DIR, bridge_part, read_robot_description

CONFIG_DIR: Path = ROBOTS_DIR  # the one home of robot descriptions (the runtime reads the same files)
_VECTORS = ("setpoint_low", "setpoint_high", "max_step", "max_vel", "max_acc", "max_tracking_error")


BridgeConfigError = ConfigError  # the one ConfigError (issue 21); the old name stays importable


@dataclass(frozen=True)
class BridgeConfig:
    name: str
    dim: int
    servo_hz: float
    state_hz: float
    delta_dims: tuple[bool, ...]  # action = change of the setpoint (True) or an absolute value (False)
    setpoint_low: tuple[float, ...]
    setpoint_high: tuple[float, ...]
    max_step: tuple[float, ...]
    max_vel: tuple[float, ...]
    max_acc: tuple[float, ...]
    # Largest |measured - commanded| per dimension before the bridge latches the e-stop; .inf
    # leaves a dimension unchecked (grippers that stop on an object, angles that wrap).
    max_tracking_error: tuple[float, ...]
    hold_after_s: float
    stop_after_s: float
    driver_kind: str  # the driver (a name of firmware_bridge/factory.py's DRIVERS): the description's driver.kind
    driver: dict = field(default_factory=dict)  # that driver's settings (addresses, gains)

    def vec(self, name: str) -> np.ndarray:
        return np.asarray(getattr(self, name), np.float64)

    def burst(self) -> np.ndarray:
        """How far targets may move at once beyond ``max_vel`` per second: one ``max_step``
        plus what the robot covers in ``hold_after_s`` (after which a silent runtime's target
        is dropped anyway). Over any T seconds a target moves at most burst + max_vel * T."""
        return self.vec("max_step") + self.vec("max_vel") * self.hold_after_s


def bridge_config_from_dict(data: dict, source: str = "bridge config") -> BridgeConfig:
    """A ``BridgeConfig`` from its fields (``bridge_part`` of a robot description)."""
    names = [f.name for f in fields(BridgeConfig) if f.name != "driver"]
    data = check_keys(data, names, source, optional=("driver",))
    data.setdefault("driver", {})
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    if not isinstance(values["driver"], dict):
        raise BridgeConfigError(f"{source}: 'driver' must be a mapping")
    from .factory import DRIVERS  # here: the factory imports this module

    try:
        DRIVERS.require(values["driver_kind"])  # a typo fails when the description is read (vpp deploy too)
    except ConfigError as exc:
        raise BridgeConfigError(f"{source}: driver.kind: {exc}") from None
    cfg = BridgeConfig(**values)
    for key in (*_VECTORS, "delta_dims"):
        if len(getattr(cfg, key)) != cfg.dim:
            raise BridgeConfigError(f"{source}: '{key}' has {len(getattr(cfg, key))} values, dim is {cfg.dim}")
    if np.any(cfg.vec("setpoint_low") >= cfg.vec("setpoint_high")):
        raise BridgeConfigError(f"{source}: setpoint_low must be below setpoint_high")
    if any(np.any(cfg.vec(k) <= 0) for k in ("max_step", "max_vel", "max_acc", "max_tracking_error")):
        raise BridgeConfigError(f"{source}: max_step, max_vel, max_acc and max_tracking_error must be positive")
    if not (cfg.servo_hz > 0 and cfg.state_hz > 0 and 0 < cfg.hold_after_s < cfg.stop_after_s):
        raise BridgeConfigError(f"{source}: need positive rates and 0 < hold_after_s < stop_after_s")
    return cfg


def load_bridge_config(name_or_path: str) -> BridgeConfig:
    """The bridge's part of a shipped robot description by name, or of a description YAML."""
    data, source = read_robot_description(name_or_path, BridgeConfigError, "bridge robot")
    return bridge_config_from_dict(bridge_part(data), source)
