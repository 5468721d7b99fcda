"""ZeroMQ sockets with the project's defaults: every send and receive has a timeout,
nothing lingers at close, state streams keep only the newest message, and CurveZMQ
encryption when a link leaves the machine. Used by the runtime and the bridges."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq

from .protocol import Message, ProtocolError, from_wire, to_wire

LOOPBACK_PREFIXES = ("tcp://127.", "tcp://localhost", "tcp://[::1]", "ipc://", "inproc://")


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ key pair of this side plus the server's public key (for clients)."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None

    @classmethod
    def load(cls, folder: str | Path, name: str, server: str | None = None) -> "CurveKeys":
        """Keys written by ``zmq.auth.create_certificates(folder, name)``."""
        import zmq.auth

        public, secret = zmq.auth.load_certificate(str(Path(folder) / f"{name}.key_secret"))
        server_public = zmq.auth.load_certificate(str(Path(folder) / f"{server}.key"))[0] if server else None
        if secret is None:
            raise ProtocolError(f"{folder}/{name}.key_secret holds no secret key")
        return cls(public, secret, server_public)


def make_socket(ctx: zmq.Context, kind: int, endpoint: str, *, bind: bool, timeout_ms: int = 500,
                conflate: bool = False, curve: CurveKeys | None = None, subscribe: bytes = b"") -> zmq.Socket:
    """A socket bound or connected to ``endpoint`` with timeouts on every operation.

    Non-loopback endpoints require ``curve`` keys: nothing unencrypted leaves the machine.
    """
    if not endpoint.startswith(LOOPBACK_PREFIXES) and curve is None:
        raise ProtocolError(f"endpoint {endpoint} leaves the machine: configure CurveZMQ keys for it")
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
    if conflate:  # latest-only: the queue holds one message, the newest (messages are single frames)
        sock.setsockopt(zmq.CONFLATE, 1)
    if curve is not None:
        sock.curve_publickey, sock.curve_secretkey = curve.public, curve.secret
        if bind:
            sock.curve_server = True
        else:
            if curve.server_public is None:
                raise ProtocolError("a CurveZMQ client needs the server's public key")
            sock.curve_serverkey = curve.server_public
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, subscribe)
    (sock.bind if bind else sock.connect)(endpoint)
    return sock


def send(sock: zmq.Socket, msg: Message, flags: int = 0) -> bool:
    """Send a message; False if the peer is not taking it within the socket's timeout."""
    try:
        sock.send(to_wire(msg), flags=flags, copy=False)
        return True
    except zmq.Again:
        return False


def recv(sock: zmq.Socket) -> Message | None:
    """The next message, or None on timeout. Malformed input raises :class:`ProtocolError`."""
    try:
        data = sock.recv(copy=True)
    except zmq.Again:
        return None
    return from_wire(data)
