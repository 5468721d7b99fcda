"""A bridge process: ZeroMQ in, a robot driver out, safety in between.

* Targets arrive as action chunks (the first action is this control tick's target).
  Each is validated (schema, dimension, finite, step size, workspace bounds) before it
  can move anything; a rejected one is counted and published as an event with the reason.
* A fixed-rate servo thread interpolates towards the current target with per-joint
  velocity and acceleration limits, and publishes robot state at ``state_hz``.
* Watchdog: no target for ``hold_after_s`` -> hold the current setpoint; neither a
  target nor a runtime heartbeat for ``stop_after_s`` -> stop the motion. E-stop
  latches until an explicit ``reset``.
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
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import zmq

from vpp_edge.runtime import protocol as P
from vpp_edge.runtime.transport import make_socket, send

from .config import BridgeConfig
from .driver import RobotDriver
from .servo import LimitedInterpolator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    action: str = P.ACTION_ENDPOINT
    state: str = P.STATE_ENDPOINT
    events: str = P.EVENT_ENDPOINT
    command: str = P.COMMAND_ENDPOINT
    camera: str = P.CAMERA_ENDPOINT  # bound only by drivers that render cameras (simulators)


class Bridge:
    """Owns the driver; safe to start/stop; a context manager. Thread-safe by one lock."""

    def __init__(self, driver: RobotDriver, cfg: BridgeConfig, endpoints: Endpoints = Endpoints(),
                 context: zmq.Context | None = None):
        self.driver, self.cfg, self.endpoints = driver, cfg, endpoints
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._stop_flag = threading.Event()
        self._threads: list[threading.Thread] = []
        self.counts: Counter[str] = Counter()
        self.mode = "idle"
        self._estop: str | None = None
        self._target: np.ndarray | None = None
        self._last_rx: float | None = None
        self._last_heartbeat = float("-inf")
        self._last_chunk_seq = -1
        self._seq = 0
        self._pending_events: list[tuple[str, str]] = []
        self._resume_pending = False  # the servo thread re-enables the robot after a stop
        self._estop_pending = False  # the servo thread triggers the hardware e-stop

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> "Bridge":
        setpoint = self.driver.connect()
        self._interp = LimitedInterpolator(setpoint, self.cfg.vec("max_vel"), self.cfg.vec("max_acc"),
                                           1.0 / self.cfg.servo_hz, self.cfg.vec("setpoint_low"),
                                           self.cfg.vec("setpoint_high"))
        self._target = setpoint.copy()
        self._action_sock = make_socket(self._ctx, zmq.PULL, self.endpoints.action, bind=True, timeout_ms=50)
        self._state_sock = make_socket(self._ctx, zmq.PUB, self.endpoints.state, bind=True, timeout_ms=50)
        self._event_sock = make_socket(self._ctx, zmq.PUB, self.endpoints.events, bind=True, timeout_ms=50)
        self._cmd_sock = make_socket(self._ctx, zmq.ROUTER, self.endpoints.command, bind=True, timeout_ms=50)
        self._camera_sock = (make_socket(self._ctx, zmq.PUB, self.endpoints.camera, bind=True, timeout_ms=50)
                             if hasattr(self.driver, "take_frames") else None)
        self._stop_flag.clear()
        self._threads = [threading.Thread(target=self._servo_loop, name="bridge-servo", daemon=True),
                         threading.Thread(target=self._net_loop, name="bridge-net", daemon=True)]
        for t in self._threads:
            t.start()
        self._event("started", f"{self.driver.name} bridge, servo {self.cfg.servo_hz:g} Hz")
        return self

    def close(self) -> None:
        self._stop_flag.set()
        for t in self._threads:
            t.join(timeout=2.0)
        try:
            if any(t.is_alive() for t in self._threads):  # stuck inside the driver: do not call it again
                log.error("bridge threads did not stop; not calling the driver from another thread")
            else:
                self.driver.stop()
        finally:
            self.driver.disconnect()
            for sock in ("_action_sock", "_state_sock", "_event_sock", "_cmd_sock", "_camera_sock"):
                if getattr(self, sock, None) is not None:
                    getattr(self, sock).close(linger=0)

    def new_episode(self, reset: Callable[[], np.ndarray]) -> np.ndarray:
        """Start over in a simulator: ``reset`` puts the world in a new state and returns the
        robot's setpoint there; the bridge forgets its targets and the interpolator starts
        at that setpoint (it would otherwise glide from the old episode's pose)."""
        with self._lock:  # the servo thread calls the driver only under this lock
            setpoint = np.asarray(reset(), np.float64)
            self._interp.p = setpoint.copy()
            self._interp.halt()
            self._target, self._last_rx, self._last_heartbeat = setpoint.copy(), None, float("-inf")
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
        if isinstance(msg, P.Heartbeat):  # the runtime is alive but has no new target (holding)
            if now - msg.stamp > self.cfg.hold_after_s:
                return self._reject("stale_heartbeat", f"sent {now - msg.stamp:.2f} s ago")
            with self._lock:
                self._last_heartbeat = now
            self.counts["heartbeats"] += 1
            return None
        if not isinstance(msg, P.ActionChunk):
            return self._reject("wrong_type", f"expected action_chunk, got {msg.TYPE.value}")
        if now - msg.stamp > self.cfg.hold_after_s:  # queued while the link was down: never replay it
            return self._reject("stale_target", f"sent {now - msg.stamp:.2f} s ago")
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
            target = np.clip(target, low, high)
            self._target, self._last_rx, self._last_chunk_seq = target, now, msg.seq
            self.counts["accepted"] += 1
            if self.mode == "stopped":
                self._resume_pending = True
            if self.mode in ("idle", "hold", "stopped"):
                self._event("tracking", f"chunk {msg.seq}")
            self.mode = "tracking"
        return None

    def handle_command(self, cmd: P.CommandMsg) -> P.Reply:
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
                self._estop, self._last_rx = None, None
                self._target = self._interp.p.copy()
                self._interp.halt()
                self.mode = "idle"
            elif cmd.command == P.Command.HOLD.value:
                self._target = self._interp.p.copy()
                self.mode = "hold" if self._estop is None else self.mode
                self._event("hold", "by command: setpoint is the current position")
            elif cmd.command == P.Command.ENABLE.value:
                ok = self._estop is None
                reason = "" if ok else "e-stop latched; send 'reset' first"
            status = {"mode": self.mode, "estopped": self._estop is not None,
                      **{k: int(v) for k, v in self.counts.items()}}
        self._seq += 1
        return P.Reply(seq=self._seq, stamp=P.now(), request_seq=cmd.seq, ok=ok, reason=reason, status=status)

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
                    identity, *frames = self._cmd_sock.recv_multipart()
                    try:
                        msg = P.from_wire(frames[-1]) if frames else None
                    except P.ProtocolError as exc:
                        msg, why = None, str(exc)
                    else:
                        why = "expected a command"
                    if isinstance(msg, P.CommandMsg):
                        reply = self.handle_command(msg)
                    elif isinstance(msg, P.Hello):  # connect handshake: same schema (decoded), robot shape
                        self._seq += 1
                        reply = P.Reply(seq=self._seq, stamp=P.now(), request_seq=msg.seq, ok=True,
                                        status={"robot": self.driver.name, "dim": self.cfg.dim,
                                                "version": P.PROTOCOL_VERSION,
                                                "delta_dims": [bool(d) for d in self.cfg.delta_dims]})
                    else:
                        self._reject("malformed_command", why)
                        self._seq += 1
                        reply = P.Reply(seq=self._seq, stamp=P.now(), ok=False, reason=why)
                    self._cmd_sock.send_multipart([identity, P.to_wire(reply)])
            except zmq.ZMQError as exc:  # never let the network thread die silently
                if self._stop_flag.is_set():
                    break
                self.counts["net_errors"] += 1
                log.warning("bridge network error: %s", exc)

    def _watchdog(self, now: float) -> np.ndarray | None:
        """Target for this servo tick under the watchdog and e-stop rules (None: stopped)."""
        if self._estop is not None:
            return None
        if self._last_rx is None:
            return self._target
        silent = now - self._last_rx
        # A runtime that still sends heartbeats is alive but starved: hold, do not stop.
        if min(silent, now - self._last_heartbeat) > self.cfg.stop_after_s:
            if self.mode != "stopped":
                self.mode = "stopped"
                self._event("watchdog_stop", f"no target for {silent:.2f} s")
                self.driver.stop()
                self._interp.halt()
                self._target = self._interp.p.copy()  # resume from where it stopped
            return None
        if silent > self.cfg.hold_after_s:
            if self.mode != "hold":
                self.mode = "hold"
                self._event("watchdog_hold", f"no target for {silent:.2f} s")
                self._target = self._interp.p.copy()
        return self._target

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
        period = 1.0 / self.cfg.servo_hz
        state_every = max(1, round(self.cfg.servo_hz / self.cfg.state_hz))
        tick = 0
        next_t = time.monotonic()
        try:
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
                            self._target = self._interp.p.copy()
                    target = self._watchdog(now)
                    servoed = None  # the setpoint sent this tick, for the tracking guard
                    if target is not None:
                        servoed = self._interp.step(target)
                        self.driver.servo(servoed)
                    events, self._pending_events = self._pending_events, []
                    publish = tick % state_every == 0
                    frames = self.driver.take_frames() if self._camera_sock is not None else None
                    state = (self.mode, self._estop is not None, self._last_chunk_seq, self._target)
                for kind, detail in events:
                    self._seq += 1
                    send(self._event_sock, P.Event(seq=self._seq, stamp=now, kind=kind, detail=detail))
                if frames is not None:
                    self._seq += 1
                    send(self._camera_sock, P.CameraFrames(seq=self._seq, stamp=frames[1], index=frames[2],
                                                           images=frames[0]))
                if publish:
                    joints, ee = self.driver.read_state()
                    if servoed is not None:
                        self._check_tracking(ee, servoed)
                    self._seq += 1
                    send(self._state_sock, P.RobotState(
                        seq=self._seq, stamp=now, mode=state[0], estopped=state[1], last_chunk_seq=state[2],
                        joints=joints, ee_pose=ee, target=np.asarray(state[3], np.float64)))
                tick += 1
                next_t += period
                time.sleep(max(0.0, next_t - time.monotonic()))
                if time.monotonic() - next_t > 10 * period:  # fell far behind: resynchronise
                    next_t = time.monotonic()
        except Exception:
            log.exception("servo loop failed; stopping the robot")
            self.driver.stop()
            raise
