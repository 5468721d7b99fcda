"""The ZeroMQ contract between the runtime and the bridges (shared by both, no torch).

A message is one msgpack header plus one raw buffer per numpy array (never pickle),
sent as a single ZeroMQ frame (``to_wire``) so that latest-only (conflated) sockets work. The header carries the schema version, the message type,
a sequence number, the sender's session id, the sender's monotonic timestamp (seconds;
CLOCK_MONOTONIC is shared by all processes of one machine; across machines the receiver
corrects it by the offset measured at hello) and the type's fields.

Decoding is total: every byte sequence either becomes a message that passes its checks or
raises :class:`ProtocolError` saying what is wrong, never another exception (a peer, or
anything that can reach the port, must not be able to kill the thread that reads it). Types,
dtypes (a whitelist per array), ranks and sizes are checked before anything is allocated.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar

import msgpack
import numpy as np

from vpp_edge.errors import VPPError

PROTOCOL_VERSION = 3  # 2: session ids, the runtime's mode in its heartbeat; 3: waypoints
MAX_ARRAY_BYTES = 16 * 2**20  # far above any action chunk or state; bounds a hostile peer
MAX_HEADER_BYTES = 64 * 2**10
MAX_NDIM = 4
MAX_ARRAYS = 3  # the most arrays any message type carries (RobotState)
MAX_WAYPOINTS = 256  # targets one Waypoints message may schedule
# The largest valid frame on the wire (header + buffers + the envelope's few bytes): every
# socket refuses longer ones (ZMQ_MAXMSGSIZE) before they are buffered in memory.
MAX_WIRE_BYTES = MAX_HEADER_BYTES + MAX_ARRAYS * (MAX_ARRAY_BYTES + 8) + 64
FLOATS = frozenset({"float32", "float64"})
ALLOWED_DTYPES = frozenset({*FLOATS, "uint8"})  # every array dtype any message may carry (no object, no void)

# Default endpoints: loopback only. A link that leaves the machine must use CurveZMQ.
ACTION_ENDPOINT = "tcp://127.0.0.1:5701"  # runtime PUSH/PUB -> bridge: action chunks
STATE_ENDPOINT = "tcp://127.0.0.1:5702"  # bridge PUB -> runtime SUB (conflated): robot state
EVENT_ENDPOINT = "tcp://127.0.0.1:5704"  # bridge PUB -> runtime SUB (every message): safety events
COMMAND_ENDPOINT = "tcp://127.0.0.1:5703"  # runtime DEALER -> bridge ROUTER: commands / replies
CAMERA_ENDPOINT = "tcp://127.0.0.1:5705"  # simulator bridge PUB -> runtime SUB (conflated): rendered views
DEFAULT_BASE_PORT = 5701  # the action port; --base-port / $VPP_BASE_PORT moves all five together
PORT_SPAN = 5  # ports a bridge binds: base .. base + 4


def endpoint_on(host: str, default: str, base_port: int = DEFAULT_BASE_PORT) -> str:
    """``default`` (a loopback endpoint above) on ``host``: ``0.0.0.0`` on a bridge binds
    every interface, a runtime connects to the bridge computer's address. Its port moves
    with ``base_port`` (the action port; the others follow it as 5702-5705 follow 5701)."""
    port = int(default.rsplit(":", 1)[1]) - DEFAULT_BASE_PORT + base_port
    return f"tcp://{host}:{port}"


def base_port_from_env() -> int:
    """``$VPP_BASE_PORT`` (a bridge and its runtime beside another pair on one machine), else 5701."""
    value = os.environ.get("VPP_BASE_PORT", "")
    if not value:
        return DEFAULT_BASE_PORT
    if not value.isdigit() or not 1 <= int(value) <= 65535 - PORT_SPAN:
        raise ProtocolError(f"VPP_BASE_PORT={value!r} is not a port between 1 and {65535 - PORT_SPAN}")
    return int(value)


def free_base_port(host: str = "127.0.0.1", start: int = DEFAULT_BASE_PORT, tries: int = 200) -> int:
    """The first ``start + k * PORT_SPAN`` whose :data:`PORT_SPAN` ports can all be bound on
    ``host`` now (the demo's bridge, beside any other on the machine)."""
    for base in range(start, min(start + tries * PORT_SPAN, 65535 - PORT_SPAN), PORT_SPAN):
        probes: list[socket.socket] = []
        try:
            for port in range(base, base + PORT_SPAN):
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probes.append(probe)
                probe.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise ProtocolError(f"no {PORT_SPAN} free ports in a row on {host} from {start}")


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
    WAYPOINTS = "waypoints"


class RuntimeMode(str, Enum):
    """What a runtime's heartbeat says about it (it sends one on each tick without a target)."""

    IDLE = "idle"  # not commanding on purpose (no chunk yet, between episodes): the bridge may hold
    STARVED = "starved"  # wants to act, has no valid action: the bridge's deadlines keep running
    STOP = "stop"  # its own watchdog or e-stop says stop: the bridge stops now


BRIDGE_MODES = frozenset({"idle", "tracking", "hold", "stopped", "estop"})


@dataclass(frozen=True)
class ArraySpec:
    """What an array of a message may be: its rank and its dtypes."""

    ndim: int
    dtypes: frozenset[str] = FLOATS

    def __post_init__(self) -> None:
        if not self.dtypes <= ALLOWED_DTYPES or not 0 <= self.ndim <= MAX_NDIM:
            raise ValueError(f"array spec {self} leaves the whitelist {sorted(ALLOWED_DTYPES)} / rank {MAX_NDIM}")


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
    ARRAYS: ClassVar[dict[str, ArraySpec]] = {}  # name -> spec, in wire order
    seq: int
    stamp: float  # sender's time.monotonic() when the message was made
    session: int = 0  # sender's link session (chosen at hello): replays of other sessions are refused

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
    ARRAYS: ClassVar[dict[str, ArraySpec]] = {"actions": ArraySpec(2)}
    obs_stamp: float = 0.0  # monotonic time of the observation the chunk was predicted from
    dt: float = 0.0  # seconds between consecutive actions
    start_offset: float = 0.0
    actions: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def check(self) -> None:
        if self.actions.ndim != 2 or self.actions.shape[0] == 0:
            raise ProtocolError(f"action_chunk: actions must be [T, A] with T > 0, got {self.actions.shape}")
        if not np.all(np.isfinite(self.actions)):
            raise ProtocolError("action_chunk: actions contain NaN or Inf")
        if not (math.isfinite(self.dt) and self.dt > 0):
            raise ProtocolError(f"action_chunk: dt must be a positive number of seconds, got {self.dt}")


@dataclass(frozen=True)
class Waypoints(Message):
    """Absolute targets [T, A] (robot units: the runtime has already added delta actions up)
    to be reached at the bridge's times ``start + i * dt``. The bridge's servo loop executes
    them on its own clock, interpolating between them; a later message replaces the
    schedule from its first waypoint on. Absolute, so a dropped (conflated) message loses
    no motion: the next one says where to be."""

    TYPE: ClassVar[MsgType] = MsgType.WAYPOINTS
    ARRAYS: ClassVar[dict[str, ArraySpec]] = {"targets": ArraySpec(2)}
    start: float = 0.0  # the bridge's monotonic time of targets[0]
    dt: float = 0.0  # seconds between consecutive targets
    targets: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def check(self) -> None:
        if self.targets.ndim != 2 or not 0 < self.targets.shape[0] <= MAX_WAYPOINTS:
            raise ProtocolError(f"waypoints: targets must be [T, A] with 0 < T <= {MAX_WAYPOINTS}, "
                                f"got {self.targets.shape}")
        if not np.all(np.isfinite(self.targets)):
            raise ProtocolError("waypoints: targets contain NaN or Inf")
        if not (math.isfinite(self.dt) and self.dt > 0):
            raise ProtocolError(f"waypoints: dt must be a positive number of seconds, got {self.dt}")
        if not math.isfinite(self.start + self.dt * self.targets.shape[0]):
            raise ProtocolError("waypoints: the last waypoint's time is not finite")

    def times(self) -> np.ndarray:
        return self.start + self.dt * np.arange(self.targets.shape[0])


@dataclass(frozen=True)
class RobotState(Message):
    """What the bridge measured: joint positions, end-effector pose, and its own status."""

    TYPE: ClassVar[MsgType] = MsgType.STATE
    ARRAYS: ClassVar[dict[str, ArraySpec]] = {"joints": ArraySpec(1), "ee_pose": ArraySpec(1), "target": ArraySpec(1)}
    mode: str = "idle"  # idle | tracking | hold | stopped | estop
    estopped: bool = False
    last_chunk_seq: int = -1
    joints: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    ee_pose: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    target: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))

    def check(self) -> None:
        if self.mode not in BRIDGE_MODES:
            raise ProtocolError(f"state: mode '{self.mode}' unknown; allowed: {sorted(BRIDGE_MODES)}")


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
    mode: str = RuntimeMode.IDLE.value

    def check(self) -> None:
        if self.mode not in {m.value for m in RuntimeMode}:
            raise ProtocolError(f"heartbeat: mode '{self.mode}' unknown; allowed: {[m.value for m in RuntimeMode]}")


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
    ARRAYS: ClassVar[dict[str, ArraySpec]] = {"images": ArraySpec(4, frozenset({"uint8"}))}
    index: int = 0
    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0, 3), np.uint8))

    def check(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ProtocolError(f"camera: images must be uint8 [V, H, W, 3], got {self.images.dtype} "
                                f"{self.images.shape}")
        if 0 in self.images.shape[:3]:  # an empty image would reach the resize
            raise ProtocolError(f"camera: images must not be empty, got {self.images.shape}")


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE.value: cls for cls in (Hello, ActionChunk, RobotState, CommandMsg, Reply, Heartbeat, Event, CameraFrames,
                                    Waypoints)
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
    for name, spec in msg.ARRAYS.items():
        arr = np.ascontiguousarray(getattr(msg, name))
        if arr.dtype.name not in spec.dtypes or arr.ndim != spec.ndim:
            raise ProtocolError(f"{msg.TYPE.value}: array '{name}' is {arr.dtype} of rank {arr.ndim}; allowed: "
                                f"{sorted(spec.dtypes)} of rank {spec.ndim}")
        arrays.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape)})
        buffers.append(arr.tobytes())
    header = {"v": PROTOCOL_VERSION, "type": msg.TYPE.value, "fields": scalars, "arrays": arrays}
    return [msgpack.packb(header, use_bin_type=True), *buffers]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Field annotation (a string: annotations are postponed) -> test of a decoded value.
