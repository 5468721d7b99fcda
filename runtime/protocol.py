"""The ZeroMQ contract between the runtime and the bridges (shared by both, no torch).

A message is one msgpack header plus one raw buffer per numpy array (never pickle),
sent as a single ZeroMQ frame (``to_wire``) so that latest-only (conflated) sockets work. The header carries the schema version, the message type,
a sequence number, the sender's monotonic timestamp (seconds; CLOCK_MONOTONIC is shared
by all processes of one machine) and the type's fields. ``decode`` validates everything
a peer could get wrong and raises :class:`ProtocolError` saying what.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar

import msgpack
import numpy as np

from vpp_edge.errors import VPPError

PROTOCOL_VERSION = 1
MAX_ARRAY_BYTES = 16 * 2**20  # far above any action chunk or state; bounds a hostile peer
MAX_HEADER_BYTES = 64 * 2**10
ALLOWED_DTYPES = frozenset({"float32", "float64", "int32", "int64", "uint8", "bool"})

# Default endpoints: loopback only. A link that leaves the machine must use CurveZMQ.
ACTION_ENDPOINT = "tcp://127.0.0.1:5701"  # runtime PUSH/PUB -> bridge: action chunks
STATE_ENDPOINT = "tcp://127.0.0.1:5702"  # bridge PUB -> runtime SUB (conflated): robot state
EVENT_ENDPOINT = "tcp://127.0.0.1:5704"  # bridge PUB -> runtime SUB (every message): safety events
COMMAND_ENDPOINT = "tcp://127.0.0.1:5703"  # runtime DEALER -> bridge ROUTER: commands / replies
CAMERA_ENDPOINT = "tcp://127.0.0.1:5705"  # simulator bridge PUB -> runtime SUB (conflated): rendered views


class ProtocolError(VPPError):
    """A message that is malformed, of another schema version, or fails a check."""


class MsgType(str, Enum):
    HELLO = "hello"
    ACTION_CHUNK = "action_chunk"
    STATE = "state"
    COMMAND = "command"
    REPLY = "reply"
    HEARTBEAT = "heartbeat"
    EVENT = "event"
    CAMERA = "camera"


class Command(str, Enum):
    ENABLE = "enable"
    RESET = "reset"  # clears a latched e-stop
    ESTOP = "estop"
    STATUS = "status"
    HOLD = "hold"


@dataclass(frozen=True)
class Message:
    """Fields common to every message."""

    TYPE: ClassVar[MsgType]
    ARRAYS: ClassVar[tuple[str, ...]] = ()
    seq: int
    stamp: float  # sender's time.monotonic() when the message was made

    def check(self) -> None:
        """Type-specific checks beyond the schema (override)."""


@dataclass(frozen=True)
class Hello(Message):
    TYPE: ClassVar[MsgType] = MsgType.HELLO
    role: str = ""
    robot: str = ""
    action_dim: int = 0


@dataclass(frozen=True)
class ActionChunk(Message):
    """Actions [T, A] for times ``obs_stamp + start_offset + i * dt`` (i = 0..T-1)."""

    TYPE: ClassVar[MsgType] = MsgType.ACTION_CHUNK
    ARRAYS: ClassVar[tuple[str, ...]] = ("actions",)
    obs_stamp: float = 0.0  # monotonic time of the observation the chunk was predicted from
    dt: float = 0.0  # seconds between consecutive actions
    start_offset: float = 0.0
    actions: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def check(self) -> None:
        if self.actions.ndim != 2 or self.actions.shape[0] == 0:
            raise ProtocolError(f"action_chunk: actions must be [T, A] with T > 0, got {self.actions.shape}")
        if not np.issubdtype(self.actions.dtype, np.floating):
            raise ProtocolError(f"action_chunk: actions must be floating point, got {self.actions.dtype}")
        if not np.all(np.isfinite(self.actions)):
            raise ProtocolError("action_chunk: actions contain NaN or Inf")
        if not (math.isfinite(self.dt) and self.dt > 0):
            raise ProtocolError(f"action_chunk: dt must be a positive number of seconds, got {self.dt}")


@dataclass(frozen=True)
class RobotState(Message):
    """What the bridge measured: joint positions, end-effector pose, and its own status."""

    TYPE: ClassVar[MsgType] = MsgType.STATE
    ARRAYS: ClassVar[tuple[str, ...]] = ("joints", "ee_pose", "target")
    mode: str = "idle"  # idle | tracking | hold | stopped | estop
    estopped: bool = False
    last_chunk_seq: int = -1
    joints: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    ee_pose: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    target: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))


@dataclass(frozen=True)
class CommandMsg(Message):
    TYPE: ClassVar[MsgType] = MsgType.COMMAND
    command: str = Command.STATUS.value

    def check(self) -> None:
        if self.command not in {c.value for c in Command}:
            raise ProtocolError(f"command '{self.command}' unknown; allowed: {[c.value for c in Command]}")


@dataclass(frozen=True)
class Reply(Message):
    TYPE: ClassVar[MsgType] = MsgType.REPLY
    request_seq: int = -1  # correlates with the command's seq
    ok: bool = True
    reason: str = ""
    status: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    sender: str = ""


@dataclass(frozen=True)
class Event(Message):
    """A safety or lifecycle event (watchdog hold/stop, e-stop, rejected message, ...)."""

    TYPE: ClassVar[MsgType] = MsgType.EVENT
    kind: str = ""
    detail: str = ""


@dataclass(frozen=True)
class CameraFrames(Message):
    """Images of every view taken at ``stamp`` (a simulator's cameras, streamed like a network camera)."""

    TYPE: ClassVar[MsgType] = MsgType.CAMERA
    ARRAYS: ClassVar[tuple[str, ...]] = ("images",)
    index: int = 0
    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0, 3), np.uint8))

    def check(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ProtocolError(f"camera: images must be uint8 [V, H, W, 3], got {self.images.dtype} "
                                f"{self.images.shape}")


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE.value: cls for cls in (Hello, ActionChunk, RobotState, CommandMsg, Reply, Heartbeat, Event, CameraFrames)
}


