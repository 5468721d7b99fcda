"""Franka Panda / FR3 through franky (``franky-control``): one long-lived Cartesian
impedance tracking controller whose reference the bridge's servo loop updates every tick,
and franky's ``Gripper``.

Why a tracker, not a motion per target: re-planning an asynchronous ``CartesianMotion``
at the servo rate preempts the running motion 50 times a second, and that preemption
blocked ``move()`` intermittently against franky-sim. The tracker is started once; each
tick only swaps its reference (a lock-free handle, ~0.1 ms), and the bridge's own
interpolator already limits velocity and acceleration, so the reference never jumps.

The gripper gets its own thread: franky's gripper calls block for the whole finger motion
(about 0.5 s, and a second ``move_async`` waits for the first), which must never stall
the servo loop. Newest command wins.

Setpoint (7): end-effector x, y, z (m, base frame), roll, pitch, yaw (rad) *relative to
the orientation at connect* (so the usual gripper-down pose is near 0, far from the
+-pi wrap), and the gripper closure (0 open .. 1 closed).
"""

from __future__ import annotations

import importlib
import logging
import threading

import numpy as np

from vpp_edge.extras import require
from vpp_edge.runtime.realtime import scheduling_kept

from .config import BridgeConfig
from .driver import RobotDriver
from .factory import DRIVERS
from .rotations import matrix_to_rpy, rpy_to_matrix

log = logging.getLogger(__name__)


