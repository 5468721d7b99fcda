"""The runtime: cameras -> inference worker -> action plan -> safety -> bridge, at the
robot's control rate.

Threads: each camera keeps its newest frame; one inference worker runs at most one
inference at a time, always on the newest observation, when the plan is about to run
dry; the control loop (the caller's thread) ticks at a fixed rate, merges finished
chunks, sends one checked target per tick, and never blocks on the network or a log.

On a tick without a target the runtime tells the bridge why in its heartbeat
(:class:`~vpp_edge.runtime.protocol.RuntimeMode`): idle on purpose, starved, or stop; only
an idle runtime keeps the bridge holding. The control loop watches the inference and
camera threads every tick: one that failed ends the run with the robot held then stopped,
and :class:`~vpp_edge.runtime.threads.ThreadFailure` (a non-zero exit for its supervisor).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .cameras.base import Camera, StaleFrameError
from .chunking import ActionPlan
from .link import BridgeLink
from .metrics import Metrics
from vpp_edge.normalization import StateError
from vpp_edge.robot_description import parse_state_layout

from .policy import Chunk, EngineOutputError, RuntimePolicy
from . import realtime
from .proprio import state_vector
from .protocol import RuntimeMode
from .robot_config import RobotConfig
from .safety import Mode, SafetyGate
from .targets import TARGET_STREAMS, AbsoluteTargets
from .threads import ThreadFailure, describe, guarded

log = logging.getLogger(__name__)

# Verdicts whose action is the last safe one again, not this tick's: never re-sent (a delta
# action sent twice moves the robot twice); the tick sends a heartbeat instead.
NOT_FRESH = frozenset({"hold", "starvation", "action_invalid"})
GRID_PHASE = 0.05  # control ticks fall this fraction of a plan step after the plan's grid points
MAX_COUNTERS = 256  # distinct counter names a run keeps (bridge event kinds beyond it count as bridge_other)


@dataclass(frozen=True)
class RunOptions:
    duration_s: float = 10.0
    smoothing: str = "crossfade"
    crossfade_steps: int = 3  # smoothing "crossfade": ticks over which a new chunk fades in
    margin_steps: int = 2  # infer when the plan would run dry within p95 latency + this many ticks
    ensemble_m: float = 0.1  # smoothing "ensemble": weight exp(-m * i) of a tick's i-th vote, oldest first
    action_dt: float | None = None  # spacing of the chunk's actions (default: the control period)
    realtime_priority: int = 0  # >0: SCHED_FIFO priority for the control thread (needs CAP_SYS_NICE)
    stop_when: Callable[[], bool] | None = None  # checked every tick: end the run early (e.g. task done)
    tick_record_every: int = 1  # a "tick" record (planned, sent, state) every N ticks when logging; 0: none
    # How targets travel (runtime/targets.py): "waypoints", absolute and stamped with the time the
    # bridge reaches them (its servo loop owns time), or "per_tick", this tick's action as it comes.
    target_stream: str = "waypoints"
    waypoint_lead_ticks: int = 2  # waypoints are due this many control periods after their tick
    waypoint_horizon: int = 8  # waypoints per plan: this tick's and the next planned ones (a preview)
    # Measurement only: every inference takes this much longer, as on a slower engine (a Jetson
    # at paper scale), so smoothing and latency compensation can be compared closed loop here.
    inject_latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.target_stream not in TARGET_STREAMS:
            raise ValueError(f"target_stream '{self.target_stream}' unknown; allowed: {list(TARGET_STREAMS)}")
        if self.waypoint_lead_ticks < 1:
            raise ValueError("waypoint_lead_ticks must be at least 1 (a waypoint due now is already late)")
        if self.waypoint_horizon < 1:
            raise ValueError("waypoint_horizon must be at least 1 (this tick's target)")
        if not self.inject_latency_s >= 0:
            raise ValueError(f"inject_latency_s must be >= 0, got {self.inject_latency_s}")


class InferenceWorker:
    """Runs the policy on the newest observation whenever triggered; one at a time."""

    def __init__(self, policy: RuntimePolicy, cameras: Sequence[Camera], max_age_s: float, metrics: Metrics,
                 state_source: Callable[[], np.ndarray] | None = None):
        self.policy, self.cameras, self.max_age_s, self.metrics = policy, cameras, max_age_s, metrics
        # The raw robot state for a policy that takes one (raises StateError when there is none fit to use).
        self.state_source = state_source
        self._trigger = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._done: list[tuple[Chunk, float, float]] = []  # (chunk, obs_stamp, finished)
        self.busy = False
        self._prefix: tuple[int, np.ndarray] | None = None  # plan snapshot for real-time chunking
        self._instruction: str | None = None  # applied before the next inference
        self.plan_dt = 0.0
        self.delay_steps = 0
        self.inject_latency_s = 0.0  # RunOptions.inject_latency_s: measurement only
        self.failure: str | None = None  # set when the thread died of an unexpected exception
        self._thread = guarded("inference", self._run, self._fail)

    def _fail(self, name: str, exc: Exception) -> None:
        self.failure = describe(name, exc)
        self.busy = False

    def start(self) -> "InferenceWorker":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._trigger.set()
        self._thread.join(timeout=30.0)

    def set_instruction(self, text: str) -> None:
        """Change the task; the text graph runs once, on this thread, before the next inference."""
        with self._lock:
            self._instruction = text

    def trigger(self, prefix: tuple[int, np.ndarray] | None = None) -> None:
        """Start an inference; ``prefix`` (first tick, actions) is what the plan still holds."""
        if not self.busy:
            self.busy = True
            self._prefix = prefix
            self._trigger.set()

    def _aligned_prefix(self, obs_stamp: float) -> np.ndarray | None:
        """The plan's actions from the new chunk's first tick on (what must be continued)."""
        if self._prefix is None or not len(self._prefix[1]):
            return None
        first, actions = self._prefix
        offset = int(np.ceil(obs_stamp / self.plan_dt - 1e-9)) - first
        return actions[offset:] if 0 <= offset < len(actions) else None

    def take(self) -> list[tuple[Chunk, float, float]]:
        with self._lock:
            done, self._done = self._done, []
        return done

    def observe(self) -> tuple[np.ndarray, float]:
        """All views, newest frames; the observation time is the oldest view's capture time."""
        now = time.monotonic()
        frames = [cam.latest(self.max_age_s, now) for cam in self.cameras]
        self.metrics.observe("frame_age_ms", (now - min(f.stamp for f in frames)) * 1e3)
        return np.concatenate([f.image for f in frames]), min(f.stamp for f in frames)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._trigger.wait(0.1)
            if self._stop.is_set() or not self._trigger.is_set():
                continue
            self._trigger.clear()
            try:
                with self._lock:
                    text, self._instruction = self._instruction, None
                if text is not None:
                    self.metrics.observe("text_ms", self.policy.set_instruction(text))
                    self.metrics.record("event", kind="instruction", detail=text)
                frames, obs_stamp = self.observe()
                prefix = self._aligned_prefix(obs_stamp) if self.plan_dt else None
                state = {"state": self.state_source()} if self.state_source is not None else {}
                chunk = self.policy.infer(frames, prefix=prefix, delay_steps=self.delay_steps, **state)
                if self.inject_latency_s > 0 and self._stop.wait(self.inject_latency_s):
                    continue  # stopped while waiting: a chunk this late is not wanted
                finished = time.monotonic()
                for stage, ms in chunk.timings_ms.items():
                    self.metrics.observe(f"{stage}_ms", ms)
                self.metrics.observe("end_to_end_ms", (finished - obs_stamp) * 1e3)
                with self._lock:
                    self._done.append((chunk, obs_stamp, finished))
            except StaleFrameError as exc:  # expected faults are counted; anything else fails the thread
                self.metrics.count("stale_observation")
                self.metrics.record("event", kind="stale_observation", detail=str(exc))
                self._stop.wait(0.02)
            except StateError as exc:  # no chunk from a state the policy must not see; counted by reason
                reason = str(exc).split(":", 1)[0]
                self.metrics.count("state_refused")
                self.metrics.count(f"state_{reason}")
                self.metrics.record("event", kind="state_refused", detail=str(exc))
                self._stop.wait(0.02)
            except EngineOutputError as exc:
                self.metrics.count("engine_invalid")
                self.metrics.record("event", kind="engine_invalid", detail=str(exc))
            finally:
                self.busy = False


