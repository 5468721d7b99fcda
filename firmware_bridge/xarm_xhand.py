"""xArm (UFACTORY ``xarm-python-sdk``) with a RobotEra XHand (``xhand_controller`` SDK):
18 = 6 arm (end-effector x, y, z in m; roll, pitch, yaw in rad) + 12 finger joints (rad).

Only the SDK calls listed here cross the vendor boundary; the tests drive this module
against fakes that implement exactly these calls (no simulator exists for either).
"""

from __future__ import annotations

import importlib

import numpy as np

from vpp_edge.errors import VPPError
from vpp_edge.extras import require

from .config import BridgeConfig
from .driver import RobotDriver
from .factory import DRIVERS

XARM_MAX_SERVO_HZ = 250.0  # the controller's streaming limit for set_servo_cartesian
HAND_JOINTS = 12
POSITION_MODE = 3


class DriverError(VPPError):
    """The robot refused a start-up step or reported a fault."""


def _ok(code: int, what: str) -> None:
    if code != 0:
        raise DriverError(f"xArm {what} failed with code {code}")


class XArmXHandDriver(RobotDriver):
    """Arm by Cartesian servo streaming, hand by position commands with kp / torque limits."""

    def __init__(self, settings: dict, servo_hz: float):
        if servo_hz > XARM_MAX_SERVO_HZ:
            raise DriverError(f"servo_hz {servo_hz:g} exceeds the xArm streaming limit of {XARM_MAX_SERVO_HZ:g} Hz")
        self.ip = settings.get("arm_ip", "192.168.1.208")
        self.hand_port = settings.get("hand_port", "/dev/ttyUSB0")
        self.hand_baudrate = int(settings.get("hand_baudrate", 3000000))
        self.hand_id = int(settings.get("hand_id", 0))
        self.kp = np.broadcast_to(np.asarray(settings.get("hand_kp", 100), np.int64), (HAND_JOINTS,))
        self.tor_max = np.broadcast_to(np.asarray(settings.get("hand_tor_max", 300), np.int64), (HAND_JOINTS,))
        self.hand_every = max(1, int(settings.get("hand_every", 2)))  # hand commands at servo_hz / n
        self._events: list[tuple[str, str]] = []
        self._ticks = 0
        self._codes = (0, 0)
        self.arm = None
        self.hand = None

    # --- start-up ----------------------------------------------------------------------
    def connect(self) -> np.ndarray:
        require("xarm", "the xArm driver")
        self.arm = importlib.import_module("xarm.wrapper").XArmAPI(self.ip, is_radian=True)
        self._enable_arm()
        require("xhand_controller", "the XHand driver")
        xhand = importlib.import_module("xhand_controller.xhand_control")
        self.hand = xhand.XHandControl()
        err = self.hand.open_serial(self.hand_port, self.hand_baudrate)
        if getattr(err, "error_code", 0) != 0:
            raise DriverError(f"XHand on {self.hand_port}: {getattr(err, 'error_message', err)}")
        self._command = xhand.HandCommand_t()
        for i in range(HAND_JOINTS):
            finger = self._command.finger_command[i]
            finger.id, finger.kp, finger.ki, finger.kd = i, int(self.kp[i]), 0, 0
            finger.tor_max, finger.mode = int(self.tor_max[i]), POSITION_MODE
        return self._measured_setpoint()

    def _enable_arm(self) -> None:
        _ok(self.arm.clean_error(), "clean_error")
        _ok(self.arm.clean_warn(), "clean_warn")
        _ok(self.arm.motion_enable(enable=True), "motion_enable")
        _ok(self.arm.set_mode(1), "set_mode(1) (servo)")
        _ok(self.arm.set_state(0), "set_state(0)")

    def resume(self) -> np.ndarray:
        self._enable_arm()
        return self._measured_setpoint()

    # --- streaming ---------------------------------------------------------------------
    def servo(self, setpoint: np.ndarray) -> None:
        xyz_mm = setpoint[:3] * 1000.0
        code = self.arm.set_servo_cartesian([*xyz_mm.tolist(), *setpoint[3:6].tolist()], is_radian=True)
        if code != 0:
            self._events.append(("driver_warning", f"set_servo_cartesian returned {code}"))
        if self._ticks % self.hand_every == 0:
            for i in range(HAND_JOINTS):
                self._command.finger_command[i].position = float(setpoint[6 + i])
            err = self.hand.send_command(self.hand_id, self._command)
            if getattr(err, "error_code", 0) != 0:
                self._events.append(("driver_warning", f"XHand send_command: {getattr(err, 'error_message', err)}"))
        self._ticks += 1
        self._check_codes()

    def _check_codes(self) -> None:
        codes = (int(self.arm.error_code), int(self.arm.warn_code))
        if codes != self._codes:
            error, warn = codes
            if error:
                self._events.append(("driver_error", f"xArm error code {error}"))
            if warn:
                self._events.append(("driver_warning", f"xArm warning code {warn}"))
            self._codes = codes

    def _hand_positions(self) -> np.ndarray:
        err, state = self.hand.read_state(self.hand_id, False)
        if getattr(err, "error_code", 0) != 0:
            raise DriverError(f"XHand read_state: {getattr(err, 'error_message', err)}")
        return np.array([state.finger_state[i].position for i in range(HAND_JOINTS)], np.float64)

    def _measured_setpoint(self) -> np.ndarray:
        code, pose = self.arm.get_position(is_radian=True)
        _ok(code, "get_position")
        arm = np.asarray(pose, np.float64)
        return np.concatenate([arm[:3] / 1000.0, arm[3:6], self._hand_positions()])

    def read_state(self) -> tuple[np.ndarray, np.ndarray]:
        code, angles = self.arm.get_servo_angle(is_radian=True)
        joints = np.asarray(angles if code == 0 else [np.nan] * 7, np.float64)
        return np.concatenate([joints, self._hand_positions()]), self._measured_setpoint()[:6]

    def events(self) -> list[tuple[str, str]]:
        out, self._events = self._events, []
        return out

    # --- stopping ----------------------------------------------------------------------
    def stop(self) -> None:
        if self.arm is not None:
            self.arm.set_state(4)  # stop the motion; resume() re-enables servo mode

    def estop(self) -> None:
        if self.arm is not None:
            self.arm.emergency_stop()

    def disconnect(self) -> None:
        if self.hand is not None:
            self.hand.close_device()
        if self.arm is not None:
            self.arm.disconnect()


@DRIVERS.register("xarm_xhand")
def _build(cfg: BridgeConfig) -> RobotDriver:
    return XArmXHandDriver(cfg.driver, cfg.servo_hz)
