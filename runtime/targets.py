"""Absolute targets with execution times: what the runtime sends a bridge that owns time.

A delta action (an end-effector step) means nothing without the setpoint it applies to; if
it travelled as a delta, a message dropped by the latest-only action link would be motion
lost for good. So the runtime adds delta actions up here, before anything can be dropped:
every target that leaves the process is absolute, and the next one says where to be even
if this one is lost. The sum starts from the bridge's own target (its state stream) and
starts again from it whenever the bridge put its setpoint where the robot is (it held,
stopped, was reset: :data:`REST_EVENTS`), using only a state it published after that event.

Each plan is this tick's target and the plan's next ones (a preview the safety gate's
limits were applied to; each is filtered again on its own tick), stamped with the times
they are to be reached on the bridge's clock: the plan's ticks (a regular grid, whatever
the control thread's jitter) plus a lead of a few control periods. The bridge always holds
the next waypoints before it needs them, and a control thread delayed by inference (the
GIL, a page fault) for less than the preview does not reach the robot.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from . import protocol as P

TARGET_STREAMS = ("waypoints", "per_tick")  # how targets travel: timestamped absolute, or this tick's action
# Bridge events after which its setpoint rests where the robot is (no plan any more): the sum
# starts again from there. A refused plan leaves the bridge's older plan running: the sum goes on.
REST_EVENTS = frozenset({"watchdog_hold", "watchdog_stop", "hold", "reset"})


class AbsoluteTargets:
    """Delta actions added up from the bridge's target; absolute dimensions passed through;
    the sums kept inside the bridge's workspace (a step beyond it is lost, as the bridge would
    refuse it)."""

    def __init__(self, delta: np.ndarray, workspace: tuple[np.ndarray, np.ndarray] | None = None):
        self.delta = np.asarray(delta, bool)
        self.workspace = workspace
        self.base: np.ndarray | None = None  # the last absolute target of a tick (None: wait for the bridge's)
        self._rebase_after = float("-inf")  # bridge time: only a state published after it may set the base
        self.counts: Counter[str] = Counter()

    def on_event(self, event: P.Event) -> None:
        """The bridge put its setpoint where the robot is: start again from its state."""
        if event.kind in REST_EVENTS:
            self.base = None
            self._rebase_after = max(self._rebase_after, event.stamp)
            self.counts["rebase"] += 1

    def on_state(self, state: P.RobotState) -> None:
        if self.base is None and state.stamp >= self._rebase_after:
            self.base = np.asarray(state.target, np.float64).copy()

    def plan(self, actions: np.ndarray, commit: int = 0) -> np.ndarray | None:
        """Absolute targets [T, A] of consecutive actions (None while the bridge's target is
        unknown); the ``commit``-th (this tick's) becomes the base of the next plan."""
        if self.base is None:
            self.counts["waiting_for_bridge_target"] += 1
            return None
        actions = np.asarray(actions, np.float64).reshape(-1, len(self.delta))
        out = np.empty_like(actions)
        previous = self.base
        for i, action in enumerate(actions):
            out[i] = np.where(self.delta, previous + action, action)
            if self.workspace is not None:
                out[i] = np.clip(out[i], *self.workspace)
            previous = out[i]
        self.base = out[commit].copy()
        return out

    def target(self, action: np.ndarray) -> np.ndarray | None:
        """The absolute target of this tick's ``action`` alone."""
        out = self.plan(np.asarray(action)[None])
        return None if out is None else out[0]