class Runtime:
    def __init__(self, policy: RuntimePolicy, cameras: Sequence[Camera], robot: RobotConfig, link: BridgeLink,
                 options: RunOptions, metrics: Metrics):
        if robot.action_dim != policy.preset.action_dim:
            raise ValueError(f"robot '{robot.name}' takes {robot.action_dim} actions, the model outputs "
                             f"{policy.preset.action_dim}")
        self.policy, self.cameras, self.robot, self.link, self.options = policy, cameras, robot, link, options
        self.metrics = metrics
        self.safety = SafetyGate(robot)
        self.plan = ActionPlan(options.action_dt or robot.dt, options.smoothing, options.crossfade_steps,
                               options.ensemble_m)
        self.worker = InferenceWorker(policy, cameras, robot.stale_observation_s, metrics,
                                      self._state_source(policy, robot))
        self.worker.inject_latency_s = options.inject_latency_s
        self._failure: str | None = None
        self._ticks = 0
        self.targets: AbsoluteTargets | None = None  # after the handshake (it says which dimensions are deltas)
        # The bridge refuses a plan reaching beyond its hold deadline: keep the lead well inside it.
        self._lead_ticks = max(1, min(options.waypoint_lead_ticks, int(robot.watchdog_hold_s / 2 / self.plan.dt)))
        self._horizon = max(1, min(options.waypoint_horizon,
                                   int(0.75 * robot.watchdog_hold_s / self.plan.dt) - self._lead_ticks))
        if self.plan.policy.inpaints:  # the sampler continues the plan (real-time chunking)
            self.worker.plan_dt = self.plan.dt

    def _state_source(self, policy: RuntimePolicy, robot: RobotConfig) -> Callable[[], np.ndarray] | None:
        """For a policy that takes the robot state: a reader of it from the bridge's newest
        state reply, at the robot description's ``runtime.policy_state``, refused when older
        than ``stale_observation_s``; None for any other policy."""
        if not getattr(policy, "takes_state", False):
            return None
        if not robot.policy_state:
            raise ValueError(f"the policy takes the robot state ({policy.artifact.state_normalizer.dim} values) but "
                             f"robot '{robot.name}' names none: set runtime.policy_state in its description")
        layout = parse_state_layout(list(robot.policy_state), f"robot '{robot.name}' runtime.policy_state")

        def read() -> np.ndarray:
            last = self.link.last_state
            if last is not None and self.link.bridge_now() - last.stamp > robot.stale_observation_s:
                raise StateError(f"stale: the bridge's last state is {self.link.bridge_now() - last.stamp:.2f} s old")
            return state_vector(last, layout)

        return read

    def set_instruction(self, text: str) -> None:
        """Change the task at run time (the text graph re-runs once, before the next inference)."""
        self.worker.set_instruction(text)

    def run(self) -> dict:
        """Run for ``duration_s`` (or until Ctrl-C); returns the summary. The calling thread
        runs the control loop, real-time when ``realtime_priority`` asks, and leaves it with
        the scheduling policy it came with (an embedding program's thread stays its own)."""
        with realtime.scheduling_kept():
            return self._run()

    def _run(self) -> dict:
        dt = self.robot.dt
        status = self.link.handshake(self.robot.name, self.robot.action_dim)
        self.safety.absolute = ~np.asarray(status.get("delta_dims", [True] * self.robot.action_dim), bool)
        base = getattr(self.policy.preset, "action_base", "none")
        if base != "none" and not self.safety.absolute.all():
            # The chunk already holds commands (prediction + state): summing them again as deltas would be wrong.
            deltas = np.flatnonzero(~self.safety.absolute).tolist()
            raise ValueError(f"the policy's actions are absolute commands (preset action_base '{base}') but robot "
                             f"'{self.robot.name}' has delta dimensions {deltas}: describe the robot with delta_dims "
                             "all false")
        self.metrics.record("handshake", robot=status.get("robot"), delta_dims=(~self.safety.absolute).tolist())
        self.targets = AbsoluteTargets(~self.safety.absolute, getattr(self.link, "workspace", None))
        for cam in self.cameras:
            cam.start()
        self.worker.start()
        if self.options.realtime_priority > 0:  # after the threads exist: they keep the normal policy
            _realtime(self.options.realtime_priority, self.metrics)
        # Tick just after the plan's grid points (multiples of its dt on the monotonic clock): a
        # late wake-up then stays in its grid interval, so no planned action is taken twice or skipped.
        start = (np.floor(time.monotonic() / self.plan.dt) + 1 + GRID_PHASE) * self.plan.dt
        time.sleep(max(0.0, start - time.monotonic()))
        tick_time = start
        try:
            stop_when = self.options.stop_when
            while tick_time - start < self.options.duration_s and not (stop_when and stop_when()):
                if self._check_threads() is not None:
                    break
                now = time.monotonic()
                self.metrics.observe("jitter_ms", abs(now - tick_time) * 1e3)
                self._tick(now)
                tick_time += dt
                delay = tick_time - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    self.metrics.count("overrun")
                    if -delay > 5 * dt:  # far behind: skip ticks rather than burst
                        tick_time = time.monotonic()
        except KeyboardInterrupt:
            self.metrics.count("interrupted")
        finally:
            self.worker.stop()
            for cam in self.cameras:
                cam.stop()
            self.link.command("hold")
        if self._failure is not None:  # held above; now stop: the robot must not wait for a dead runtime
            self.link.send_heartbeat(RuntimeMode.STOP)
            raise ThreadFailure(f"runtime: {self._failure}; robot held, then stopped")
        summary = self.metrics.summary()
        summary["safety"] = dict(self.safety.counts)
        summary["boundary_jump"] = {"max": max(self.plan.boundary_jumps, default=0.0),
                                    "mean": float(np.mean(self.plan.boundary_jumps)) if self.plan.boundary_jumps else 0.0,
                                    "inner_mean": float(np.mean(self.plan.inner_jumps)) if self.plan.inner_jumps else 0.0}
        summary["action_jerk"] = {"mean": float(np.mean(self.plan.jerks)) if self.plan.jerks else 0.0,
                                  "max": max(self.plan.jerks, default=0.0)}
        summary["latency_tracker_s"] = self.plan.latency.stats()
        summary["link"] = dict(self.link.counts)  # inputs from the bridge refused, by reason
        if self.targets is not None:
            summary["link"].update(self.targets.counts)
        return summary

    def _check_threads(self) -> str | None:
        """Why the run must end (a worker or camera thread failed), or None."""
        failures = [self.worker.failure, *(cam.failure for cam in self.cameras)]
        failure = next((f for f in failures if f is not None), None)
        if failure is not None and self._failure is None:
            self._failure = failure
            self.metrics.count("thread_failed")
            self.metrics.record("event", kind="thread_failed", detail=failure)
        return failure

    def _heartbeat_mode(self, now: float) -> RuntimeMode:
        """What the bridge should make of a tick without a target."""
        if self.safety.mode(now) in (Mode.STOP, Mode.ESTOP):
            return RuntimeMode.STOP
        return RuntimeMode.STARVED if self.safety.acting else RuntimeMode.IDLE

    def _tick(self, now: float) -> None:
        for chunk, obs_stamp, _finished in self.worker.take():
            reason = self.safety.check_chunk(chunk.actions, obs_stamp, now)
            if reason is not None:
                self.metrics.count("chunk_rejected")
                self.metrics.record("event", kind="chunk_rejected", detail=reason)
                continue
            stats = self.plan.add_chunk(chunk.actions, obs_stamp, now, seq=int(self.metrics.counts["chunks"]))
            self.safety.fresh_chunk(now)
            self.metrics.count("chunks")
            self.metrics.count("actions_skipped_late", stats.skipped)
            self.metrics.record("chunk", obs_stamp=obs_stamp, skipped=stats.skipped, used=stats.used,
                                latency_s=stats.latency_s, timings_ms=chunk.timings_ms,
                                **({"actions": chunk.actions.tolist()} if self.metrics.logging else {}))
        state, events = self.link.poll()
        for event in events:
            # Event kinds come from the bridge (its drivers name their own): a counter per kind,
            # but not an unbounded number of kinds.
            known = f"bridge_{event.kind}" in self.metrics.counts or len(self.metrics.counts) < MAX_COUNTERS
            self.metrics.count(f"bridge_{event.kind}" if known else "bridge_other")
            self.metrics.record("bridge_event", kind=event.kind, detail=event.detail)
            self.safety.bridge_event(event.kind)
            self.targets.on_event(event)
        if state is not None:
            self.targets.on_state(state)
            self.safety.robot_target(state.target)
            if state.estopped:
                self.safety.estop("bridge reports e-stop")
        last = self.link.last_state
        if state is None and last is not None and self.link.bridge_now() - last.stamp > 1.0:
            self.metrics.count("bridge_silent")
        action = self.plan.pop(now)
        missed = self.plan.take_missed()  # planned for ticks this thread woke too late for
        verdict = self.safety.filter(action, now)
        for e in verdict.events:
            self.metrics.count(e)
        self.metrics.observe("queue_depth", self.plan.remaining(now))
        # Only fresh, checked actions go out. Holding means sending nothing: the bridge keeps
        # its last absolute setpoint (re-sending a delta action would keep moving the robot).
        sent = verdict.action is not None and not NOT_FRESH & set(verdict.events)
        if sent:
            self._send(verdict.action, now, missed)
        else:  # alive without a target: say why (only an idle runtime keeps the bridge holding)
            self.link.send_heartbeat(self._heartbeat_mode(now))
        self._ticks += 1
        every = self.options.tick_record_every
        if self.metrics.logging and every and self._ticks % every == 0:  # queued for the log thread ('vpp plot')
            self.metrics.record("tick", planned=None if action is None else np.asarray(action).tolist(),
                                target=np.asarray(verdict.action).tolist() if sent else None, events=list(verdict.events),
                                state=None if state is None else {"stamp": state.stamp, "mode": state.mode,
                                                                  "target": state.target.tolist(),
                                                                  "joints": state.joints.tolist()})
        if self.safety.mode(now) is not Mode.ESTOP and self.plan.needs_inference(now, self.options.margin_steps):
            if self.plan.policy.inpaints and not self.worker.busy:
                self.worker.delay_steps = int(np.ceil(self.plan.latency.stats()["p95"] / self.plan.dt))
                self.worker.trigger(self.plan.continuation())
            else:
                self.worker.trigger()


    def _send(self, action: np.ndarray, now: float, missed: np.ndarray) -> None:
        """This tick's checked action to the bridge, as the options' target stream says.
        ``missed``: planned actions of ticks this thread woke too late for; the last plan's
        preview already took the robot through them, so the sum must include them (at most a
        preview's worth: beyond it the bridge held and they are lost)."""
        if self.options.target_stream == "per_tick":
            ok = self.link.send_target(action, now, self.robot.dt)
        else:
            ahead = self.plan.snapshot(now + self.plan.dt)[1][: self._horizon - 1]  # the next ticks' actions
            owed = np.clip(missed[-(self._horizon - 1):], self.robot.low, self.robot.high) \
                if len(missed) and self._horizon > 1 else np.zeros((0, len(action)))
            actions = np.vstack([owed, action[None], *([self.safety.preview(ahead)] if len(ahead) else [])])
            targets = self.targets.plan(actions, commit=len(owed))
            if targets is None:  # the bridge's target is not known yet: nothing to add the deltas to
                self.link.send_heartbeat(RuntimeMode.STARVED)
                return
            # Due on the plan's grid (not this tick's jittered clock), a lead ahead: the bridge's
            # servo loop reaches them then, on its own clock.
            due = (self.plan.tick_of(now) + self._lead_ticks) * self.plan.dt
            ok = self.link.send_waypoints(targets[len(owed):], due, self.plan.dt)
        self.metrics.count("targets_sent" if ok else "bridge_unreachable")


def _realtime(priority: int, metrics: Metrics) -> None:
    """SCHED_FIFO for the calling (control) thread only, so inference and cameras cannot
    delay its ticks, and memory locked where the unit grants MEMLOCK; without permission it
    stays best-effort and says so (runtime/realtime.py)."""
    for outcome in (realtime.control_thread_fifo(priority), realtime.lock_memory()):
        if outcome.ok:
            metrics.record("event", kind="realtime", detail=outcome.detail)
        else:
            metrics.count("realtime_denied")
            log.warning("%s", outcome.detail)
