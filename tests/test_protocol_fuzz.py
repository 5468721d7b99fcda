"""Total decoding, property-tested: every message hypothesis can build round-trips, and every
structural or byte-level mutation of one either decodes to a valid message or raises
ProtocolError, never anything else (an escaping exception kills the thread that reads the
socket). The mutation test alone checks >= 100,000 messages in a few seconds; set
VPP_FUZZ_SCALE=10 (or more) for a longer, randomised run."""

from __future__ import annotations

import os
import random
from collections import Counter

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vpp_edge.runtime import protocol as P

SCALE = int(os.environ.get("VPP_FUZZ_SCALE", "1"))
MUTANTS_PER_EXAMPLE = 100
MUTATION_EXAMPLES = 1000 * SCALE
# CI runs are reproducible; a scaled-up run explores new examples each time. No example
# database: the working tree is shared and CI starts clean anyway. No deadlines or speed
# health checks: a loaded 2-core CI machine is slow, not wrong.
FUZZ = settings(deadline=None, database=None, derandomize=SCALE == 1, suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(allow_nan=False, allow_infinity=False)
int64 = st.integers(-(2**63), 2**63 - 1)
text = st.text(max_size=12)


def _floats(ndim: int, min_side: int = 0) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(st.sampled_from([np.float32, np.float64]),
                      hnp.array_shapes(min_dims=ndim, max_dims=ndim, min_side=min_side, max_side=5),
                      elements=st.floats(-1e6, 1e6, width=32))


def _common() -> dict:
    return {"seq": int64, "stamp": finite, "session": int64}


MESSAGE_STRATEGIES = {
    P.Hello: st.builds(P.Hello, **_common(), role=text, robot=text, action_dim=int64),
    P.ActionChunk: st.builds(P.ActionChunk, **_common(), obs_stamp=finite, start_offset=finite,
                             dt=st.floats(1e-6, 10.0), actions=_floats(2, min_side=1)),
    P.RobotState: st.builds(P.RobotState, **_common(), mode=st.sampled_from(sorted(P.BRIDGE_MODES)),
                            estopped=st.booleans(), last_chunk_seq=int64, joints=_floats(1), ee_pose=_floats(1),
                            target=_floats(1)),
    P.CommandMsg: st.builds(P.CommandMsg, **_common(), command=st.sampled_from([c.value for c in P.Command])),
    P.Reply: st.builds(P.Reply, **_common(), request_seq=int64, ok=st.booleans(), reason=text,
                       status=st.dictionaries(text, st.integers(0, 100) | text | st.booleans(), max_size=4)),
    P.Heartbeat: st.builds(P.Heartbeat, **_common(), sender=text,
                           mode=st.sampled_from([m.value for m in P.RuntimeMode])),
    P.Event: st.builds(P.Event, **_common(), kind=text, detail=text),
    P.Waypoints: st.builds(P.Waypoints, **_common(), start=st.floats(-1e9, 1e9), dt=st.floats(1e-6, 10.0),
                           targets=_floats(2, min_side=1)),
    P.CameraFrames: st.builds(P.CameraFrames, **_common(), index=int64,
                              images=hnp.arrays(np.uint8, st.tuples(*[st.integers(1, 4)] * 3, st.just(3)))),
}
messages = st.one_of(*MESSAGE_STRATEGIES.values())

# Values a hostile or broken peer puts where the schema expects something else: wrong types,
# containers, extremes of msgpack's integers, overflowing shapes, non-finite floats.
NASTY = [None, True, False, 0, -1, 1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1, 0.0, -0.0, 1e308,
         float("nan"), float("inf"), float("-inf"), "", "float32", "float16", "object", "V8", "<f8", "uint8",
         b"", b"\x00" * 9, [], {}, [1], [None], {"a": 1}, {b"k": 1}, [[]], [2**31, 2**31], [2**32, 2**32],
         [2**62, 4], [-1, 7], [1, 1, 1, 1, 1, 1], [True, 7], [1.5, 7], ["7"], [0, 0], list(range(20)),
         msgpack.ExtType(1, b"x"), {"name": "actions", "dtype": "float32", "shape": [1, 7]}]
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | text | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=8,
) | st.sampled_from(NASTY)


def outcome(decoder, data) -> str:
    """'accepted' (and the message re-encodes and decodes: it is valid) or 'refused'; any
    other exception propagates and fails the test."""
    try:
        msg = decoder(data)
    except P.ProtocolError:
        return "refused"
    assert type(P.decode(P.encode(msg))) is type(msg)
    return "accepted"


