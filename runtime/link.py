"""The runtime's side of the ZeroMQ link to a bridge. Nothing here blocks the control
thread: targets go out with NOBLOCK on a latest-only socket, state and events are
drained without waiting, commands wait at most their timeout."""

from __future__ import annotations

import numpy as np
import zmq

from . import protocol as P
from .transport import make_socket, recv, send


class BridgeLink:
    def __init__(self, action: str = P.ACTION_ENDPOINT, state: str = P.STATE_ENDPOINT,
                 events: str = P.EVENT_ENDPOINT, command: str = P.COMMAND_ENDPOINT,
                 context: zmq.Context | None = None, command_timeout_ms: int = 1000):
        self._ctx = context or zmq.Context.instance()
        # Latest-only: a bridge that reconnects gets the newest target, never a backlog.
        self._push = make_socket(self._ctx, zmq.PUSH, action, bind=False, conflate=True, timeout_ms=0)
        self._state = make_socket(self._ctx, zmq.SUB, state, bind=False, conflate=True, timeout_ms=0)
        self._events = make_socket(self._ctx, zmq.SUB, events, bind=False, timeout_ms=0)
        self._cmd = make_socket(self._ctx, zmq.DEALER, command, bind=False, timeout_ms=command_timeout_ms)
        self._seq = 0
        self.last_state: P.RobotState | None = None

    def send_target(self, action: np.ndarray, obs_stamp: float, dt: float) -> bool:
        """This tick's target (robot units); False if it could not be queued."""
        self._seq += 1
        msg = P.ActionChunk(seq=self._seq, stamp=P.now(), obs_stamp=obs_stamp, dt=dt,
                            actions=np.asarray(action, np.float32)[None])
        return send(self._push, msg, flags=zmq.NOBLOCK)

    @property
    def last_seq(self) -> int:
        """Sequence number of the last message sent (targets are acknowledged in the state's ``last_chunk_seq``)."""
        return self._seq

    def send_heartbeat(self) -> bool:
        """Tell the bridge the runtime is alive while it has no new target (holding)."""
        self._seq += 1
        return send(self._push, P.Heartbeat(seq=self._seq, stamp=P.now(), sender="runtime"), flags=zmq.NOBLOCK)

    def poll(self) -> tuple[P.RobotState | None, list[P.Event]]:
        """Newest state (if any arrived) and every event since the last poll."""
        states = _drain(self._state, P.RobotState)
        if states:
            self.last_state = states[-1]
        return (states[-1] if states else None), _drain(self._events, P.Event)

    def handshake(self, robot: str, action_dim: int) -> dict:
        """Hello at connect: the bridge must answer in this schema version and take ``action_dim``."""
        self._seq += 1
        seq = self._seq
        if not send(self._cmd, P.Hello(seq=seq, stamp=P.now(), role="runtime", robot=robot, action_dim=action_dim)):
            raise P.ProtocolError("bridge not reachable for the handshake")
        reply = self._reply(seq)
        if reply is None:
            raise P.ProtocolError("no handshake reply from the bridge (is it running? same endpoints?)")
        if not reply.ok:
            raise P.ProtocolError(f"bridge refused the handshake: {reply.reason}")
        if reply.status.get("dim") != action_dim:
            raise P.ProtocolError(f"bridge '{reply.status.get('robot')}' takes {reply.status.get('dim')} actions, "
                                  f"the runtime sends {action_dim}")
        return reply.status

    def _reply(self, seq: int) -> P.Reply | None:
        while True:
            reply = recv(self._cmd)
            if reply is None or (isinstance(reply, P.Reply) and reply.request_seq == seq):
                return reply

    def command(self, name: str) -> P.Reply | None:
        """Send a command and wait for its correlated reply (None on timeout)."""
        self._seq += 1
        seq = self._seq
        if not send(self._cmd, P.CommandMsg(seq=seq, stamp=P.now(), command=name)):
            return None
        return self._reply(seq)

    def close(self) -> None:
        for sock in (self._push, self._state, self._events, self._cmd):
            sock.close(linger=0)


def _drain(sock: zmq.Socket, kind: type) -> list:
    """Every message of ``kind`` waiting on ``sock``, without blocking (malformed ones dropped)."""
    out = []
    while True:
        try:
            msg = recv(sock)
        except P.ProtocolError:
            continue
        if msg is None:
            return out
        if isinstance(msg, kind):
            out.append(msg)
