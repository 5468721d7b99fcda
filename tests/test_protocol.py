"""The ZeroMQ contract: round trips, rejection of everything malformed, real sockets."""

import threading

import msgpack
import numpy as np
import pytest
import zmq

from vpp_edge.runtime import protocol as P
from vpp_edge.runtime.transport import make_socket, recv, send

MESSAGES = [
    P.Hello(seq=0, stamp=1.0, role="runtime", robot="sim", action_dim=7),
    P.ActionChunk(seq=5, stamp=2.0, obs_stamp=1.9, dt=0.02, start_offset=0.0,
                  actions=np.arange(70, dtype=np.float32).reshape(10, 7)),
    P.RobotState(seq=9, stamp=3.0, mode="tracking", estopped=False, last_chunk_seq=5,
                 joints=np.linspace(0, 1, 7), ee_pose=np.zeros(7), target=np.ones(7)),
    P.CommandMsg(seq=1, stamp=4.0, command="estop"),
    P.Reply(seq=2, stamp=4.1, request_seq=1, ok=False, reason="latched", status={"mode": "estop", "n": 3}),
    P.Heartbeat(seq=3, stamp=5.0, sender="runtime"),
    P.Event(seq=4, stamp=6.0, kind="watchdog_hold", detail="no chunk for 0.31 s"),
    P.CameraFrames(seq=6, stamp=7.0, index=12, images=np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)),
    P.Waypoints(seq=7, stamp=8.0, start=8.05, dt=0.02, targets=np.arange(21, dtype=np.float64).reshape(3, 7)),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frames = P.encode(msg)
    out = P.decode(frames)
    assert type(out) is type(msg)
    for name in msg.__dataclass_fields__:
        a, b = getattr(msg, name), getattr(out, name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        else:
            assert a == b
    assert len(frames) == 1 + len(msg.ARRAYS), "arrays travel as raw buffers, not in the header"


def header(frames):
    return msgpack.unpackb(frames[0])


def pack(h, *buffers):
    return [msgpack.packb(h), *buffers]


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda h, b: (dict(h, v=99), b), "schema version 99"),
        (lambda h, b: (dict(h, v=True), b), "schema version True"),
        (lambda h, b: (dict(h, type="launch_missiles"), b), "type 'launch_missiles' unknown"),
        (lambda h, b: ({**h, "fields": {k: v for k, v in h["fields"].items() if k != "dt"}}, b), "missing \\['dt'\\]"),
        (lambda h, b: ({**h, "fields": {**h["fields"], "extra": 1}}, b), "unexpected \\['extra'\\]"),
        (lambda h, b: ({**h, "fields": {**h["fields"], "seq": "5"}}, b), "'seq' must be a finite int"),
        (lambda h, b: ({**h, "fields": {**h["fields"], "dt": float("nan")}}, b), "'dt' must be a finite float.*not finite"),
        (lambda h, b: ({**h, "fields": {**h["fields"], "dt": 0.0}}, b), "dt must be a positive"),
        (lambda h, b: (h, b[:-4]), "has 276 bytes"),
        (lambda h, b: (h, None), "announces 1 arrays, got 0"),
        (lambda h, b: ({**h, "arrays": [{**h["arrays"][0], "dtype": "object"}]}, b), "dtype 'object' not allowed"),
        (lambda h, b: ({**h, "arrays": [{**h["arrays"][0], "shape": [70]}]}, b), "shape \\[70\\] is invalid \\(rank 2"),
        (lambda h, b: ({**h, "arrays": [{**h["arrays"][0], "shape": [0, 7]}]}, b"" if b else b), "actions must be \\[T, A\\]"),
        (lambda h, b: ({**h, "arrays": [{**h["arrays"][0], "dtype": ["float32"]}]}, b), "dtype \\['float32'\\] not allowed"),
        (lambda h, b: ({**h, "arrays": [{**h["arrays"][0], "dtype": {"a": 1}}]}, b), "not allowed"),
        (lambda h, b: ({**h, "arrays": [{**h["arrays"][0], "dtype": "int64"}]}, b), "dtype 'int64' not allowed"),
        # 2**32 * 2**32 wraps to 0 in int64: the size must be computed without overflow, before any allocation
        (lambda h, b: ({**h, "arrays": [{**h["arrays"][0], "shape": [2**32, 2**32]}]}, b""), "shape .* is invalid"),
        (lambda h, b: ({**h, "arrays": [{**h["arrays"][0], "shape": [2**24, 2**24]}]}, b""), "needs 1125899906842624"),
        (lambda h, b: ({**h, "arrays": [{**h["arrays"][0], "extra": 1}]}, b), "expected arrays"),
        (lambda h, b: ({**h, "arrays": [[1]]}, b), "expected arrays"),
        (lambda h, b: ({**h, "fields": {**h["fields"], "seq": True}}, b), "'seq' must be a finite int"),
        (lambda h, b: ({**h, "arrays": [{**h["arrays"][0], "shape": [-1, 7]}]}, b), "shape .* is invalid"),
        (lambda h, b: (h, np.full(70, np.nan, np.float32).tobytes()), "NaN or Inf"),
        (lambda h, b: ([1, 2, 3], b), "must be a map"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(mutate, reason):
    frames = P.encode(MESSAGES[1])
    h, b = mutate(header(frames), frames[1])
    bad = pack(h) if b is None else pack(h, b)
    with pytest.raises(P.ProtocolError, match=reason):
        P.decode(bad)


def test_garbage_and_encoding_guards():
    with pytest.raises(P.ProtocolError, match="not valid msgpack"):
        P.decode([b"\xc1\xc1\xc1"])
    with pytest.raises(P.ProtocolError, match="non-empty list of byte strings"):
        P.decode([])
    with pytest.raises(P.ProtocolError, match="command 'fly' unknown"):
        P.encode(P.CommandMsg(seq=0, stamp=0.0, command="fly"))
    with pytest.raises(P.ProtocolError, match="is object of rank 1"):
        P.encode(P.RobotState(seq=0, stamp=0.0, joints=np.array([object()])))
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.decode([b"\x00" * (P.MAX_HEADER_BYTES + 1)])
    with pytest.raises(P.ProtocolError, match="not a msgpack envelope"):
        P.from_wire(b"\xc1")
    with pytest.raises(P.ProtocolError, match="array of binary parts"):
        P.from_wire(msgpack.packb([1, 2]))
    assert P.from_wire(P.to_wire(MESSAGES[1])).seq == MESSAGES[1].seq


def test_real_sockets_with_timeouts_and_latest_only_state():
    ctx = zmq.Context()
    try:
        pull = make_socket(ctx, zmq.PULL, "tcp://127.0.0.1:*", bind=True, timeout_ms=200)
        endpoint = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
        push = make_socket(ctx, zmq.PUSH, endpoint, bind=False, timeout_ms=200)
        assert send(push, MESSAGES[1])
        got = recv(pull)
        assert isinstance(got, P.ActionChunk) and np.array_equal(got.actions, MESSAGES[1].actions)
        assert recv(pull) is None, "a receive times out instead of blocking forever"

        pub = make_socket(ctx, zmq.PUB, "tcp://127.0.0.1:*", bind=True, conflate=True)
        sub = make_socket(ctx, zmq.SUB, pub.getsockopt(zmq.LAST_ENDPOINT).decode(), bind=False, conflate=True,
                          timeout_ms=500)
        threading.Event().wait(0.2)  # slow joiner
        for k in range(50):
            send(pub, P.RobotState(seq=k, stamp=P.now(), joints=np.full(7, k, np.float64)))
        threading.Event().wait(0.2)
        seen = []
        while (m := recv(sub)) is not None:
            seen.append(m.seq)
        assert seen == [49], "the state stream keeps only the newest"
        with pytest.raises(P.ProtocolError, match="leaves the machine"):
            make_socket(ctx, zmq.PUSH, "tcp://10.0.0.5:5701", bind=False)
        for s in (pull, push, pub, sub):
            s.close()
    finally:
        ctx.destroy(linger=0)


def test_an_oversized_frame_is_dropped_by_the_socket_before_it_is_buffered():
    ctx = zmq.Context()
    try:
        pull = make_socket(ctx, zmq.PULL, "tcp://127.0.0.1:*", bind=True, timeout_ms=300)
        assert pull.getsockopt(zmq.MAXMSGSIZE) == P.MAX_WIRE_BYTES
        endpoint = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
        raw = ctx.socket(zmq.PUSH)  # a hostile peer: no limits of its own
        raw.connect(endpoint)
        raw.send(b"\x00" * (P.MAX_WIRE_BYTES + 1))
        assert recv(pull) is None, "the frame never reaches the application"
        push = make_socket(ctx, zmq.PUSH, endpoint, bind=False, timeout_ms=300)
        assert send(push, MESSAGES[5]) and recv(pull) == MESSAGES[5], "the socket still serves others"
        for s in (pull, raw, push):
            s.close(linger=0)
    finally:
        ctx.destroy(linger=0)


def test_curve_link_admits_only_allowed_client_keys(tmp_path):
    from vpp_edge.runtime.transport import CurveKeys, authenticate, create_keys, stop_authenticator

    for name in ("bridge", "runtime", "intruder"):
        create_keys(tmp_path, name)
    assert (tmp_path / "runtime.key_secret").stat().st_mode & 0o077 == 0, "secret keys are private"
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "runtime.key").write_bytes((tmp_path / "runtime.key").read_bytes())
    ctx = zmq.Context()
    try:
        with pytest.raises(P.ProtocolError, match="needs an allow-list"):
            make_socket(ctx, zmq.PULL, "tcp://127.0.0.1:*", bind=True, curve=CurveKeys.load(tmp_path, "bridge"))
        authenticate(ctx, allowed)
        server = make_socket(ctx, zmq.PULL, "tcp://127.0.0.1:*", bind=True,
                             curve=CurveKeys.load(tmp_path, "bridge"), timeout_ms=1000)
        endpoint = server.getsockopt(zmq.LAST_ENDPOINT).decode()
        clients = {name: make_socket(ctx, zmq.PUSH, endpoint, bind=False, timeout_ms=300,
                                     curve=CurveKeys.load(tmp_path, name, server="bridge"))
                   for name in ("intruder", "runtime")}
        send(clients["intruder"], MESSAGES[5])
        assert recv(server) is None, "an unknown key is refused"
        assert send(clients["runtime"], MESSAGES[5])
        assert recv(server) == MESSAGES[5], "a known key is admitted"
        for sock in (server, *clients.values()):
            sock.close(linger=0)
    finally:
        stop_authenticator(ctx)
        ctx.destroy(linger=0)


@pytest.mark.parametrize("changes, why", [
    ({"targets": np.zeros((0, 7))}, "0 < T"),
    ({"targets": np.zeros((P.MAX_WAYPOINTS + 1, 7))}, "0 < T"),
    ({"targets": np.full((2, 7), np.nan)}, "NaN"),
    ({"dt": 0.0}, "dt must be"),
    ({"start": 1.7e308, "dt": 1e308}, "not finite"),
])
def test_waypoints_are_checked_before_they_leave_or_arrive(changes, why):
    good = {"seq": 1, "stamp": 1.0, "start": 1.1, "dt": 0.02, "targets": np.zeros((3, 7))}
    msg = P.Waypoints(**{**good, **changes})
    with pytest.raises(P.ProtocolError, match=why):
        P.encode(msg)
    assert np.allclose(P.Waypoints(**good).times(), [1.1, 1.12, 1.14])