def now() -> float:
    """The protocol clock: ``time.monotonic()`` in seconds."""
    return time.monotonic()


def encode(msg: Message) -> list[bytes]:
    """Message -> [msgpack header, array buffers...]."""
    msg.check()
    scalars = {f.name: getattr(msg, f.name) for f in fields(msg) if f.name not in msg.ARRAYS}
    arrays = []
    buffers = []
    for name in msg.ARRAYS:
        arr = np.ascontiguousarray(getattr(msg, name))
        if arr.dtype.name not in ALLOWED_DTYPES:
            raise ProtocolError(f"{msg.TYPE.value}: array '{name}' has dtype {arr.dtype}; allowed: "
                                f"{sorted(ALLOWED_DTYPES)}")
        arrays.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape)})
        buffers.append(arr.tobytes())
    header = {"v": PROTOCOL_VERSION, "type": msg.TYPE.value, "fields": scalars, "arrays": arrays}
    return [msgpack.packb(header, use_bin_type=True), *buffers]


def decode(frames: list[bytes]) -> Message:
    """[header, buffers...] -> Message, or :class:`ProtocolError` naming the problem."""
    if not frames:
        raise ProtocolError("empty message")
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(frames[0])} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for garbage
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict) or set(header) != {"v", "type", "fields", "arrays"}:
        raise ProtocolError("header must be a map with keys v, type, fields, arrays")
    if header["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"schema version {header['v']!r}, this side speaks {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(header["type"]) if isinstance(header["type"], str) else None
    if cls is None:
        raise ProtocolError(f"message type {header['type']!r} unknown; allowed: {sorted(MESSAGE_TYPES)}")
    specs, values = header["arrays"], header["fields"]
    if not isinstance(values, dict) or not isinstance(specs, list):
        raise ProtocolError(f"{cls.TYPE.value}: 'fields' must be a map and 'arrays' a list")
    if [s.get("name") if isinstance(s, dict) else None for s in specs] != list(cls.ARRAYS):
        raise ProtocolError(f"{cls.TYPE.value}: expected arrays {list(cls.ARRAYS)}")
    if len(frames) != 1 + len(specs):
        raise ProtocolError(f"{cls.TYPE.value}: header announces {len(specs)} arrays, got {len(frames) - 1} buffers")
    kwargs = _check_fields(cls, values)
    for spec, buf in zip(specs, frames[1:]):
        kwargs[spec["name"]] = _array(cls, spec, buf)
    msg = cls(**kwargs)
    msg.check()
    return msg


def _check_fields(cls: type[Message], values: dict[str, Any]) -> dict[str, Any]:
    expected = {f.name: f for f in fields(cls) if f.name not in cls.ARRAYS}
    if set(values) != set(expected):
        missing, extra = sorted(set(expected) - set(values)), sorted(set(values) - set(expected))
        raise ProtocolError(f"{cls.TYPE.value}: fields differ from the schema (missing {missing}, unexpected {extra})")
    out = {}
    for name, value in values.items():
        kind = expected[name].type
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
        }.get(kind, isinstance(value, dict))
        if not ok:
            raise ProtocolError(f"{cls.TYPE.value}: field '{name}' must be {kind}, got {type(value).__name__}")
        if kind == "float" and not math.isfinite(value):
            raise ProtocolError(f"{cls.TYPE.value}: field '{name}' is not finite")
        out[name] = float(value) if kind == "float" else value
    return out


def _array(cls: type[Message], spec: dict[str, Any], buf: bytes) -> np.ndarray:
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"{cls.TYPE.value}: array '{name}' dtype {dtype!r} not allowed")
    if not (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**31 for d in shape) and len(shape) <= 4):
        raise ProtocolError(f"{cls.TYPE.value}: array '{name}' shape {shape!r} is invalid")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if expected > MAX_ARRAY_BYTES or len(buf) != expected:
        raise ProtocolError(f"{cls.TYPE.value}: array '{name}' has {len(buf)} bytes, shape {shape} of {dtype} "
                            f"needs {expected}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


def to_wire(msg: Message) -> bytes:
    """One ZeroMQ frame: a msgpack array of [header, buffer, ...] (binary, no copies of arrays as text)."""
    return msgpack.packb(encode(msg), use_bin_type=True)


def from_wire(data: bytes) -> Message:
    """Inverse of :func:`to_wire`, with the same validation as :func:`decode`."""
    if len(data) > MAX_HEADER_BYTES + 4 * MAX_ARRAY_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes is too large")
    try:
        frames = msgpack.unpackb(data, raw=False, max_bin_len=MAX_ARRAY_BYTES, max_array_len=16)
    except Exception as exc:
        raise ProtocolError(f"frame is not a msgpack envelope ({type(exc).__name__})") from None
    if not isinstance(frames, list) or not all(isinstance(f, bytes) for f in frames):
        raise ProtocolError("frame must be a msgpack array of binary parts")
    return decode(frames)
