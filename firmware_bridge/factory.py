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


@DRIVERS.register("sim")
def _sim(cfg: BridgeConfig) -> RobotDriver:  # here, not in driver.py: this module imports that one
    return KinematicSimDriver(cfg.dim)


def make_driver(cfg: BridgeConfig) -> RobotDriver:
    """The driver of kind ``cfg.driver_kind`` (not started); ConfigError naming the known ones otherwise."""
    return DRIVERS.get(cfg.driver_kind)(cfg)
