"""Latency-aware action chunking.

A chunk predicted from an observation taken at ``obs_stamp`` holds actions for the
control ticks ``obs_stamp + i * dt``. By the time it arrives, inference latency has
passed: actions whose time is gone are skipped. The rest are merged with the current
plan by a smoothing policy, because consecutive chunks disagree at their boundary:

* ``none``: the new chunk replaces the plan from its first still-valid action;
* ``ensemble``: ACT-style temporal ensembling: every chunk that covers a tick votes,
  weighted ``exp(-m * k)`` with k = 0 for the oldest prediction;
* ``crossfade``: the first ``k`` overlapping ticks blend linearly from old to new;
* ``rtc``: real-time chunking: the sampler itself inpaints the plan's remaining actions
  into the new chunk (see ``predict_step.predict_actions``), which then replaces the plan.

Smoothing policies are a registry (:data:`SMOOTHING`): a new one is a
:class:`SmoothingPolicy` subclass decorated ``@SMOOTHING.register("name")``, in this module or
in its own (imported before the runtime is built).

The control loop asks for one action per tick; an empty plan is *starvation* (the
caller holds the last safe target). numpy only; no locking: one owner thread.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from vpp_edge.registry import Registry

JUMP_WINDOW = 10_000
MISSED_KEPT = 64  # actions take_missed can return (older ones are gone: the robot held meanwhile)
EXECUTED_KEPT = 8  # executed actions real-time chunking can continue (observations are younger than this)


class LatencyTracker:
    """Recent observation-to-chunk latencies (s): p50 / p95 / max over a sliding window."""

    def __init__(self, window: int = 50):
        self._values: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def stats(self) -> dict[str, float]:
        if not self._values:
            return {"p50": 0.0, "p95": 0.0, "max": 0.0, "n": 0}
        arr = np.asarray(self._values)
        return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
                "max": float(arr.max()), "n": len(arr)}


@dataclass
class _Slot:
    tick: int
    votes: list[np.ndarray] = field(default_factory=list)  # predictions for this tick, oldest first
    chunk_seq: int = -1  # the chunk that last wrote this tick


@dataclass
class MergeStats:
    skipped: int  # actions whose time had passed on arrival
    used: int  # actions added to the plan
    latency_s: float


class SmoothingPolicy:
    """How a new chunk's actions merge with the plan's actions for the same ticks.

    ``keeps_overlap``: False drops the plan's ticks from the new chunk's first one on (the new
    chunk replaces them); True calls :meth:`merge` for every tick both cover.
    ``inpaints``: the sampler continues the plan's remaining actions (the runtime passes them
    as a prefix, see ``predict_step.predict_actions``)."""

    keeps_overlap = True
    inpaints = False

    def __init__(self, crossfade_steps: int = 3, ensemble_m: float = 0.1):
        self.crossfade_steps = max(1, int(crossfade_steps))
        self.ensemble_m = float(ensemble_m)

    def merge(self, votes: list[np.ndarray], current: np.ndarray, new: np.ndarray, overlap: int) -> list[np.ndarray]:
        """The tick's votes after ``new`` arrives; ``current`` is the tick's value so far and
        ``overlap`` counts the overlapping ticks of this chunk before this one."""
        return [new]

    def value(self, votes: list[np.ndarray]) -> np.ndarray:
        """The action of a tick from its votes (oldest first)."""
        return votes[-1]


SMOOTHING: Registry[type[SmoothingPolicy]] = Registry("smoothing policy")


@SMOOTHING.register("none")
class Replace(SmoothingPolicy):
    """The new chunk replaces the plan from its first still-valid action."""

    keeps_overlap = False


@SMOOTHING.register("ensemble")
class Ensemble(SmoothingPolicy):
    """ACT's temporal ensembling: every chunk covering a tick votes, weighted exp(-m * k)."""

    def merge(self, votes, current, new, overlap):
        return [*votes, new]

    def value(self, votes):
        if len(votes) == 1:
            return votes[0]
        w = np.exp(-self.ensemble_m * np.arange(len(votes)))
        return np.tensordot(w / w.sum(), np.stack(votes), axes=1)


@SMOOTHING.register("crossfade")
class Crossfade(SmoothingPolicy):
    """Old -> new linearly over the first ``crossfade_steps`` overlapping ticks, then new only."""

    def merge(self, votes, current, new, overlap):
        alpha = min(1.0, (overlap + 1) / (self.crossfade_steps + 1))
        return [(1 - alpha) * current + alpha * new]


@SMOOTHING.register("rtc")
class RealTimeChunking(Replace):
    """The sampler inpaints the plan's remaining actions into the new chunk, which replaces the plan."""

    inpaints = True