class GripperWorker:
    """Runs blocking gripper commands on a thread of its own; the newest closure wins.

    Closures at or above ``grasp_above`` become a force-controlled grasp that holds
    whatever is between the fingers (a position move would fault against an object);
    smaller ones move the fingers to the matching width.
    """

    def __init__(self, gripper, speed: float, force: float, grasp_above: float):
        self.gripper, self.speed, self.force, self.grasp_above = gripper, speed, force, grasp_above
        self.errors: list[str] = []
        self._wanted: float | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="franka-gripper", daemon=True)
        self._thread.start()

    def command(self, closure: float) -> None:
        with self._cond:
            self._wanted = closure
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted is not None or self._closing)
                if self._closing:
                    return
                closure, self._wanted = self._wanted, None
            try:
                if closure >= self.grasp_above:
                    done = self.gripper.grasp(0.0, self.speed, self.force, epsilon_inner=1.0, epsilon_outer=1.0)
                else:
                    done = self.gripper.move((1.0 - closure) * float(self.gripper.max_width), self.speed)
                if done is False:  # franky reports a move blocked or a grasp missed by returning False
                    self.errors.append(f"gripper: command for closure {closure:.2f} did not complete")
            except Exception as exc:  # noqa: BLE001 - reported through the bridge's events
                self.errors.append(f"gripper: {exc}")

    def close(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._closing, self._wanted = True, None
            self._cond.notify()
        self._thread.join(timeout)


class FrankaDriver(RobotDriver):
    def __init__(self, settings: dict):
        self.host = settings.get("robot_ip", "172.16.0.2")
        self.realtime = bool(settings.get("realtime", True))  # False only for simulators
        self.stiffness = (float(settings.get("translational_stiffness", 2000.0)),
                          float(settings.get("rotational_stiffness", 150.0)))
        self.use_gripper = bool(settings.get("gripper", True))
        self.gripper_speed = float(settings.get("gripper_speed", 0.05))
        self.gripper_force = float(settings.get("gripper_force", 20.0))
        self.grasp_above = float(settings.get("grasp_above", 0.9))
        self.robot = self.gripper = None
        self._gripper_worker: GripperWorker | None = None
        self._motion = None  # the running impedance tracker; None while stopped
        self._home = np.eye(3)
        self._gripper_cmd: float | None = None
        self._events: list[tuple[str, str]] = []

    def connect(self) -> np.ndarray:
        require("franky", "the Franka driver")
        self._franky = importlib.import_module("franky")
        rt = self._franky.RealtimeConfig.Enforce if self.realtime else self._franky.RealtimeConfig.Ignore
        with scheduling_kept():  # libfranka's own control thread is real-time; this one stays as it was
            self.robot = self._franky.Robot(self.host, realtime_config=rt)
        self.robot.recover_from_errors()
        self._home = np.asarray(self.robot.current_cartesian_state.pose.end_effector_pose.matrix)[:3, :3].copy()
        if self.use_gripper:
            self.gripper = self._franky.Gripper(self.host)
            self._gripper_worker = GripperWorker(self.gripper, self.gripper_speed, self.gripper_force,
                                                 self.grasp_above)
        self._start_tracking()
        return self._measured()

    def resume(self) -> np.ndarray:
        self.robot.recover_from_errors()
        self._start_tracking()
        return self._measured()

    def _start_tracking(self) -> None:
        """Start the impedance controller with its reference at the measured pose: no jump."""
        franky = self._franky
        motion = franky.CartesianImpedanceTrackingMotion(translational_stiffness=self.stiffness[0],
                                                         rotational_stiffness=self.stiffness[1])
        motion.set_reference(franky.CartesianReference(target=self.robot.current_pose.end_effector_pose))
        self.robot.move(motion, asynchronous=True)
        self._motion = motion

    def _measured(self) -> np.ndarray:
        pose = np.asarray(self.robot.current_cartesian_state.pose.end_effector_pose.matrix)
        rpy = matrix_to_rpy(self._home.T @ pose[:3, :3])
        closure = 0.0
        if self.gripper is not None:
            closure = 1.0 - float(self.gripper.width) / max(float(self.gripper.max_width), 1e-6)
        return np.concatenate([pose[:3, 3], rpy, [np.clip(closure, 0.0, 1.0)]])

    def servo(self, setpoint: np.ndarray) -> None:
        if self._motion is None:
            return  # stopped: the bridge resumes us before it sends new setpoints
        if self.robot.has_errors or not self.robot.is_in_control:
            # A reflex or a lost link ended the controller: report once, the bridge latches.
            self._events.append(("driver_error", "franky: robot error or controller no longer in control"))
            self._motion = None
            return
        matrix = np.eye(4)
        matrix[:3, :3] = self._home @ rpy_to_matrix(setpoint[3:6])
        matrix[:3, 3] = setpoint[:3]
        self._motion.set_reference(self._franky.CartesianReference(target=self._franky.Affine(matrix)))
        if self._gripper_worker is not None and (self._gripper_cmd is None
                                                 or abs(setpoint[6] - self._gripper_cmd) > 0.05):
            self._gripper_worker.command(float(setpoint[6]))
            self._gripper_cmd = float(setpoint[6])

    def read_state(self) -> tuple[np.ndarray, np.ndarray]:
        joints = np.asarray(self.robot.current_joint_state.position, np.float64)
        return joints, self._measured()

    def events(self) -> list[tuple[str, str]]:
        if self._gripper_worker is not None:
            while self._gripper_worker.errors:
                self._events.append(("driver_warning", self._gripper_worker.errors.pop(0)))
        out, self._events = self._events, []
        return out

    def stop(self) -> None:
        """Hold the measured pose, then end the controller: the arm stands still."""
        if self.robot is None or self._motion is None:
            return
        self._motion.set_reference(self._franky.CartesianReference(target=self.robot.current_pose.end_effector_pose))
        self._end_motion()

    def estop(self) -> None:
        if self.robot is not None:
            self._end_motion()
            if self.gripper is not None:
                try:
                    self.gripper.stop()
                except Exception as exc:  # the gripper may be idle already
                    log.info("gripper stop at e-stop: %s", exc)

    def _end_motion(self) -> None:
        self._motion = None
        self.robot.stop()
        try:
            self.robot.join_motion(timeout=2.0)
        except Exception as exc:  # franky reports the ended motion as preempted: expected
            log.debug("franky join after stop: %s", exc)

    def disconnect(self) -> None:
        if self._gripper_worker is not None:
            self._gripper_worker.close()
        if self.robot is not None:
            try:
                self._end_motion()
            except Exception as exc:  # already stopped or the link is gone: nothing left to stop
                log.info("franky stop at disconnect: %s", exc)
        # Drop the connections now: franky-sim and the FCI serve one client at a time.
        self.robot = self.gripper = self._gripper_worker = None


@DRIVERS.register("franka")
def _build(cfg: BridgeConfig) -> RobotDriver:
    return FrankaDriver(cfg.driver)