def _paths(node, prefix=()):
    """Every (container path, key) in a decoded header, for structural mutations."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix, k
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix, i
            yield from _paths(v, (*prefix, i))


def _replace(header: dict, rng: random.Random, value) -> dict:
    """Put ``value`` at a random place of the header (or add / delete a key)."""
    paths = list(_paths(header))
    parent_path, key = rng.choice(paths)
    parent = header
    for k in parent_path:
        parent = parent[k]
    op = rng.random()
    if op < 0.7:
        parent[key] = value
    elif op < 0.85 and isinstance(parent, dict):
        del parent[key]
    elif isinstance(parent, dict):
        parent[rng.choice(["extra", "v", "name", "shape", "dtype"])] = value
    else:
        parent.append(value)
    return header


def mutate(frames: list[bytes], rng: random.Random) -> list[bytes]:
    """One random structural or byte-level mutation (or a few stacked)."""
    frames = [bytearray(f) for f in frames]
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        i = rng.randrange(len(frames)) if frames else 0
        op = rng.randrange(8)
        if op == 0 and frames:  # structural: a header value replaced by a nasty one
            try:
                header = msgpack.unpackb(bytes(frames[0]), strict_map_key=False)
                frames[0] = bytearray(msgpack.packb(_replace(header, rng, rng.choice(NASTY)), use_bin_type=True))
            except Exception:  # the header is already garbage: mutate its bytes instead
                op = 1
        if op == 1 and frames and frames[i]:
            for _ in range(rng.randint(1, 4)):
                frames[i][rng.randrange(len(frames[i]))] = rng.randrange(256)
        elif op == 2 and frames:
            frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
        elif op == 3 and frames:
            frames[i] += rng.randbytes(rng.randrange(1, 16))
        elif op == 4:
            frames.append(bytearray(rng.randbytes(rng.randrange(32))))
        elif op == 5 and frames:
            del frames[i]
        elif op == 6 and len(frames) > 1:
            rng.shuffle(frames)
        elif op == 7 and frames:
            frames[i] = bytearray(rng.randbytes(rng.randrange(64)))
    return [bytes(f) for f in frames]


@settings(FUZZ, max_examples=150)
@given(msg=messages)
def test_every_valid_message_round_trips(msg):
    out = P.from_wire(P.to_wire(msg))
    assert type(out) is type(msg)
    for name in msg.__dataclass_fields__:
        a, b = getattr(msg, name), getattr(out, name)
        assert np.array_equal(a, b) and a.dtype == b.dtype if isinstance(a, np.ndarray) else a == b


@settings(FUZZ, max_examples=1000)
@given(msg=messages, value=msgpack_values, seed=st.integers(0, 2**32 - 1))
def test_any_value_anywhere_in_the_header_is_a_protocol_error_or_valid(msg, value, seed):
    frames = P.encode(msg)
    header = _replace(msgpack.unpackb(frames[0], strict_map_key=False), random.Random(seed), value)
    mutated = [msgpack.packb(header, use_bin_type=True), *frames[1:]]
    outcome(P.decode, mutated)
    outcome(P.from_wire, msgpack.packb(mutated, use_bin_type=True))


def test_a_hundred_thousand_mutated_messages_decode_or_raise_protocol_error():
    tally: Counter[str] = Counter()

    @settings(FUZZ, max_examples=MUTATION_EXAMPLES)
    @given(msg=messages, seed=st.integers(0, 2**32 - 1))
    def fuzz(msg, seed):
        rng = random.Random(seed)
        frames = P.encode(msg)
        for _ in range(MUTANTS_PER_EXAMPLE // 2):  # half as frame lists, half as single wire frames
            tally[outcome(P.decode, mutate(frames, rng))] += 1
            wire = bytearray(msgpack.packb(mutate(frames, rng), use_bin_type=True))
            if rng.random() < 0.3:  # the envelope's own bytes
                wire[rng.randrange(len(wire))] = rng.randrange(256)
            tally[outcome(P.from_wire, bytes(wire))] += 1

    fuzz()
    assert sum(tally.values()) >= 100_000 * SCALE
    assert tally["refused"] > tally["accepted"] > 0, tally  # both sides of the contract were exercised


def test_frames_of_other_types_and_sizes_are_protocol_errors():
    for bad in (None, "text", [b"x", 1], (b"x",), [bytearray(b"x")]):
        try:
            P.decode(bad)
        except P.ProtocolError:
            continue
        raise AssertionError(f"{bad!r} decoded")
    for bad in ("text", None, b"\x00" * (P.MAX_WIRE_BYTES + 1)):
        try:
            P.from_wire(bad)
        except P.ProtocolError:
            continue
        raise AssertionError(f"{bad!r} decoded")