class ActionPlan:
    """Time-indexed plan of future actions on the control grid ``tick * dt``."""

    def __init__(self, dt: float, smoothing: str = "none", crossfade_steps: int = 3, ensemble_m: float = 0.1,
                 latency: LatencyTracker | None = None):
        if smoothing not in SMOOTHING:
            raise ValueError(f"smoothing '{smoothing}' unknown; allowed: {SMOOTHING.names()}")
        if dt <= 0:
            raise ValueError(f"dt must be positive, got {dt}")
        self.dt = dt
        self.smoothing = smoothing
        self.policy = SMOOTHING.get(smoothing)(crossfade_steps, ensemble_m)
        self.crossfade_steps, self.ensemble_m = self.policy.crossfade_steps, self.policy.ensemble_m
        self.latency = latency or LatencyTracker()
        self._slots: deque[_Slot] = deque()
        self._last_seq = -1
        # Sliding windows (a deployed run never ends): statistics are over the last JUMP_WINDOW ticks.
        self.boundary_jumps: deque[float] = deque(maxlen=JUMP_WINDOW)  # |a_t - a_{t-1}| when the source chunk changes
        self.inner_jumps: deque[float] = deque(maxlen=JUMP_WINDOW)  # the same within one chunk, for comparison
        # |a_t - 2 a_{t-1} + a_{t-2}| of the actions executed: for delta (velocity-like) actions the
        # hand's jerk up to a constant; what a smoothing policy is meant to keep small.
        self.jerks: deque[float] = deque(maxlen=JUMP_WINDOW)
        self._prev: tuple[np.ndarray, int] | None = None
        self._prev2: np.ndarray | None = None
        # Planned actions whose tick passed without being popped (the control thread woke late):
        # a caller adding delta actions up may still owe them (see take_missed).
        self._missed: deque[np.ndarray] = deque(maxlen=MISSED_KEPT)
        # The last actions popped, by tick: an observation taken a tick or two ago starts its
        # chunk at ticks already executed, and real-time chunking must continue those too.
        self._executed: deque[tuple[int, np.ndarray]] = deque(maxlen=EXECUTED_KEPT)

    def tick_of(self, stamp: float) -> int:
        """The control tick at or after ``stamp`` (ticks are multiples of dt on the monotonic clock)."""
        return math.ceil(stamp / self.dt - 1e-9)

    def add_chunk(self, actions: np.ndarray, obs_stamp: float, now: float, seq: int) -> MergeStats:
        """Merge a chunk (actions [T, A] for ticks from ``obs_stamp``) into the plan."""
        self.latency.add(max(0.0, now - obs_stamp))
        first = self.tick_of(obs_stamp)
        current = self.tick_of(now)
        skipped = max(0, min(len(actions), current - first))
        new = {first + i: actions[i] for i in range(skipped, len(actions))}
        self._drop_past(current)
        existing = {s.tick: s for s in self._slots}
        if not self.policy.keeps_overlap:
            existing = {t: s for t, s in existing.items() if t < min(new, default=current)}
        overlap = 0
        for tick in sorted(new):
            slot = existing.get(tick)
            if slot is None or not slot.votes:
                existing[tick] = _Slot(tick, [new[tick]], seq)
                continue
            slot.votes = self.policy.merge(slot.votes, self._value(slot), new[tick], overlap)
            overlap += 1
            slot.chunk_seq = seq
        self._slots = deque(existing[t] for t in sorted(existing))
        self._last_seq = seq
        return MergeStats(skipped=skipped, used=len(new), latency_s=max(0.0, now - obs_stamp))

    def _drop_past(self, current: int) -> None:
        while self._slots and self._slots[0].tick < current:
            slot = self._slots.popleft()
            if slot.votes:
                self._missed.append(self._value(slot))

    def take_missed(self) -> np.ndarray:
        """The planned actions [n, A] whose ticks passed unpopped since the last call, oldest first."""
        missed, self._missed = list(self._missed), deque(maxlen=MISSED_KEPT)
        return np.stack(missed) if missed else np.zeros((0, 0))

    def _value(self, slot: _Slot) -> np.ndarray:
        return slot.votes[0] if len(slot.votes) == 1 else self.policy.value(slot.votes)

    def pop(self, now: float) -> np.ndarray | None:
        """The action for the current tick, or None (starvation) when the plan has none."""
        current = self.tick_of(now)
        self._drop_past(current)
        if not self._slots or self._slots[0].tick != current:
            return None
        slot = self._slots.popleft()
        action = self._value(slot)
        self._executed.append((slot.tick, action))
        if self._prev is not None:
            jump = float(np.linalg.norm(action - self._prev[0]))
            (self.boundary_jumps if slot.chunk_seq != self._prev[1] else self.inner_jumps).append(jump)
            if self._prev2 is not None:
                self.jerks.append(float(np.linalg.norm(action - 2 * self._prev[0] + self._prev2)))
            self._prev2 = self._prev[0]
        self._prev = (action, slot.chunk_seq)
        return action

    def snapshot(self, now: float) -> tuple[int, np.ndarray]:
        """(first tick, actions [n, A]) planned contiguously from the current tick on."""
        current = self.tick_of(now)
        actions = []
        for slot in self._slots:
            if slot.tick < current:
                continue
            if slot.tick != current + len(actions):
                break
            actions.append(self._value(slot))
        return current, (np.stack(actions) if actions else np.zeros((0, 0)))

    def continuation(self) -> tuple[int, np.ndarray]:
        """(first tick, actions [n, A]): the last actions executed and the planned ones after
        them, contiguous. What real-time chunking continues: a chunk starts at its
        observation's tick, which the control loop has usually executed by the time the
        inference runs (the plan's remaining actions alone would never line up with it)."""
        known = list(self._executed) + [(slot.tick, self._value(slot)) for slot in self._slots]
        if not known:
            return 0, np.zeros((0, 0))
        lo = hi = max(0, len(self._executed) - 1)  # the run through the last executed tick
        while lo > 0 and known[lo - 1][0] == known[lo][0] - 1:
            lo -= 1
        while hi + 1 < len(known) and known[hi + 1][0] == known[hi][0] + 1:
            hi += 1
        return known[lo][0], np.stack([a for _, a in known[lo:hi + 1]])

    def remaining(self, now: float) -> int:
        """Planned actions from the current tick on."""
        current = self.tick_of(now)
        return sum(1 for s in self._slots if s.tick >= current)

    def needs_inference(self, now: float, margin_steps: int = 1) -> bool:
        """True when the plan would run dry before a new chunk could arrive (p95 latency)."""
        lead = math.ceil(self.latency.stats()["p95"] / self.dt) + margin_steps
        return self.remaining(now) <= lead
