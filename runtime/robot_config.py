"""Per-robot runtime limits and rates: the runtime's view of the robot's one description
(``vpp_edge/robots/<name>.yaml``, shared with the bridge; see :mod:`vpp_edge.robot_description`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from vpp_edge.config_schema import check_keys
from vpp_edge.errors import ConfigError  # the one ConfigError (issue 21), still importable from here
from vpp_edge.robot_description import ROBOTS_DIR, read_robot_description, runtime_part

ROBOT_DIR: Path = ROBOTS_DIR  # the one home of robot descriptions (the bridge reads the same files)


@dataclass(frozen=True)
class RobotConfig:
    name: str
    control_hz: float
    action_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    max_delta: tuple[float, ...]  # largest change of each action dimension per control step
    stale_observation_s: float
    watchdog_hold_s: float
    watchdog_stop_s: float
    # Where a policy that takes the robot state finds it in the bridge's state reply
    # (runtime/proprio.py), e.g. ("ee_pose", "joints[0:12]"); empty: nowhere (such a policy is refused).
    policy_state: tuple[str, ...] = ()

    @property
    def dt(self) -> float:
        return 1.0 / self.control_hz

    @property
    def low(self) -> np.ndarray:
        return np.asarray(self.action_low, np.float64)

    @property
    def high(self) -> np.ndarray:
        return np.asarray(self.action_high, np.float64)

    @property
    def delta(self) -> np.ndarray:
        return np.asarray(self.max_delta, np.float64)


def robot_config_from_dict(data: dict, source: str = "robot config") -> RobotConfig:
    """A ``RobotConfig`` from its fields (``runtime_part`` of a robot description)."""
    optional = {"policy_state"}
    data = check_keys(data, [f.name for f in fields(RobotConfig) if f.name not in optional], source, optional)
    cfg = RobotConfig(**{k: (tuple(v) if k in optional else tuple(float(x) for x in v)) if isinstance(v, list) else v
                         for k, v in data.items()})
    n = cfg.action_dim
    for key in ("action_low", "action_high", "max_delta"):
        if len(getattr(cfg, key)) != n:
            raise ConfigError(f"{source}: '{key}' has {len(getattr(cfg, key))} values, action_dim is {n}")
    if np.any(cfg.low >= cfg.high) or np.any(cfg.delta <= 0):
        raise ConfigError(f"{source}: need action_low < action_high and max_delta > 0 in every dimension")
    if not 0 < cfg.watchdog_hold_s < cfg.watchdog_stop_s or cfg.control_hz <= 0 or cfg.stale_observation_s <= 0:
        raise ConfigError(f"{source}: need control_hz > 0, stale_observation_s > 0 and "
                          "0 < watchdog_hold_s < watchdog_stop_s")
    return cfg


def load_robot_config(name_or_path: str) -> RobotConfig:
    """The runtime's part of a shipped robot description by name, or of a description YAML."""
    data, source = read_robot_description(name_or_path, ConfigError, "robot")
    return robot_config_from_dict(runtime_part(data), source)
