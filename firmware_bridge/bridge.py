"""A bridge process: ZeroMQ in, a robot driver out, safety in between.

* The bridge owns time. The runtime sends plans (:class:`~vpp_edge.runtime.protocol.Waypoints`):
  absolute targets, its delta actions already added up, with the times (on this bridge's
  clock) they are to be reached at. The servo thread executes them on its own clock,
  interpolating between waypoints (:class:`~.servo.WaypointSchedule`), so the runtime's
  scheduling jitter and a dropped or late plan do not reach the robot: a late waypoint is
  skipped, not jumped to, and the next plan says where to be. The older per-tick stream
  (action chunks whose first action is this tick's target, delta or absolute) is still
  served (``vpp run --set target_stream=per_tick``; ``bench/bridge_bench.py --jitter``
  compares the two).
* Every target and waypoint is validated (schema, dimension, finite, step size per
  waypoint interval, workspace bounds) before it can move anything; a rejected one is
  counted and published as an event with the reason.
* A fixed-rate servo thread steers towards the schedule's point of the moment (or the
  current target) with per-joint velocity and acceleration limits, and publishes robot
  state at ``state_hz``.
* Motion per second is bounded on what moves the robot: the interpolator's ``max_vel`` and
  ``max_acc`` act on every servo setpoint whatever the plans or their timing say. On the
  per-tick stream a target also moves at most ``max_step`` per message and, over any T
  seconds, at most ``cfg.burst() + max_vel * T`` whatever the message rate (a burst is
  clamped and counted as ``rate_limited``); a plan may reach at most ``hold_after_s`` ahead.
* Order and freshness: the action link belongs to the session of the runtime's last hello;
  targets and heartbeats of other sessions, replayed or reordered ones (sequence numbers
  strictly increase), stale ones and ones stamped in the future are refused and counted.
  The runtime stamps on the bridge's clock (it measures the offset at hello).
* Watchdog: no target for ``hold_after_s`` -> hold the current setpoint; no target for
  ``stop_after_s`` -> stop the motion, unless the runtime's heartbeats say it is ``idle``
  (not commanding on purpose). A ``starved`` runtime is treated as a silent one; one that
  says ``stop`` is stopped at once. E-stop latches until a ``reset`` that is fresh and in
  sequence from a session that said hello (a replayed reset is refused); ``estop`` and
  ``hold`` are obeyed from anyone, always.
* No silent thread death: a network or servo thread that fails latches the e-stop,
  publishes ``thread_failed``, and :meth:`Bridge.supervise` raises
  :class:`~vpp_edge.runtime.threads.ThreadFailure` so the process exits non-zero.
* Tracking guard: a robot measured farther than ``max_tracking_error`` from the setpoint
  it servos to (a diverging controller, a collision, a singularity the arm cannot leave)
  latches the e-stop, beside the robot's own reflexes. Drivers report the measured pose in
  setpoint units for the leading dimensions of ``ee_pose``; the rest go unchecked.
* Commands (enable, reset, estop, status, hold) arrive on a ROUTER socket and are
  answered with a correlated reply.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import zmq

from vpp_edge.runtime import protocol as P
from vpp_edge.runtime.realtime import ThreadRealtime
from vpp_edge.runtime.threads import ThreadFailure, dead, describe, guarded
from vpp_edge.runtime.transport import CurveKeys, authenticate, make_socket, send, stop_authenticator

from .config import BridgeConfig
from .driver import RobotDriver
from .factory import make_driver
from .servo import LimitedInterpolator, WaypointSchedule

log = logging.getLogger(__name__)

# A message stamped this far ahead of the bridge's clock is refused: more than the error of
# the clock offset measured at hello (half a round trip) on any link the bridge serves.
MAX_CLOCK_SKEW_S = 0.05
SESSIONS_KEPT = 64  # command sessions remembered (operators, runtimes); older ones must say hello again
SESSIONS_SEEN = 4096  # session ids ever used: a replayed hello cannot revive one
SEQUENCED_COMMANDS = frozenset({P.Command.RESET.value})  # only a fresh, in-sequence command may do these
SERVO_THREAD, NET_THREAD = "bridge-servo", "bridge-net"


@dataclass(frozen=True)
class Endpoints:
    action: str = P.ACTION_ENDPOINT
    state: str = P.STATE_ENDPOINT
    events: str = P.EVENT_ENDPOINT
    command: str = P.COMMAND_ENDPOINT
    camera: str = P.CAMERA_ENDPOINT  # bound only by drivers that render cameras (simulators)

    @classmethod
    def on(cls, host: str, base_port: int = P.DEFAULT_BASE_PORT) -> "Endpoints":
        """The ports from ``base_port`` on (default 5701-5705) on ``host`` (``0.0.0.0``: every interface)."""
        return cls(*(P.endpoint_on(host, e, base_port) for e in cls().__dict__.values()))

    def __str__(self) -> str:
        return ", ".join(f"{name} {endpoint}" for name, endpoint in self.__dict__.items() if endpoint)


@dataclass(frozen=True)
class Security:
    """How the bridge's sockets leave the machine: CurveZMQ ``keys`` with the folder of
    client public keys it admits, or plaintext on purpose (``insecure``). Loopback needs neither."""

    keys: CurveKeys | None = None
    allowed_clients: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.keys is not None and self.allowed_clients is None:
            raise P.ProtocolError("a CurveZMQ bridge needs the folder of client keys it admits (--allow)")


class Bridge:
    """Owns the driver; safe to start/stop; a context manager. Thread-safe by one lock."""

    def __init__(self, driver: RobotDriver, cfg: BridgeConfig, endpoints: Endpoints = Endpoints(),
                 context: zmq.Context | None = None, security: Security = Security(),
                 servo_realtime: ThreadRealtime = ThreadRealtime()):
        self.driver, self.cfg, self.endpoints, self.security = driver, cfg, endpoints, security
        self.servo_realtime = servo_realtime  # the servo thread's own priority and CPUs (the network thread's stay)
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._stop_flag = threading.Event()
        self._threads: list[threading.Thread] = []
        self.counts: Counter[str] = Counter()
        self.mode = "idle"
        self._estop: str | None = None
        self._target: np.ndarray | None = None  # where the robot is heading (published in the state)
        self._schedule: WaypointSchedule | None = None  # timestamped waypoints; None: servo to _target
        self._last_rx: float | None = None
        self._last_heartbeat = float("-inf")
        self._last_chunk_seq = -1
        self._seq = 0
        self._pending_events: list[tuple[str, str]] = []
        self._resume_pending = False  # the servo thread re-enables the robot after a stop
        self._estop_pending = False  # the servo thread triggers the hardware e-stop
        self._runtime_stop = False  # the runtime's heartbeat said stop: the servo thread stops the motion
        self.failure: str | None = None  # a thread failed: the process must exit
        self._session: int | None = None  # the runtime session that owns the action link
        self._last_action_seq = 0
        self._command_seq: OrderedDict[int, int] = OrderedDict()  # session -> last command seq
        self._seen_sessions: OrderedDict[int, None] = OrderedDict()
        self._budget: np.ndarray | None = None  # per-dimension target motion allowed now (rate limit)
        self._budget_t = 0.0

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> "Bridge":
        setpoint = self.driver.connect()
        self._interp = LimitedInterpolator(setpoint, self.cfg.vec("max_vel"), self.cfg.vec("max_acc"),
                                           1.0 / self.cfg.servo_hz, self.cfg.vec("setpoint_low"),
                                           self.cfg.vec("setpoint_high"))
        self._rest(setpoint)
        if self.security.keys is not None:  # admit only the allowed client keys (ZAP), not any key
            authenticate(self._ctx, self.security.allowed_clients)
        opts = {"bind": True, "timeout_ms": 50, "curve": self.security.keys, "insecure": self.security.insecure}
        self._action_sock = make_socket(self._ctx, zmq.PULL, self.endpoints.action, **opts)
        self._state_sock = make_socket(self._ctx, zmq.PUB, self.endpoints.state, **opts)
        self._event_sock = make_socket(self._ctx, zmq.PUB, self.endpoints.events, **opts)
        self._cmd_sock = make_socket(self._ctx, zmq.ROUTER, self.endpoints.command, **opts)
        self._camera_sock = (make_socket(self._ctx, zmq.PUB, self.endpoints.camera, **opts)
                             if hasattr(self.driver, "take_frames") else None)
        self._stop_flag.clear()
        self._threads = [guarded(SERVO_THREAD, self._servo_loop, self._fail),
                         guarded(NET_THREAD, self._net_loop, self._fail)]
        for t in self._threads:
            t.start()
        self._event("started", f"{self.cfg.name} bridge ({self.cfg.driver_kind} driver), "
                               f"servo {self.cfg.servo_hz:g} Hz")
        return self

    def close(self) -> None:
        self._stop_flag.set()
        for t in self._threads:
            t.join(timeout=2.0)
        stuck = [t.name for t in self._threads if t.is_alive()]
        try:
            if stuck:  # stuck inside the driver: do not call it again
                log.error("bridge threads %s did not stop; not calling the driver from another thread", stuck)
            else:
                (self.driver.estop if self.failure else self.driver.stop)()
        finally:
            self.driver.disconnect()
            # A ZeroMQ socket closed while another thread polls it is a use after free (a crash):
            # a stuck thread's sockets stay open until the process exits.
            for sock in ([] if stuck else ["_action_sock", "_state_sock", "_event_sock", "_cmd_sock", "_camera_sock"]):
                if getattr(self, sock, None) is not None:
                    getattr(self, sock).close(linger=0)
            if self.security.keys is not None:
                stop_authenticator(self._ctx)

    def new_episode(self, reset: Callable[[], np.ndarray]) -> np.ndarray:
        """Start over in a simulator: ``reset`` puts the world in a new state and returns the
        robot's setpoint there; the bridge forgets its targets and the interpolator starts
        at that setpoint (it would otherwise glide from the old episode's pose)."""
        with self._lock:  # the servo thread calls the driver only under this lock
            setpoint = np.asarray(reset(), np.float64)
            self._interp.p = setpoint.copy()
            self._interp.halt()
            self._rest(setpoint)
            self._last_rx, self._last_heartbeat = None, float("-inf")
            self._runtime_stop, self._budget = False, None
            if self._estop is None:
                self.mode = "idle"
            self._event("new_episode", "world reset by the simulator")
        return setpoint

    def bound(self) -> Endpoints:
        """The endpoints actually bound (resolves ``tcp://127.0.0.1:*`` to real ports)."""
        def last(sock: zmq.Socket) -> str:
            return sock.getsockopt(zmq.LAST_ENDPOINT).decode()

        return Endpoints(last(self._action_sock), last(self._state_sock), last(self._event_sock),
                         last(self._cmd_sock), last(self._camera_sock) if self._camera_sock else "")

    def health(self) -> str | None:
        """None while every thread runs; otherwise why the process must exit."""
        if self.failure is not None:
            return self.failure
        gone = dead(self._threads)
        return f"bridge threads not running: {gone}" if gone and not self._stop_flag.is_set() else None

    def supervise(self, duration_s: float = float("inf"), poll_s: float = 0.1) -> None:
        """Serve for ``duration_s`` (the process's main thread), watching every thread; raises
        :class:`ThreadFailure` (after the e-stop latched) when one failed."""
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            why = self.health()
            if why is not None:
                raise ThreadFailure(f"bridge: {why}; e-stop latched")
            time.sleep(poll_s)

    def _fail(self, thread: str, exc: Exception) -> None:
        """``thread`` died of ``exc``: latch the e-stop, publish, mark the bridge failed."""
        detail = describe(thread, exc)
        with self._lock:
            self.failure = self.failure or detail
            self._estop = self._estop or detail
            self.mode, self._estop_pending = "estop", True
            self._event("thread_failed", detail)
        if thread == SERVO_THREAD:  # this is the thread that owns the driver and the event socket
            try:
                self.driver.estop()
            finally:
                self._publish_events(P.now())

    def __enter__(self) -> "Bridge":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- inputs ------------------------------------------------------------------------
    def _event(self, kind: str, detail: str = "") -> None:
        log.info("bridge event %s: %s", kind, detail)
        self.counts[f"event_{kind}"] += 1
        self._pending_events.append((kind, detail))

    def _reject(self, reason: str, detail: str) -> str:
        self.counts["rejected"] += 1
        self.counts[f"rejected_{reason}"] += 1
        self._event("rejected", f"{reason}: {detail}")
        return reason

    def handle_frame(self, data: bytes, now: float) -> str | None:
        """Validate one incoming action frame; returns the rejection reason or None (accepted)."""
        self.counts["received"] += 1
        try:
            msg = P.from_wire(data)
        except P.ProtocolError as exc:
            return self._reject("malformed", str(exc))
        if not isinstance(msg, (P.Heartbeat, P.ActionChunk, P.Waypoints)):
            return self._reject("wrong_type", f"expected waypoints, action_chunk or heartbeat, got {msg.TYPE.value}")
        refusal = self._check_order(msg, now)
        if refusal is not None:
            return self._reject(*refusal)
        if isinstance(msg, P.Heartbeat):
            return self._heartbeat(msg, now)
        if isinstance(msg, P.Waypoints):
            return self._waypoints(msg, now)
        action = msg.actions[0].astype(np.float64)
        if action.shape != (self.cfg.dim,):
            return self._reject("wrong_dim", f"action has {action.shape[0]} values, robot takes {self.cfg.dim}")
        with self._lock:
            if self._estop is not None:
                return self._reject("estopped", "e-stop latched; send 'reset' first")
            delta = np.asarray(self.cfg.delta_dims, bool)
            base = self._target if self._target is not None else self._interp.p
            target = np.where(delta, base + action, action)
            step = np.abs(target - base)
            tol = 1e-6  # float32 on the wire: an action exactly at a limit may read 1e-8 beyond it
            if np.any(step > self.cfg.vec("max_step") + tol):
                return self._reject("step_too_large", f"step {np.round(step, 4).tolist()} exceeds max_step")
            low, high = self.cfg.vec("setpoint_low"), self.cfg.vec("setpoint_high")
            if np.any(target < low - tol) or np.any(target > high + tol):
                return self._reject("out_of_limits", f"target {np.round(target, 4).tolist()} outside workspace")
            target = self._rate_limit(base, np.clip(target, low, high), now)
            self._rest(target)
            self._accepted(msg.seq, now)
        return None

    def _accepted(self, seq: int, now: float) -> None:
        """A target or plan was taken (under the lock): the runtime is alive and commanding."""
        self._last_rx, self._last_chunk_seq = now, seq
        self._runtime_stop = False
        self.counts["accepted"] += 1
        if self.mode == "stopped":
            self._resume_pending = True
        if self.mode in ("idle", "hold", "stopped"):
            self._event("tracking", f"chunk {seq}")
        self.mode = "tracking"

    def _rest(self, position: np.ndarray) -> None:
        """Servo to ``position`` and stay there (forgets any waypoint schedule)."""
        self._target, self._schedule = np.asarray(position, np.float64).copy(), None

    def _waypoints(self, msg: P.Waypoints, now: float) -> str | None:
        """Check a plan of timestamped absolute targets and hand it to the servo loop's clock.

        Per waypoint: inside the workspace, and at most ``max_step`` from its predecessor
        per waypoint interval (``dt``) between them, so a plan that follows a dropped or late
        one is not refused for the motion the dropped one would have asked for. Waypoints
        already in the past are skipped (counted as ``waypoints_late``), never jumped to; a
        plan entirely in the past is not accepted and does not feed the watchdog. The
        velocity and acceleration limits act on what the servo loop sends the robot."""
        targets = msg.targets.astype(np.float64)
        if targets.shape[1] != self.cfg.dim:
            return self._reject("wrong_dim", f"waypoints have {targets.shape[1]} values, robot takes {self.cfg.dim}")
        if msg.dt < 1.0 / self.cfg.servo_hz - 1e-9:
            return self._reject("bad_timing", f"waypoints {msg.dt:g} s apart, finer than the servo period")
        times = msg.times()
        if times[-1] > now + self.cfg.hold_after_s:  # the watchdog's horizon: no plan may outlive it
            return self._reject("too_far_ahead", f"last waypoint {times[-1] - now:.2f} s ahead")
        tol = 1e-6  # float32 on the wire
        low, high = self.cfg.vec("setpoint_low"), self.cfg.vec("setpoint_high")
        if np.any(targets < low - tol) or np.any(targets > high + tol):
            return self._reject("out_of_limits", "a waypoint lies outside the workspace")
        targets = np.clip(targets, low, high)
        with self._lock:
            if self._estop is not None:
                return self._reject("estopped", "e-stop latched; send 'reset' first")
            future = times > now
            late = int(np.count_nonzero(~future))
            self.counts["waypoints_late"] += late
            if not late < len(times):
                return None
            schedule = self._schedule or WaypointSchedule(self._target, now)
            t_ref, p_ref = schedule.reference(times[future][0], now)
            intervals = max(1, int(np.ceil((times[future][0] - t_ref) / msg.dt - 1e-3)))
            first, rest = targets[future][0], targets[future]
            step = np.abs(first - p_ref) / intervals
            if len(rest) > 1:
                step = np.maximum(step, np.abs(np.diff(rest, axis=0)).max(axis=0))
            if np.any(step > self.cfg.vec("max_step") + tol):
                return self._reject("step_too_large", f"waypoints move {np.round(step, 4).tolist()} per interval, "
                                    "beyond max_step")
            schedule.plan(times, targets, now)
            self._schedule, self._target = schedule, schedule.end()
            self._accepted(msg.seq, now)
        return None

    def _check_order(self, msg: P.Message, now: float) -> tuple[str, str] | None:
        """(reason, detail) when a target or heartbeat is of another session, replayed,
        reordered, stale or from the future; None when it is next in order."""
        kind = "heartbeat" if isinstance(msg, P.Heartbeat) else "target"
        if self._session is None or msg.session != self._session:
            return "wrong_session", f"session {msg.session} has not said hello (current {self._session})"
        if msg.seq <= self._last_action_seq:
            return "replayed", f"seq {msg.seq} after {self._last_action_seq}"
        age = now - msg.stamp
        if age > self.cfg.hold_after_s:  # queued while the link was down: never replay it
            return f"stale_{kind}", f"sent {age:.2f} s ago"
        if age < -MAX_CLOCK_SKEW_S:
            return "future_stamp", f"stamped {-age:.3f} s ahead of the bridge's clock"
        self._last_action_seq = msg.seq
        return None

    def _heartbeat(self, msg: P.Heartbeat, now: float) -> None:
        """The runtime is alive without a new target; what that means depends on its mode."""
        with self._lock:
            self.counts["heartbeats"] += 1
            self.counts[f"heartbeats_{msg.mode}"] += 1
            if msg.mode == P.RuntimeMode.IDLE.value:  # not commanding on purpose: holding is right
                self._last_heartbeat = now
            elif msg.mode == P.RuntimeMode.STOP.value:
                self._runtime_stop = True
            # STARVED: alive but unable to act; the deadlines keep running from the last target
        return None

    def _rate_limit(self, base: np.ndarray, target: np.ndarray, now: float) -> np.ndarray:
        """Clamp the target's motion to a token bucket per dimension: it refills at ``max_vel``
        and holds at most ``cfg.burst()``, so many messages cannot outrun the robot's limits."""
        cap, vel = self.cfg.burst(), self.cfg.vec("max_vel")
        budget = cap if self._budget is None else np.minimum(cap, self._budget + vel * max(0.0, now - self._budget_t))
        move = np.clip(target - base, -budget, budget)
        if np.any(np.abs(move) < np.abs(target - base) - 1e-9):
            self.counts["rate_limited"] += 1
        self._budget, self._budget_t = budget - np.abs(move), now
        return base + move

    def handle_command(self, cmd: P.CommandMsg, now: float | None = None) -> P.Reply:
        now = P.now() if now is None else now
        refusal = self._check_command(cmd, now)
        if refusal is not None:
            self._reject("command_refused", f"{cmd.command}: {refusal}")
            return self._reply(cmd.seq, ok=False, reason=refusal)
        with self._lock:
            ok, reason = True, ""
            if cmd.command == P.Command.ESTOP.value:
                if self._estop is None:
                    self._estop = "operator"
                    self._event("estop", "latched by command")
                # The servo thread calls driver.estop() on its next tick (<= one servo period):
                # SDKs such as franky are not safe to call from two threads at once.
                self._estop_pending = True
                self.mode = "estop"
            elif cmd.command == P.Command.RESET.value:
                if self._estop is not None:
                    self._event("reset", "e-stop cleared")
                    self._resume_pending = True
                self._estop, self._last_rx, self._runtime_stop = None, None, False
                self._rest(self._interp.p)
                self._interp.halt()
                self.mode = "idle"
            elif cmd.command == P.Command.HOLD.value:
                self._rest(self._interp.p)
                self.mode = "hold" if self._estop is None else self.mode
                self._event("hold", "by command: setpoint is the current position")
            elif cmd.command == P.Command.ENABLE.value:
                ok = self._estop is None
                reason = "" if ok else "e-stop latched; send 'reset' first"
            status = {"mode": self.mode, "estopped": self._estop is not None,
                      **{k: int(v) for k, v in self.counts.items()}}
        return self._reply(cmd.seq, ok=ok, reason=reason, status=status)

    def _check_command(self, cmd: P.CommandMsg, now: float) -> str | None:
        """Why a command is refused (None: obey). Stopping commands are always obeyed; the
        others in :data:`SEQUENCED_COMMANDS` need a known session, a new seq, a fresh stamp."""
        last = self._command_seq.get(cmd.session)
        in_sequence = last is not None and cmd.seq > last
        if in_sequence:
            self._command_seq[cmd.session] = cmd.seq
        if cmd.command not in SEQUENCED_COMMANDS:
            return None
        if self.failure is not None:  # the process is about to exit: nothing may clear its e-stop
            return f"bridge failed ({self.failure})"
        if last is None:
            return f"session {cmd.session} has not said hello"
        if not in_sequence:
            return f"seq {cmd.seq} is not after {last} (replayed or reordered)"
        if abs(now - cmd.stamp) > self.cfg.hold_after_s:
            return f"stamp is {now - cmd.stamp:+.2f} s off the bridge's clock (stale or future)"
        return None

    def handle_hello(self, msg: P.Hello) -> P.Reply:
        """Open a session: commands from it are sequenced; a runtime's also owns the action link."""
        if msg.session in self._seen_sessions:
            self._reject("command_refused", f"hello: session {msg.session} already used")
            return self._reply(msg.seq, ok=False, reason=f"session {msg.session} already used (a replayed hello?)")
        self._seen_sessions[msg.session] = None
        self._command_seq[msg.session] = msg.seq
        for table, size in ((self._seen_sessions, SESSIONS_SEEN), (self._command_seq, SESSIONS_KEPT)):
            while len(table) > size:
                table.popitem(last=False)
        if msg.role == "runtime":
            with self._lock:
                self._session, self._last_action_seq = msg.session, msg.seq
        return self._reply(msg.seq, ok=True, status={
            "robot": self.cfg.name, "dim": self.cfg.dim, "version": P.PROTOCOL_VERSION,
            "delta_dims": [bool(d) for d in self.cfg.delta_dims],
            # The workspace, so that a runtime adding delta actions up keeps its waypoints inside it.
            "setpoint_low": self.cfg.vec("setpoint_low").tolist(), "setpoint_high": self.cfg.vec("setpoint_high").tolist()})

    def _reply(self, request_seq: int, ok: bool, reason: str = "", status: dict | None = None) -> P.Reply:
        self._seq += 1  # the reply's stamp is the bridge's clock: the runtime measures its offset by it
        return P.Reply(seq=self._seq, stamp=P.now(), request_seq=request_seq, ok=ok, reason=reason,
                       status=status or {})

    # --- threads -----------------------------------------------------------------------
    def _net_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._action_sock, zmq.POLLIN)
        poller.register(self._cmd_sock, zmq.POLLIN)
        while not self._stop_flag.is_set():
            try:
                ready = dict(poller.poll(50))
                if self._action_sock in ready:
                    self.handle_frame(self._action_sock.recv(), P.now())
                if self._cmd_sock in ready:
                    self._serve_command()
            except zmq.ZMQError as exc:  # a socket hiccup is not a failure; anything else is (guarded)
                if self._stop_flag.is_set():
                    break
                self.counts["net_errors"] += 1
                log.warning("bridge network error: %s", exc)

    def _serve_command(self) -> None:
        identity, *frames = self._cmd_sock.recv_multipart()
        try:
            msg = P.from_wire(frames[-1]) if frames else None
        except P.ProtocolError as exc:
            msg, why = None, str(exc)
        else:
            why = "expected a command or hello"
        if isinstance(msg, P.CommandMsg):
            reply = self.handle_command(msg)
        elif isinstance(msg, P.Hello):  # connect handshake: same schema (decoded), robot shape, session
            reply = self.handle_hello(msg)
        else:
            self._reject("malformed_command", why)
            reply = self._reply(-1, ok=False, reason=why)
        self._cmd_sock.send_multipart([identity, P.to_wire(reply)])

    def _watchdog(self, now: float) -> np.ndarray | None:
        """Target for this servo tick under the watchdog and e-stop rules (None: stopped)."""
        if self._estop is not None:
            return None
        if self._last_rx is None and not self._runtime_stop:
            return self._goal(now)
        silent = float("inf") if self._last_rx is None else now - self._last_rx
        # Only a runtime that is idle on purpose may keep the robot holding; a starved or
        # broken one is treated like a dead one, and one that says stop is stopped now.
        if self._runtime_stop or min(silent, now - self._last_heartbeat) > self.cfg.stop_after_s:
            if self.mode != "stopped":
                self.mode = "stopped"
                self._event("watchdog_stop", "runtime says stop" if self._runtime_stop
                            else f"no target for {silent:.2f} s")
                self.driver.stop()
                self._interp.halt()
                self._rest(self._interp.p)  # resume from where it stopped
            return None
        if silent > self.cfg.hold_after_s:
            if self.mode != "hold":
                self.mode = "hold"
                self._event("watchdog_hold", f"no target for {silent:.2f} s")
                self._rest(self._interp.p)
        return self._goal(now)

    def _goal(self, now: float) -> np.ndarray:
        """What the servo loop steers to now: the schedule's point of this moment, else the target."""
        return self._target if self._schedule is None else self._schedule.goal(now)

    def _check_tracking(self, measured: np.ndarray, setpoint: np.ndarray) -> None:
        """Latch the e-stop when the robot is farther from ``setpoint`` than the config allows."""
        n = min(len(measured), self.cfg.dim)
        error = np.abs(np.asarray(measured[:n], np.float64) - setpoint[:n])
        limit = self.cfg.vec("max_tracking_error")[:n]
        if not np.any(error > limit):  # NaN compares False: a NaN reading is the driver's to report
            return
        with self._lock:
            if self._estop is None:
                worst = int(np.argmax(error - limit))
                detail = f"dimension {worst} is {error[worst]:.3f} from its setpoint (limit {limit[worst]:g})"
                self._event("tracking_error", detail)
                self._estop, self.mode = f"tracking error: {detail}", "estop"
                self.driver.estop()

    def _servo_loop(self) -> None:
        for outcome in self.servo_realtime.apply():  # this thread only: it exists after the network thread
            with self._lock:
                self._event("realtime" if outcome.ok else "realtime_refused", outcome.detail)
        period = 1.0 / self.cfg.servo_hz
        state_every = max(1, round(self.cfg.servo_hz / self.cfg.state_hz))
        tick = 0
        next_t = time.monotonic()
        while not self._stop_flag.is_set():
            now = time.monotonic()
            with self._lock:
                for kind, detail in self.driver.events():
                    self._event(kind, detail)
                    if kind == "driver_error" and self._estop is None:  # the robot faulted: latch
                        self._estop, self.mode = detail, "estop"
                        self.driver.estop()
                if self._estop_pending:
                    self._estop_pending = False
                    self.driver.estop()
                if self._resume_pending and self._estop is None:
                    self._resume_pending = False
                    self._interp.p = self.driver.resume()
                    self._interp.halt()
                    if self._last_rx is None:
                        self._rest(self._interp.p)
                target = self._watchdog(now)
                servoed = None  # the setpoint sent this tick, for the tracking guard
                if target is not None:
                    servoed = self._interp.step(target)
                    self.driver.servo(servoed)
                events, self._pending_events = self._pending_events, []
                publish = tick % state_every == 0
                frames = self.driver.take_frames() if self._camera_sock is not None else None
                state = (self.mode, self._estop is not None, self._last_chunk_seq, self._target)
            self._send_events(events, now)
            if frames is not None:
                self._seq += 1
                try:
                    msg = P.CameraFrames(seq=self._seq, stamp=frames[1], index=frames[2], images=frames[0])
                    send(self._camera_sock, msg)
                except P.ProtocolError as exc:  # a renderer's bad frame is dropped, not fatal
                    self.counts["camera_frame_invalid"] += 1
                    log.warning("camera frame not sent: %s", exc)
            if publish:
                joints, ee = self.driver.read_state()
                if servoed is not None:
                    self._check_tracking(ee, servoed)
                self._seq += 1
                send(self._state_sock, P.RobotState(
                    seq=self._seq, stamp=now, mode=state[0], estopped=state[1], last_chunk_seq=state[2],
                    joints=_vector(joints), ee_pose=_vector(ee), target=_vector(state[3])))
            tick += 1
            next_t += period
            time.sleep(max(0.0, next_t - time.monotonic()))
            if time.monotonic() - next_t > 10 * period:  # fell far behind: resynchronise
                next_t = time.monotonic()

    def _send_events(self, events: list[tuple[str, str]], now: float) -> None:
        for kind, detail in events:
            self._seq += 1
            send(self._event_sock, P.Event(seq=self._seq, stamp=now, kind=kind, detail=detail))

    def _publish_events(self, now: float) -> None:
        """Send the pending events now (the servo thread, or the failure handler in its place)."""
        with self._lock:
            events, self._pending_events = self._pending_events, []
        self._send_events(events, now)


def loopback_bridge(cfg: BridgeConfig, context: zmq.Context | None = None, driver: RobotDriver | None = None,
                    **options) -> tuple[Bridge, int]:
    """A bridge (not started) for ``cfg`` on loopback at the first free base port, and that
    port: a runtime config whose ``bridge.base_port`` is it reaches this bridge as ``vpp run``
    reaches a robot's (runtime/build.py). Its driver is the description's kind unless
    ``driver`` is given (a test double); ``options`` go to :class:`Bridge`. For benchmarks,
    evaluations and tests that run the bridge in their own process."""
    base = P.free_base_port()
    return Bridge(driver if driver is not None else make_driver(cfg), cfg, Endpoints.on("127.0.0.1", base), context,
                  **options), base


def _vector(values: object) -> np.ndarray:
    """A driver's reading as the protocol's float64 vector (drivers may return lists or float32)."""
    return np.asarray(values, np.float64).reshape(-1)
