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


class WaypointSchedule:
    """Absolute targets with execution times, executed on the bridge's clock: the goal at time
    ``t`` is the linear interpolation between the waypoints around ``t``, held after the last.

    The schedule always begins at a point at or before now, so the goal never jumps when a
    plan arrives: a new plan is joined from the goal of the moment (an anchor at ``now``) and
    replaces every waypoint at or after its first time. Waypoints whose time has passed are
    skipped, never jumped to. What moves the robot is still the :class:`LimitedInterpolator`
    following this goal, so velocity and acceleration stay bounded whatever the plans say.
    """

    def __init__(self, position: np.ndarray, now: float):
        self._t: list[float] = [float(now)]
        self._p: list[np.ndarray] = [np.asarray(position, np.float64).copy()]
        # Per point, the time a following waypoint is measured from (its own time for a
        # waypoint the runtime sent; None for a rest: "now", whenever the runtime resumes).
        self._ref: list[float | None] = [None]

    def goal(self, now: float) -> np.ndarray:
        """The target at ``now``; forgets the points before the segment ``now`` falls in."""
        while len(self._t) > 1 and self._t[1] <= now:
            del self._t[0], self._p[0], self._ref[0]
        if len(self._t) == 1 or now <= self._t[0]:
            return self._p[0].copy()
        w = (now - self._t[0]) / (self._t[1] - self._t[0])
        return (1.0 - w) * self._p[0] + w * self._p[1]

    def end(self) -> np.ndarray:
        """Where the schedule ends (the target the robot is heading for)."""
        return self._p[-1].copy()

    def __len__(self) -> int:
        return len(self._t)

    def reference(self, first: float, now: float) -> tuple[float, np.ndarray]:
        """(time, target) that a plan starting at ``first`` continues from: the last point
        before it. A rest counts as reached now (a runtime resuming after a pause may not jump
        by the pause's length); a waypoint keeps its time (after a dropped plan the next one
        may be a few steps away, as its time says)."""
        self.goal(now)
        i = max([j for j, t in enumerate(self._t) if t < first], default=0)
        ref = self._ref[i]
        return (now if ref is None else ref), self._p[i].copy()

    def plan(self, times: np.ndarray, targets: np.ndarray, now: float) -> int:
        """Schedule ``targets`` at ``times`` (increasing); returns how many were in the past
        (skipped). Points after now and before ``times[0]`` stay; later ones are replaced."""
        times, targets = np.asarray(times, np.float64), np.asarray(targets, np.float64)
        future = times > now
        if not future.any():
            return len(times)
        times, targets = times[future], targets[future]
        anchor = self.goal(now)
        # The anchor continues what the goal was doing: holding a point (keeps its reference
        # time) or moving along a segment (measured from now).
        holding = len(self._t) == 1 or now <= self._t[0]
        anchor_ref = self._ref[0] if holding else float(now)
        keep = [j for j, t in enumerate(self._t) if now < t < times[0]]
        self._t = [float(now), *(self._t[j] for j in keep), *times.tolist()]
        self._p = [anchor, *(self._p[j] for j in keep), *targets]
        self._ref = [anchor_ref, *(self._ref[j] for j in keep), *times.tolist()]
        return int(np.count_nonzero(~future))
