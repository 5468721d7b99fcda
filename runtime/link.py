"""The runtime's side of the ZeroMQ link to a bridge. Nothing here blocks the control
thread: targets go out with NOBLOCK on a latest-only socket, state and events are
drained without waiting, commands wait at most their timeout.

The bridge is not trusted: its hello reply (dimension, schema version, delta dimensions)
and every state it publishes are checked before the runtime uses them; a state that
fails is refused and counted in :attr:`BridgeLink.counts`. Each handshake opens a new
session (a random id the bridge binds the action link to) and measures the offset of the
bridge's clock, so that the runtime's messages carry the bridge's time even when the two
run on different computers. The state stream refreshes the offset without a round trip:
a state stamped ``s`` by the bridge and taken at local time ``t`` says offset >= s - t
(it spent >= 0 s in flight); the largest such bound over the last :data:`CLOCK_SAMPLES`
states tracks two clocks that drift apart, erring towards stamps that look slightly old
(never from the future).
"""

from __future__ import annotations

import secrets
from collections import Counter, deque

import numpy as np
import zmq

from . import protocol as P
from .transport import CurveKeys, make_socket, recv, send

CLOCK_SAMPLES = 250  # states in the offset estimate: 5 s of a 50 Hz state stream


class BridgeLink:
    def __init__(self, action: str = P.ACTION_ENDPOINT, state: str = P.STATE_ENDPOINT,
                 events: str = P.EVENT_ENDPOINT, command: str = P.COMMAND_ENDPOINT,
                 context: zmq.Context | None = None, command_timeout_ms: int = 1000,
                 curve: CurveKeys | None = None, insecure: bool = False):
        self._ctx = context or zmq.Context.instance()
        secure = {"curve": curve, "insecure": insecure}  # keys (and the bridge's public key) for remote bridges
        # Latest-only: a bridge that reconnects gets the newest target, never a backlog.
        self._push = make_socket(self._ctx, zmq.PUSH, action, bind=False, conflate=True, timeout_ms=0, **secure)
        self._state = make_socket(self._ctx, zmq.SUB, state, bind=False, conflate=True, timeout_ms=0, **secure)
        self._events = make_socket(self._ctx, zmq.SUB, events, bind=False, timeout_ms=0, **secure)
        self._cmd = make_socket(self._ctx, zmq.DEALER, command, bind=False, timeout_ms=command_timeout_ms, **secure)
        self._seq = 0
        self.session = 0  # set by each handshake
        self.clock_offset = 0.0  # bridge clock - runtime clock (s): the handshake's, then the state stream's
        self._clock_bounds: deque[float] = deque(maxlen=CLOCK_SAMPLES)
        self.action_dim: int | None = None  # known after the handshake: states are checked against it
        self.workspace: tuple[np.ndarray, np.ndarray] | None = None  # the bridge's setpoint bounds, if it says
        self.last_state: P.RobotState | None = None
        self.counts: Counter[str] = Counter()  # refused inputs from the bridge, by reason

    def bridge_now(self) -> float:
        """The bridge's clock now (what outgoing stamps and incoming state stamps use)."""
        return P.now() + self.clock_offset

    def _next(self) -> dict:
        """Sequence number, stamp and session of the next outgoing message."""
        self._seq += 1
        return {"seq": self._seq, "stamp": self.bridge_now(), "session": self.session}

    def send_target(self, action: np.ndarray, obs_stamp: float, dt: float) -> bool:
        """This tick's target (robot units); False if it could not be queued."""
        msg = P.ActionChunk(**self._next(), obs_stamp=obs_stamp, dt=dt, actions=np.asarray(action, np.float32)[None])
        return send(self._push, msg, flags=zmq.NOBLOCK)

    def send_waypoints(self, targets: np.ndarray, start: float, dt: float) -> bool:
        """Absolute ``targets`` [T, A] to be reached at ``start + i * dt`` (``start`` on this
        process's clock; it travels on the bridge's); False if it could not be queued."""
        msg = P.Waypoints(**self._next(), start=start + self.clock_offset, dt=dt,
                          targets=np.asarray(targets, np.float64).reshape(len(targets), -1))
        return send(self._push, msg, flags=zmq.NOBLOCK)

    @property
    def last_seq(self) -> int:
        """Sequence number of the last message sent (targets are acknowledged in the state's ``last_chunk_seq``)."""
        return self._seq

    def send_heartbeat(self, mode: P.RuntimeMode) -> bool:
        """Tell the bridge the runtime is alive without a new target, and why (see :class:`P.RuntimeMode`)."""
        return send(self._push, P.Heartbeat(**self._next(), sender="runtime", mode=mode.value), flags=zmq.NOBLOCK)

    def poll(self) -> tuple[P.RobotState | None, list[P.Event]]:
        """Newest valid state (if any arrived) and every event since the last poll."""
        states = [s for s in _drain(self._state, P.RobotState, self.counts) if self._state_ok(s)]
        if states:
            self.last_state = states[-1]
            self._clock_bounds.append(states[-1].stamp - P.now())
            self.clock_offset = max(self._clock_bounds)
        return (states[-1] if states else None), _drain(self._events, P.Event, self.counts)

    def _state_ok(self, state: P.RobotState) -> bool:
        """A state the runtime may act on: the bridge's target has the action's shape and is finite."""
        if self.action_dim is not None and state.target.shape != (self.action_dim,):
            reason = "state_target_shape"
        elif not np.all(np.isfinite(state.target)):
            reason = "state_target_not_finite"
        else:
            return True
        self.counts[f"refused_{reason}"] += 1
        return False

    def handshake(self, robot: str, action_dim: int) -> dict:
        """Hello at connect: opens a new session, measures the clock offset; the bridge must
        answer in this schema version, take ``action_dim`` and say which dimensions are deltas."""
        self.session = secrets.randbits(63)
        self.clock_offset = 0.0
        self._clock_bounds.clear()  # another bridge (or the same one restarted) may run another clock
        hello = P.Hello(**self._next(), role="runtime", robot=robot, action_dim=action_dim)
        sent = P.now()
        if not send(self._cmd, hello):
            raise P.ProtocolError("bridge not reachable for the handshake")
        reply = self._reply(hello.seq)
        received = P.now()
        if reply is None:
            raise P.ProtocolError("no handshake reply from the bridge (is it running? same endpoints?)")
        if not reply.ok:
            raise P.ProtocolError(f"bridge refused the handshake: {reply.reason}")
        status = reply.status
        if status.get("dim") != action_dim or isinstance(status.get("dim"), bool):
            raise P.ProtocolError(f"bridge '{status.get('robot')}' takes {status.get('dim')!r} actions, "
                                  f"the runtime sends {action_dim}")
        if status.get("version") != P.PROTOCOL_VERSION:
            raise P.ProtocolError(f"bridge speaks schema {status.get('version')!r}, the runtime {P.PROTOCOL_VERSION}")
        delta = status.get("delta_dims")
        if not (isinstance(delta, list) and len(delta) == action_dim and all(isinstance(d, bool) for d in delta)):
            raise P.ProtocolError(f"bridge's delta_dims {delta!r} is not {action_dim} booleans")
        self.workspace = _workspace(status, action_dim)
        # The reply was stamped between send and receipt: assume halfway (error <= half the round trip).
        self.clock_offset = reply.stamp - (sent + received) / 2
        self.action_dim = action_dim
        return status

    def _reply(self, seq: int) -> P.Reply | None:
        while True:
            try:
                reply = recv(self._cmd)
            except P.ProtocolError:
                self.counts["refused_malformed_reply"] += 1
                continue
            if reply is None or (isinstance(reply, P.Reply) and reply.request_seq == seq):
                return reply

    def command(self, name: str) -> P.Reply | None:
        """Send a command and wait for its correlated reply (None on timeout)."""
        msg = P.CommandMsg(**self._next(), command=name)
        if not send(self._cmd, msg):
            return None
        return self._reply(msg.seq)

    def close(self) -> None:
        for sock in (self._push, self._state, self._events, self._cmd):
            sock.close(linger=0)


def _workspace(status: dict, action_dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The setpoint bounds of a hello reply (None when it gives none); refused unless they are
    ``action_dim`` finite numbers each, low below high."""
    if "setpoint_low" not in status and "setpoint_high" not in status:
        return None
    try:
        low, high = (np.asarray(status.get(k), np.float64) for k in ("setpoint_low", "setpoint_high"))
    except (TypeError, ValueError):
        low = high = np.zeros(0)
    if not (low.shape == high.shape == (action_dim,) and np.all(np.isfinite(low)) and np.all(np.isfinite(high))
            and np.all(low < high)):
        raise P.ProtocolError(f"bridge's setpoint bounds are not {action_dim} finite pairs, low below high")
    return low, high


def _drain(sock: zmq.Socket, kind: type, counts: Counter[str]) -> list:
    """Every message of ``kind`` waiting on ``sock``, without blocking (malformed ones counted, dropped)."""
    out = []
    while True:
        try:
            msg = recv(sock)
        except P.ProtocolError:
            counts["refused_malformed"] += 1
            continue
        if msg is None:
            return out
        if isinstance(msg, kind):
            out.append(msg)
