"""Absolute targets with execution times: what the runtime sends a bridge that owns time.

A delta action (an end-effector step) means nothing without the setpoint it applies to; if
it travelled as a delta, a message dropped by the latest-only action link would be motion
lost for good. So the runtime adds delta actions up here, before anything can be dropped:
every target that leaves the process is absolute, and the next one says where to be even
if this one is lost. The sum starts from the bridge's own target (its state stream) and
starts again from it whenever the bridge's setpoint stops being the runtime's last target
(it refused one, held, stopped, was reset: :data:`~.safety.RESYNC_EVENTS`), using only a
state the bridge published after that event.

Each target is stamped with the time it is to be reached on the bridge's clock: the plan's
tick (a regular grid, whatever the control thread's jitter) plus a lead of a few control
periods, so that the bridge always holds the next waypoint before it needs it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from . import protocol as P
from .safety import RESYNC_EVENTS

TARGET_STREAMS = ("waypoints", "per_tick")  # how targets travel: timestamped absolute, or this tick's action


class AbsoluteTargets:
    """Delta actions added up from the bridge's target; absolute dimensions passed through."""

    def __init__(self, delta: np.ndarray):
        self.delta = np.asarray(delta, bool)
        self.base: np.ndarray | None = None  # the last absolute target sent (None: wait for the bridge's)
        self._rebase_after = float("-inf")  # bridge time: only a state published after it may set the base
        self.counts: Counter[str] = Counter()

    def on_event(self, event: P.Event) -> None:
        """The bridge's setpoint moved away from our last target: start again from its state."""
        if event.kind in RESYNC_EVENTS:
            self.base = None
            self._rebase_after = max(self._rebase_after, event.stamp)
            self.counts["rebase"] += 1

    def on_state(self, state: P.RobotState) -> None:
        if self.base is None and state.stamp >= self._rebase_after:
            self.base = np.asarray(state.target, np.float64).copy()

    def target(self, action: np.ndarray) -> np.ndarray | None:
        """The absolute target of ``action`` (None while the bridge's target is unknown);
        it becomes the base of the next one."""
        if self.base is None:
            self.counts["waiting_for_bridge_target"] += 1
            return None
        action = np.asarray(action, np.float64)
        self.base = np.where(self.delta, self.base + action, action)
        return self.base.copy()
