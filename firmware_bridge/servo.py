"""Setpoint interpolation with per-joint velocity and acceleration limits: the servo
loop approaches each new target smoothly and never jumps."""

from __future__ import annotations

import numpy as np


class LimitedInterpolator:
    """Per dimension: accelerate at most ``max_acc``, move at most ``max_vel``, and brake so
    as to stop at the target. The braking speed is the discrete-time one: from speed
    n * a * dt, n braking steps cover a * dt^2 * n (n + 1) / 2."""

    def __init__(self, position: np.ndarray, max_vel: np.ndarray, max_acc: np.ndarray, dt: float,
                 low: np.ndarray | None = None, high: np.ndarray | None = None):
        self.low = None if low is None else np.asarray(low, np.float64)
        self.high = None if high is None else np.asarray(high, np.float64)
        self.p = np.asarray(position, np.float64).copy()
        self.v = np.zeros_like(self.p)
        self.max_vel = np.asarray(max_vel, np.float64)
        self.max_acc = np.asarray(max_acc, np.float64)
        self.dt = dt

    def step(self, target: np.ndarray) -> np.ndarray:
        err = np.asarray(target, np.float64) - self.p
        a_dt = self.max_acc * self.dt
        n = np.sqrt(0.25 + 2.0 * np.abs(err) / (a_dt * self.dt)) - 0.5
        v_brake = np.sign(err) * n * a_dt
        v_des = np.clip(v_brake, -self.max_vel, self.max_vel)
        dv = np.clip(v_des - self.v, -self.max_acc * self.dt, self.max_acc * self.dt)
        self.v = self.v + dv
        step = self.v * self.dt
        # Never overshoot within one step: land on the target and stop there.
        land = np.abs(step) >= np.abs(err)
        self.p = np.where(land, target, self.p + step)
        self.v = np.where(land, 0.0, self.v)
        if self.low is not None and self.high is not None:
            # Braking after a reversal can carry past the old target: never past the bounds.
            clipped = np.clip(self.p, self.low, self.high)
            self.v = np.where(clipped != self.p, 0.0, self.v)
            self.p = clipped
        return self.p.copy()

    def halt(self) -> None:
        """Forget the velocity (after a stop the robot is still)."""
        self.v[:] = 0.0
