"""ZeroMQ sockets with the project's defaults: every send and receive has a timeout,
no inbound frame is longer than the protocol's largest message, nothing lingers at close,
state streams keep only the newest message, and CurveZMQ encryption, with an allow-list
of client keys, when a link leaves the machine. Used by the runtime and the bridges."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import zmq

from .protocol import MAX_WIRE_BYTES, Message, ProtocolError, from_wire, to_wire

LOOPBACK_PREFIXES = ("tcp://127.", "tcp://localhost", "tcp://[::1]", "ipc://", "inproc://")


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ key pair of this side plus the server's public key (for clients)."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None

    @classmethod
    def load(cls, folder: str | Path, name: str, server: str | None = None) -> "CurveKeys":
        """Keys written by :func:`create_keys` (``zmq.auth.create_certificates``)."""
        import zmq.auth

        try:
            public, secret = zmq.auth.load_certificate(str(Path(folder) / f"{name}.key_secret"))
            server_public = zmq.auth.load_certificate(str(Path(folder) / f"{server}.key"))[0] if server else None
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"CurveZMQ keys in {folder}: {exc}") from None
        if secret is None:
            raise ProtocolError(f"{folder}/{name}.key_secret holds no secret key")
        return cls(public, secret, server_public)


def create_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """A new CurveZMQ key pair: ``<name>.key`` (public: copy it to the peer's allow-list
    folder) and ``<name>.key_secret`` (stays on this machine, mode 0600)."""
    import zmq.auth

    Path(folder).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(folder), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


# ZAP is per context (its handler binds inproc://zeromq.zap.01): one authenticator per context.
_AUTHENTICATORS: "weakref.WeakKeyDictionary[zmq.Context, object]" = weakref.WeakKeyDictionary()


def authenticate(ctx: zmq.Context, allowed_clients: str | Path):
    """Admit on every CurveZMQ server socket of ``ctx`` only the clients whose public keys
    (``*.key`` files) are in ``allowed_clients``; without it CurveZMQ encrypts but accepts
    any key. An unreadable folder admits nobody. Returns the authenticator: ``stop()`` it
    before the context is destroyed."""
    from zmq.auth.thread import ThreadAuthenticator

    if not Path(allowed_clients).is_dir():
        raise ProtocolError(f"allow-list folder {allowed_clients} does not exist")
    auth = _AUTHENTICATORS.get(ctx)
    if auth is None:
        auth = ThreadAuthenticator(ctx)
        auth.start()
        _AUTHENTICATORS[ctx] = auth
    auth.configure_curve(domain="*", location=str(allowed_clients))
    return auth


def stop_authenticator(ctx: zmq.Context) -> None:
    """Stop the context's authenticator (if any): its CurveZMQ servers then admit nobody new."""
    auth = _AUTHENTICATORS.pop(ctx, None)
    if auth is not None:
        auth.stop()


def is_loopback(endpoint: str) -> bool:
    return endpoint.startswith(LOOPBACK_PREFIXES)


def make_socket(ctx: zmq.Context, kind: int, endpoint: str, *, bind: bool, timeout_ms: int = 500,
                conflate: bool = False, curve: CurveKeys | None = None, subscribe: bytes = b"",
                insecure: bool = False) -> zmq.Socket:
    """A socket bound or connected to ``endpoint`` with timeouts on every operation.

    Non-loopback endpoints require ``curve`` keys (nothing unencrypted leaves the machine)
    unless ``insecure`` says the operator chose plaintext on purpose (an isolated network).
    A CurveZMQ server (``bind``) requires an authenticator with an allow-list on ``ctx``
    (:func:`authenticate`): encryption without authentication would admit any key.
    """
    if not is_loopback(endpoint) and curve is None and not insecure:
        raise ProtocolError(f"endpoint {endpoint} leaves the machine: configure CurveZMQ keys for it "
                            f"(vpp keys), or pass --insecure on an isolated network")
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
    # A peer announcing a longer frame is disconnected by ZeroMQ before the frame is buffered:
    # without it one 512 MB frame costs the receiver 512 MB before decode can refuse it.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_WIRE_BYTES)
    if conflate:  # latest-only: the queue holds one message, the newest (messages are single frames)
        sock.setsockopt(zmq.CONFLATE, 1)
    if curve is not None:
        sock.curve_publickey, sock.curve_secretkey = curve.public, curve.secret
        if bind:
            if ctx not in _AUTHENTICATORS:
                sock.close(linger=0)
                raise ProtocolError("a CurveZMQ server needs an allow-list of client keys (transport.authenticate)")
            sock.curve_server = True
        else:
            if curve.server_public is None:
                raise ProtocolError("a CurveZMQ client needs the server's public key")
            sock.curve_serverkey = curve.server_public
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, subscribe)
    try:
        (sock.bind if bind else sock.connect)(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        if exc.errno == zmq.EADDRINUSE:
            raise ProtocolError(f"{endpoint} is already in use (another bridge on this machine? move this one's "
                                f"ports with --base-port or VPP_BASE_PORT)") from None
        raise ProtocolError(f"cannot {'bind' if bind else 'connect'} {endpoint}: {exc}") from None
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
