"""The ZeroMQ contract: round trips, rejection of everything malformed, real sockets."""

import random
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
        (lambda h, b: (dict(h, v=2), b), "schema version 2"),
        (lambda h, b: (dict(h, type="launch_missiles"), b), "type 'launch_missiles' unknown"),
        (lambda h, b: ({**h, "fields": {k: v for k, v in h["fields"].items() if k != "dt"}}, b), "missing \\['dt'\\]"),
        (lambda h, b: ({**h, "fields": {**h["fields"], "extra": 1}}, b), "unexpected \\['extra'\\]"),
        (lambda h, b: ({**h, "fields": {**h["fields"], "seq": "5"}}, b), "'seq' must be int"),
        (lambda h, b: ({**h, "fields": {**h["fields"], "dt": float("nan")}}, b), "'dt' is not finite"),
        (lambda h, b: ({**h, "fields": {**h["fields"], "dt": 0.0}}, b), "dt must be a positive"),
        (lambda h, b: (h, b[:-4]), "has 276 bytes"),
        (lambda h, b: (h, None), "announces 1 arrays, got 0"),
        (lambda h, b: ({**h, "arrays": [{**h["arrays"][0], "dtype": "object"}]}, b), "dtype 'object' not allowed"),
        (lambda h, b: ({**h, "arrays": [{**h["arrays"][0], "shape": [70]}]}, b), "actions must be \\[T, A\\]"),
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
    with pytest.raises(P.ProtocolError, match="empty message"):
        P.decode([])
    with pytest.raises(P.ProtocolError, match="command 'fly' unknown"):
        P.encode(P.CommandMsg(seq=0, stamp=0.0, command="fly"))
    with pytest.raises(P.ProtocolError, match="dtype object"):
        P.encode(P.RobotState(seq=0, stamp=0.0, joints=np.array([object()])))
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.decode([b"\x00" * (P.MAX_HEADER_BYTES + 1)])
    with pytest.raises(P.ProtocolError, match="not a msgpack envelope"):
        P.from_wire(b"\xc1")
    with pytest.raises(P.ProtocolError, match="array of binary parts"):
        P.from_wire(msgpack.packb([1, 2]))
    assert P.from_wire(P.to_wire(MESSAGES[1])).seq == MESSAGES[1].seq


def test_fuzzed_messages_never_escape_as_other_exceptions():
    """Thousands of random and mutated messages: each decodes to a valid message or is a ProtocolError."""
    rng = random.Random(0)
    seeds = [P.encode(m) for m in MESSAGES]
    accepted = rejected = 0
    for _ in range(3000):
        frames = [bytearray(f) for f in rng.choice(seeds)]
        for _ in range(rng.randint(1, 4)):
            target = rng.randrange(len(frames))
            op = rng.random()
            if op < 0.4 and frames[target]:
                frames[target][rng.randrange(len(frames[target]))] = rng.randrange(256)
            elif op < 0.6:
                frames[target] = frames[target][: rng.randrange(len(frames[target]) + 1)]
            elif op < 0.8:
                frames.append(bytearray(rng.randbytes(rng.randrange(64))))
            else:
                frames[target] = bytearray(rng.randbytes(rng.randrange(128)))
        try:
            msg = P.decode([bytes(f) for f in frames])
            P.encode(msg)  # whatever got through is a valid message
            accepted += 1
        except P.ProtocolError:
            rejected += 1
    assert accepted + rejected == 3000 and rejected > 2000


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


def test_curve_encrypted_link(tmp_path):
    import zmq.auth

    from vpp_edge.runtime.transport import CurveKeys

    zmq.auth.create_certificates(str(tmp_path), "bridge")
    zmq.auth.create_certificates(str(tmp_path), "runtime")
    ctx = zmq.Context()
    try:
        server = make_socket(ctx, zmq.PULL, "tcp://127.0.0.1:*", bind=True,
                             curve=CurveKeys.load(tmp_path, "bridge"), timeout_ms=1000)
        client = make_socket(ctx, zmq.PUSH, server.getsockopt(zmq.LAST_ENDPOINT).decode(), bind=False,
                             curve=CurveKeys.load(tmp_path, "runtime", server="bridge"), timeout_ms=1000)
        assert send(client, MESSAGES[5])
        assert recv(server) == MESSAGES[5]
        server.close()
        client.close()
    finally:
        ctx.destroy(linger=0)
