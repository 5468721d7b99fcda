"""Safety between the policy and the robot: every action is finite and within the
robot's limits and per-step rate, a watchdog holds then stops when chunks stop coming,
and an e-stop latch that only an explicit reset clears. Every event is counted and
logged (by the caller, off the control thread's hot path)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum

import numpy as np

from .robot_config import RobotConfig


class Mode(str, Enum):
    OK = "ok"
    HOLD = "hold"  # keep the last safe target
    STOP = "stop"  # stop the motion
    ESTOP = "estop"  # latched until reset


@dataclass(frozen=True)
class Verdict:
    action: np.ndarray | None  # what may be sent (None: send nothing new)
    events: tuple[str, ...]


# Bridge events after which the bridge's setpoint is no longer the runtime's last action:
# it refused one, or it put its setpoint where the robot is (watchdog hold/stop, a hold
# command, an e-stop reset). Rate limits must then start from the bridge's target again.
RESYNC_EVENTS = frozenset({"rejected", "watchdog_hold", "watchdog_stop", "hold", "reset"})


class SafetyGate:
    """Checks and clamps actions; owns the watchdog and the e-stop latch."""

    def __init__(self, cfg: RobotConfig):
        self.cfg = cfg
        self.counts: Counter[str] = Counter()
        self._last_safe: np.ndarray | None = None
        self._last_fresh: float | None = None
        self._estop_reason: str | None = None
        # Dimensions the robot takes as absolute setpoints (e.g. finger joints): their first
        # action is rate-limited from the robot's own target, not from nothing.
        self.absolute = np.zeros(cfg.action_dim, bool)
        self._robot_target: np.ndarray | None = None

    def robot_target(self, target: np.ndarray) -> None:
        """The bridge's current setpoint (from its state stream)."""
        self._robot_target = np.asarray(target, np.float64)

    def resync(self) -> None:
        """The robot's setpoint moved away from our last action: rate-limit the next one from
        the robot's target again."""
        self._last_safe = None
        self.counts["resync"] += 1

    def bridge_event(self, kind: str) -> None:
        """React to an event of the bridge: latch its e-stop, resync after :data:`RESYNC_EVENTS`."""
        if kind == "estop":
            self.estop("bridge e-stop")
        elif kind in RESYNC_EVENTS:
            self.resync()

    # --- e-stop latch --------------------------------------------------------------
    def estop(self, reason: str) -> None:
        if self._estop_reason is None:
            self._estop_reason = reason
            self.counts["estop_latched"] += 1

    def reset(self) -> None:
        """The only way out of an e-stop; the watchdog restarts from scratch."""
        self._estop_reason = None
        self._last_fresh = None
        self.counts["reset"] += 1

    @property
    def estopped(self) -> bool:
        return self._estop_reason is not None

    # --- watchdog ------------------------------------------------------------------
    def fresh_chunk(self, now: float) -> None:
        """A valid chunk arrived at ``now``."""
        self._last_fresh = now

    @property
    def acting(self) -> bool:
        """A chunk has arrived since the start or the last reset: the runtime means to move the robot."""
        return self._last_fresh is not None

    def mode(self, now: float) -> Mode:
        if self.estopped:
            return Mode.ESTOP
        if self._last_fresh is None:
            return Mode.HOLD
        silent = now - self._last_fresh
        if silent > self.cfg.watchdog_stop_s:
            return Mode.STOP
        if silent > self.cfg.watchdog_hold_s:
            return Mode.HOLD
        return Mode.OK

    # --- actions -------------------------------------------------------------------
    def check_chunk(self, actions: np.ndarray, obs_stamp: float, now: float) -> str | None:
        """Why a whole chunk must be dropped, or None if it may be planned."""
        if actions.ndim != 2 or actions.shape[1] != self.cfg.action_dim:
            reason = "chunk_shape"
        elif not np.all(np.isfinite(actions)):
            reason = "chunk_nan"
        elif now - obs_stamp > self.cfg.stale_observation_s:
            reason = "chunk_stale_observation"
        else:
            return None
        self.counts[reason] += 1
        return reason

    def preview(self, actions: np.ndarray) -> np.ndarray:
        """The planned actions after this tick's, as :meth:`filter` would pass them if nothing
        changed: inside the limits, each within ``max_delta`` of the one before (starting from
        the last safe action). Nothing is counted or remembered: they are sent ahead as a
        preview, and each is filtered again on its own tick."""
        out = np.clip(np.asarray(actions, np.float64), self.cfg.low, self.cfg.high)
        previous = self._last_safe
        for i in range(len(out)):
            if previous is not None:
                out[i] = np.clip(out[i], previous - self.cfg.delta, previous + self.cfg.delta)
            previous = out[i]
        return out

    def filter(self, action: np.ndarray | None, now: float) -> Verdict:
        """The action to send this tick: clamped to limits and rate, or the hold target."""
        mode = self.mode(now)
        events: list[str] = []
        if mode in (Mode.ESTOP, Mode.STOP):
            events.append(mode.value)
            self.counts[mode.value] += 1
            return Verdict(None, tuple(events))
        if mode is Mode.HOLD or action is None:
            events.append("hold" if mode is Mode.HOLD else "starvation")
            self.counts[events[-1]] += 1
            return Verdict(self._last_safe, tuple(events))
        action = np.asarray(action, np.float64)
        if action.shape != (self.cfg.action_dim,) or not np.all(np.isfinite(action)):
            self.counts["action_invalid"] += 1
            return Verdict(self._last_safe, ("action_invalid",))
        clamped = np.clip(action, self.cfg.low, self.cfg.high)
        if not np.array_equal(clamped, action):
            events.append("clamped_limits")
        reference = self._last_safe
        if reference is None and self.absolute.any() and self._robot_target is not None:
            # Absolute dimensions start from where the robot is; delta dimensions are free.
            reference = np.where(self.absolute, self._robot_target, clamped)
        if reference is not None:
            limited = np.clip(clamped, reference - self.cfg.delta, reference + self.cfg.delta)
            if not np.array_equal(limited, clamped):
                events.append("clamped_rate")
            clamped = limited
        for e in events:
            self.counts[e] += 1
        self._last_safe = clamped
        return Verdict(clamped, tuple(events))