_FIELD_KINDS: dict[str, Any] = {
    "int": _is_int,
    "float": lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "dict[str, Any]": lambda v: isinstance(v, dict),
}
_ARRAY_KEYS = {"name", "dtype", "shape"}


def decode(frames: list[bytes]) -> Message:
    """[header, buffers...] -> Message, or :class:`ProtocolError` naming the problem (nothing else)."""
    if not isinstance(frames, list) or not frames or not all(isinstance(f, bytes) for f in frames):
        raise ProtocolError("a message is a non-empty list of byte strings")
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(frames[0])} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for garbage
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict) or set(header) != {"v", "type", "fields", "arrays"}:
        raise ProtocolError("header must be a map with keys v, type, fields, arrays")
    if not (_is_int(header["v"]) and header["v"] == PROTOCOL_VERSION):
        raise ProtocolError(f"schema version {header['v']!r}, this side speaks {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(header["type"]) if isinstance(header["type"], str) else None
    if cls is None:
        raise ProtocolError(f"message type {header['type']!r} unknown; allowed: {sorted(MESSAGE_TYPES)}")
    specs, values = header["arrays"], header["fields"]
    if not isinstance(values, dict) or not isinstance(specs, list):
        raise ProtocolError(f"{cls.TYPE.value}: 'fields' must be a map and 'arrays' a list")
    if not all(isinstance(s, dict) and set(s) == _ARRAY_KEYS for s in specs) or \
            [s["name"] for s in specs] != list(cls.ARRAYS):
        raise ProtocolError(f"{cls.TYPE.value}: expected arrays {list(cls.ARRAYS)}, each with {sorted(_ARRAY_KEYS)}")
    if len(frames) != 1 + len(specs):
        raise ProtocolError(f"{cls.TYPE.value}: header announces {len(specs)} arrays, got {len(frames) - 1} buffers")
    kwargs = _check_fields(cls, values)
    for spec, buf in zip(specs, frames[1:]):
        kwargs[spec["name"]] = _array(cls, spec, buf)
    msg = cls(**kwargs)
    msg.check()
    return msg


def _check_fields(cls: type[Message], values: dict[str, Any]) -> dict[str, Any]:
    expected = {f.name: f.type for f in fields(cls) if f.name not in cls.ARRAYS}
    if set(values) != set(expected):
        # keys may be str or bytes (msgpack): sort by repr, mixed types do not compare
        missing, extra = sorted(set(expected) - set(values)), sorted(set(values) - set(expected), key=repr)
        raise ProtocolError(f"{cls.TYPE.value}: fields differ from the schema (missing {missing}, unexpected {extra})")
    out = {}
    for name, value in values.items():
        kind = expected[name]
        if not _FIELD_KINDS[kind](value):
            raise ProtocolError(f"{cls.TYPE.value}: field '{name}' must be a finite {kind}, got "
                                f"{type(value).__name__}" + (" (not finite)" if isinstance(value, float) else ""))
        out[name] = float(value) if kind == "float" else value
    return out


def _array(cls: type[Message], spec: dict[str, Any], buf: bytes) -> np.ndarray:
    name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
    allowed = cls.ARRAYS[name]
    if not isinstance(dtype, str) or dtype not in allowed.dtypes:
        raise ProtocolError(f"{cls.TYPE.value}: array '{name}' dtype {dtype!r} not allowed; allowed: "
                            f"{sorted(allowed.dtypes)}")
    if not (isinstance(shape, list) and len(shape) == allowed.ndim
            and all(_is_int(d) and 0 <= d <= MAX_ARRAY_BYTES for d in shape)):
        raise ProtocolError(f"{cls.TYPE.value}: array '{name}' shape {shape!r} is invalid (rank {allowed.ndim}, "
                            f"sizes 0..{MAX_ARRAY_BYTES})")
    expected = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow, no allocation yet
    if expected > MAX_ARRAY_BYTES or len(buf) != expected:
        raise ProtocolError(f"{cls.TYPE.value}: array '{name}' has {len(buf)} bytes, shape {shape} of {dtype} "
                            f"needs {expected}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


def to_wire(msg: Message) -> bytes:
    """One ZeroMQ frame: a msgpack array of [header, buffer, ...] (binary, no copies of arrays as text)."""
    return msgpack.packb(encode(msg), use_bin_type=True)


def from_wire(data: bytes) -> Message:
    """Inverse of :func:`to_wire`, with the same validation as :func:`decode`."""
    if not isinstance(data, bytes):
        raise ProtocolError(f"a frame is bytes, got {type(data).__name__}")
    if len(data) > MAX_WIRE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes is too large (limit {MAX_WIRE_BYTES})")
    try:
        frames = msgpack.unpackb(data, raw=False, max_bin_len=MAX_ARRAY_BYTES, max_array_len=1 + MAX_ARRAYS)
    except Exception as exc:
        raise ProtocolError(f"frame is not a msgpack envelope ({type(exc).__name__})") from None
    if not isinstance(frames, list) or not all(isinstance(f, bytes) for f in frames):
        raise ProtocolError("frame must be a msgpack array of binary parts")
    return decode(frames)
