"""The vendor-SDK boundary. A driver is the only code that talks to hardware (or a
simulator); everything above it (validation, limits, watchdog, e-stop) is shared."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

HISTORY_KEPT = 100_000  # setpoints a KinematicSimDriver remembers (8 min at 200 Hz)


class RobotDriver(ABC):
    """Setpoints in, measured state out. Called from the bridge's servo thread only."""

    @abstractmethod
    def connect(self) -> np.ndarray:
        """Open the connection, bring the robot to a commandable state; returns the current setpoint."""

    @abstractmethod
    def servo(self, setpoint: np.ndarray) -> None:
        """Send one servo-rate setpoint (already interpolated and limited by the bridge)."""

    @abstractmethod
    def read_state(self) -> tuple[np.ndarray, np.ndarray]:
        """(joint positions, end-effector pose) as measured."""

    @abstractmethod
    def stop(self) -> None:
        """Stop all motion now (watchdog stop)."""

    def estop(self) -> None:
        """Emergency stop (the hardware's own, where it has one)."""
        self.stop()

    def resume(self) -> np.ndarray:
        """Make the robot commandable again after a stop; returns the current setpoint."""
        return self.connect()

    def events(self) -> list[tuple[str, str]]:
        """Driver-side events since the last call (errors, warnings), as (kind, detail)."""
        return []

    def disconnect(self) -> None:  # noqa: B027 - optional hook
        """Release the hardware (called in a finally block)."""


class KinematicSimDriver(RobotDriver):
    """A kinematic simulator: the measured state follows the setpoint exactly.

    The light mode for fast tests and the embedded demo; no physics, no SDK.
    """

    def __init__(self, dim: int, initial: np.ndarray | None = None):
        self.setpoint = np.zeros(dim) if initial is None else np.asarray(initial, np.float64).copy()
        self.stopped = False
        self.history: list[np.ndarray] = []  # setpoints received (the last HISTORY_KEPT), for tests and plots

    def connect(self) -> np.ndarray:
        self.stopped = False
        return self.setpoint.copy()

    def servo(self, setpoint: np.ndarray) -> None:
        self.setpoint = np.asarray(setpoint, np.float64).copy()
        self.stopped = False
        self.history.append(self.setpoint)
        if len(self.history) > 2 * HISTORY_KEPT:  # a sim bridge may run for days: trim in O(1) amortised
            del self.history[:-HISTORY_KEPT]

    def read_state(self) -> tuple[np.ndarray, np.ndarray]:
        return self.setpoint.copy(), self.setpoint.copy()

    def stop(self) -> None:
        self.stopped = True
