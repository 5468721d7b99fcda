"""Drivers by robot name (the bridge config's ``name``)."""

from __future__ import annotations

from vpp_edge.errors import VPPError

from .config import BridgeConfig
from .driver import KinematicSimDriver, RobotDriver

ROBOTS = ("sim", "metaworld", "xarm_xhand", "panda")


def make_driver(cfg: BridgeConfig) -> RobotDriver:
    if cfg.name == "sim":
        return KinematicSimDriver(cfg.dim)
    if cfg.name == "metaworld":
        from .metaworld_sim import MetaWorldDriver

        return MetaWorldDriver(cfg.driver)
    if cfg.name == "xarm_xhand":
        from .xarm_xhand import XArmXHandDriver

        return XArmXHandDriver(cfg.driver, cfg.servo_hz)
    if cfg.name == "panda":
        from .franka import FrankaDriver

        return FrankaDriver(cfg.driver)
    raise VPPError(f"no driver for robot '{cfg.name}'; known: {', '.join(ROBOTS)}")
