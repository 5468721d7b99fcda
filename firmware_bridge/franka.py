"""Franka Panda / FR3 through franky (``franky-control``): Cartesian pose targets as
asynchronous motions that franky re-plans in real time, and its ``Gripper``.

Setpoint (7): end-effector x, y, z (m, base frame), roll, pitch, yaw (rad) *relative to
the orientation at connect* (so the usual gripper-down pose is near 0, far from the
+-pi wrap), and the gripper closure (0 open .. 1 closed).
"""

from __future__ import annotations

import importlib
import logging

import numpy as np

from vpp_edge.extras import require

from .driver import RobotDriver
from .rotations import matrix_to_rpy, rpy_to_matrix

log = logging.getLogger(__name__)


class FrankaDriver(RobotDriver):
    name = "panda"
    plans_own_trajectory = True  # franky re-plans jerk-limited motions to each new target

    def __init__(self, settings: dict):
        self.host = settings.get("robot_ip", "172.16.0.2")
        self.dynamics = float(settings.get("relative_dynamics_factor", 0.1))
        self.realtime = bool(settings.get("realtime", True))  # False only for simulators
        self.use_gripper = bool(settings.get("gripper", True))
        self.gripper_speed = float(settings.get("gripper_speed", 0.05))
        self.min_change = float(settings.get("min_change", 1e-4))  # re-plan only on real changes
        self.robot = self.gripper = None
        self._home = np.eye(3)
        self._sent: np.ndarray | None = None
        self._gripper_cmd: float | None = None
        self._events: list[tuple[str, str]] = []

    def connect(self) -> np.ndarray:
        require("franky", "the Franka driver")
        franky = importlib.import_module("franky")
        self._franky = franky
        rt = franky.RealtimeConfig.Enforce if self.realtime else franky.RealtimeConfig.Ignore
        self.robot = franky.Robot(self.host, realtime_config=rt)
        self.robot.recover_from_errors()
        self.robot.relative_dynamics_factor = self.dynamics
        self._home = np.asarray(self.robot.current_cartesian_state.pose.end_effector_pose.matrix)[:3, :3].copy()
        if self.use_gripper:
            self.gripper = franky.Gripper(self.host)
        self._sent = None
        return self._measured()

    def resume(self) -> np.ndarray:
        self.robot.recover_from_errors()
        self._sent = None
        return self._measured()

    def _measured(self) -> np.ndarray:
        pose = np.asarray(self.robot.current_cartesian_state.pose.end_effector_pose.matrix)
        rpy = matrix_to_rpy(self._home.T @ pose[:3, :3])
        closure = 0.0
        if self.gripper is not None:
            closure = 1.0 - float(self.gripper.width) / max(float(self.gripper.max_width), 1e-6)
        return np.concatenate([pose[:3, 3], rpy, [np.clip(closure, 0.0, 1.0)]])

    def servo(self, setpoint: np.ndarray) -> None:
        if self.robot.has_errors:
            self._events.append(("driver_error", "franky reports a robot error"))
            return
        if self._sent is None or np.max(np.abs(setpoint[:6] - self._sent[:6])) > self.min_change:
            matrix = np.eye(4)
            matrix[:3, :3] = self._home @ rpy_to_matrix(setpoint[3:6])
            matrix[:3, 3] = setpoint[:3]
            motion = self._franky.CartesianMotion(self._franky.Affine(matrix), self._franky.ReferenceType.Absolute)
            try:
                self.robot.move(motion, asynchronous=True)  # preempts the previous target
            except Exception as exc:  # franky raises ControlException & co. on reflexes
                self._events.append(("driver_error", f"franky move: {exc}"))
                return
            self._sent = setpoint.copy()
        if self.gripper is not None and (self._gripper_cmd is None or abs(setpoint[6] - self._gripper_cmd) > 0.05):
            width = (1.0 - float(setpoint[6])) * float(self.gripper.max_width)
            self.gripper.move_async(width, self.gripper_speed)
            self._gripper_cmd = float(setpoint[6])

    def read_state(self) -> tuple[np.ndarray, np.ndarray]:
        joints = np.asarray(self.robot.current_joint_state.position, np.float64)
        return joints, self._measured()

    def events(self) -> list[tuple[str, str]]:
        out, self._events = self._events, []
        return out

    def stop(self) -> None:
        if self.robot is not None:
            measured = self._measured()
            self.servo(measured)  # re-plan to where it is: a smooth, jerk-limited stop
            self._sent = measured

    def estop(self) -> None:
        if self.robot is not None:
            self.robot.stop()

    def disconnect(self) -> None:
        if self.robot is not None:
            try:
                self.robot.stop()
            except Exception as exc:  # already stopped or the link is gone: nothing left to stop
                log.info("franky stop at disconnect: %s", exc)
