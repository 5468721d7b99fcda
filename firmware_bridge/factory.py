"""Drivers by kind (the robot description's ``driver.kind``): a registry (:data:`DRIVERS`) of
builders ``(BridgeConfig) -> RobotDriver``, each in its driver's module.

A new robot is its description (``vpp_edge/robots/<name>.yaml``) naming a shipped driver kind
(robots on the same hardware or simulator share one, each with its own ``driver`` settings);
only when none fits, one driver module whose builder is decorated ``@DRIVERS.register("<kind>")``
and its line in ``DRIVERS``' built-ins below (imported only when that kind is asked for, so
one robot's SDK is never needed to run another).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from vpp_edge.errors import ConfigError
from vpp_edge.registry import Registry

from .config import BridgeConfig
from .driver import KinematicSimDriver, RobotDriver

DriverBuilder = Callable[[BridgeConfig], RobotDriver]

DRIVERS: Registry[DriverBuilder] = Registry("robot driver", {
    "sim": "vpp_edge.firmware_bridge.driver",
    "metaworld": "vpp_edge.firmware_bridge.metaworld_sim",
    "xarm_xhand": "vpp_edge.firmware_bridge.xarm_xhand",
    "franka": "vpp_edge.firmware_bridge.franka",
})


# The sim driver's settings: where it starts (default: zero in every dimension).
SIM_SETTINGS = ("initial",)


def sim_initial(cfg: BridgeConfig) -> np.ndarray | None:
    """The sim driver's starting pose (``driver: {kind: sim, initial: [dim values]}``), or None
    for zero. A robot whose state-taking policy refuses zero (XBot: zero lies outside its
    state bounds, so every inference would be refused) starts where the policy acts. A wrong
    length, a non-finite value or a pose outside the setpoint bounds is a one-line ConfigError."""
    unknown = sorted(set(cfg.driver) - set(SIM_SETTINGS))
    if unknown:
        raise ConfigError(f"{cfg.name}: driver setting(s) {unknown} unknown to the sim driver; allowed: "
                          f"{list(SIM_SETTINGS)}")
    if cfg.driver.get("initial") is None:
        return None
    try:
        initial = np.asarray(cfg.driver["initial"], np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{cfg.name}: driver.initial must be a list of {cfg.dim} numbers") from None
    if initial.shape != (cfg.dim,):
        raise ConfigError(f"{cfg.name}: driver.initial has {initial.size} values, dim is {cfg.dim}")
    outside = ~np.isfinite(initial) | (initial < cfg.vec("setpoint_low")) | (initial > cfg.vec("setpoint_high"))
    if outside.any():
        raise ConfigError(f"{cfg.name}: driver.initial is not finite and inside [setpoint_low, setpoint_high] at "
                          f"{np.flatnonzero(outside).tolist()}")
    return initial


@DRIVERS.register("sim")
def _sim(cfg: BridgeConfig) -> RobotDriver:  # here, not in driver.py: this module imports that one
    return KinematicSimDriver(cfg.dim, sim_initial(cfg))


def make_driver(cfg: BridgeConfig) -> RobotDriver:
    """The driver of kind ``cfg.driver_kind`` (not started); ConfigError naming the known ones otherwise."""
    return DRIVERS.get(cfg.driver_kind)(cfg)
