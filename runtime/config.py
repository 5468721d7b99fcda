"""The runtime config: everything ``vpp run`` needs to know, as one frozen value.

One :class:`RuntimeConfig` describes a run: the artifact and how to run it (backend,
precision, threads, seed), the robot (its description's name), the cameras (a source kind of
the camera registry and a device per view, bound by the preset's view names), where the
instruction comes from, chunk smoothing and its parameters, the bridge link, duration and
real-time priority. It is read from YAML (``vpp calibrate`` writes one, ``vpp deploy``
renders one, ``vpp run --runtime-config FILE`` runs one) and overridden on the command line
with ``--set key=value`` (dotted keys, YAML values, as LeRobot's draccus configs take them)::

    format: vpp-edge-runtime-config
    format_version: 2            # 1: the files vpp calibrate wrote before (a subset) still load
    artifact: artifacts/tiny     # relative paths are relative to this file
    backend: auto                # auto | a backend of the engine registry
    precision: null              # null: the backend's default (or the artifact's cpu_default with auto)
    threads: 0
    robot: sim
    instruction: null            # null: only a replayed episode may supply it (said at start)
    cameras: {source: replay, devices: {static: /dev/video0, gripper: /dev/video2}, fps: null, ...}
    smoothing: {policy: crossfade, crossfade_steps: 3, ensemble_m: 0.1, margin_steps: 2, action_dt: null}
    bridge: {host: 127.0.0.1, base_port: null, keys: null, insecure: false}
    duration_s: 10.0
    rt_priority: 0
    knobs/measured/sweep: {...}  # informational (vpp calibrate's measurement), not used to run

Plain frozen dataclasses checked by :mod:`vpp_edge.config_schema` (strict keys with a
did-you-mean, one-line errors), not pydantic or msgspec: the robot side runs on Python 3.10
with a small dependency budget, and the checks needed here (keys, a few types and ranges)
are a few lines; neither library would remove more code than it adds to the robot's wheels.
numpy-free, torch-free: PyYAML and the standard library.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from vpp_edge.config_schema import merge, read_yaml
from vpp_edge.errors import ConfigError

from .targets import TARGET_STREAMS

FORMAT_NAME = "vpp-edge-runtime-config"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
INFO_KEYS = ("knobs", "measured", "sweep")  # informational sections (vpp calibrate's measurement)
DEFAULT_ARTIFACT = "artifacts/tiny"


@dataclass(frozen=True)
class CameraConfig:
    """``source``: a kind of the camera registry (runtime/cameras/factory.py). ``devices``: one
    per view, either ``{view name: device}`` (bound by the preset's view names) or the
    spec's text after ``kind:`` (devices in view order, comma-separated, or an endpoint)."""

    source: str = "replay"
    devices: Any = ""  # dict[str, str | int] | str
    fps: float | None = None  # replay rate (default: the recorded rate)
    dali_device: str = "auto"  # auto | gpu | cpu
    episode: str | None = None  # the episode a replay source plays (default: the demo episode)

    @property
    def replays(self) -> bool:
        return self.source.startswith("replay")

    def spec(self, view_names: Iterable[str]) -> str:
        """The camera spec (``kind[:devices]``) for a model with these views."""
        from vpp_edge.runtime.cameras.factory import devices_by_view

        devices = self.devices
        if isinstance(devices, Mapping):
            devices = devices_by_view(devices, list(view_names))
        return f"{self.source}:{devices}" if devices else self.source


@dataclass(frozen=True)
class SmoothingConfig:
    """How chunks merge into the plan (runtime/chunking.py's registry) and when to infer."""

    policy: str = "crossfade"
    crossfade_steps: int = 3  # crossfade: ticks over which a new chunk fades in (0 acts as 1)
    ensemble_m: float = 0.1  # ensemble: a tick's i-th vote, oldest first, weighs exp(-m * i)
    margin_steps: int = 2  # infer when the plan would run dry within p95 latency + this many ticks
    action_dt: float | None = None  # spacing of the chunk's actions (default: the control period)


@dataclass(frozen=True)
class LinkConfig:
    """Where the bridge is and how the link is secured (loopback needs nothing)."""

    host: str = "127.0.0.1"
    base_port: int | None = None  # None: $VPP_BASE_PORT, else 5701
    keys: str | None = None  # CurveZMQ keys folder (runtime.key_secret, bridge.key)
    insecure: bool = False  # a plaintext link beyond loopback (an isolated network only)

    def port(self) -> int:
        """The bridge's base port: ``base_port``, else ``$VPP_BASE_PORT``, else 5701."""
        from .protocol import base_port_from_env

        return self.base_port if self.base_port is not None else base_port_from_env()


@dataclass(frozen=True)
class RuntimeConfig:
    artifact: Path = Path(DEFAULT_ARTIFACT)
    backend: str = "auto"
    precision: str | None = None
    threads: int = 0  # CPU inference threads (0: the backend's choice)
    info: dict[str, Any] = field(default_factory=dict)  # knobs, measured, sweep: not used to run
    seed: int = 0
    robot: str = "sim"  # a robot description's name (vpp_edge/robots) or a YAML path
    instruction: str | None = None
    cameras: CameraConfig = CameraConfig()
    smoothing: SmoothingConfig = SmoothingConfig()
    bridge: LinkConfig = LinkConfig()
    duration_s: float = 10.0  # inf: until stopped (a deployed unit)
    rt_priority: int = 0  # SCHED_FIFO priority of the control thread (0: off)
    # How targets reach the bridge: timestamped absolute waypoints its servo loop executes on
    # its own clock (the default), or this tick's action only (the older stream, kept to compare).
    target_stream: str = "waypoints"
    # Measurement only (0 on a robot): every inference takes this much longer, as on a slower
    # engine, to compare chunk smoothing closed loop at Jetson-class latencies on a fast machine.
    inject_latency_ms: float = 0.0

    def __post_init__(self) -> None:
        check(self)

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The YAML form (``format`` first; the artifact relative to ``relative_to`` when below it)."""
        artifact = Path(self.artifact)
        if relative_to is not None:  # read back relative to the file: below it, relative; else absolute
            try:
                artifact = artifact.resolve().relative_to(Path(relative_to).resolve())
            except ValueError:
                artifact = artifact.resolve()
        data = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **_plain(self)}
        data["artifact"] = str(artifact)
        data.pop("info")
        return {**data, **self.info}

    def replace(self, **changes: Any) -> "RuntimeConfig":
        return dataclasses.replace(self, **changes)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value: what ``vpp run`` prints at start, and the keys ``--set`` takes."""
        return dict(_flatten({k: v for k, v in self.to_dict().items() if k not in ("format", "format_version",
                                                                                   *INFO_KEYS)}))


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, Mapping) and not (prefix + key == "cameras.devices"):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _defaults() -> dict[str, Any]:
    """The default config as a plain nested mapping (the schema ``merge`` checks keys against)."""
    data = _plain(RuntimeConfig())
    data.pop("info")
    data["cameras"]["devices"] = None  # a value (text or a mapping by view name), not a section
    return data


def _number(value: Any, key: str, kind: type, low: float = 0.0, none: bool = False, inf: bool = False) -> Any:
    if value is None and none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer() and math.isfinite(value)
    if not ok or value < low or (math.isinf(value) and not inf) or math.isnan(value):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"runtime config: '{key}' must be {what} >= {low:g}{' or null' if none else ''}, "
                          f"got {value!r}")
    return kind(value)


def _text(value: Any, key: str, none: bool = False) -> Any:
    if value is None and none:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"runtime config: '{key}' must be a non-empty text{' or null' if none else ''}, "
                          f"got {value!r}")
    return value


def check(config: RuntimeConfig) -> None:
    """Types and ranges of every value (names of registries are checked where they are looked
    up, when the runtime is built: a plug-in may register its kind after this file is read)."""
    _text(config.backend, "backend")
    _text(config.precision, "precision", none=True)
    _number(config.threads, "threads", int)
    _number(config.seed, "seed", int, low=-(2**63))
    _text(config.robot, "robot")
    _text(config.instruction, "instruction", none=True)
    _number(config.duration_s, "duration_s", float, inf=True)
    _number(config.rt_priority, "rt_priority", int)
    _number(config.inject_latency_ms, "inject_latency_ms", float)
    if config.rt_priority > 99:
        raise ConfigError(f"runtime config: 'rt_priority' is a SCHED_FIFO priority 0-99, got {config.rt_priority}")
    if config.target_stream not in TARGET_STREAMS:
        raise ConfigError(f"runtime config: 'target_stream' is one of {', '.join(TARGET_STREAMS)}, "
                          f"got {config.target_stream!r}")
    cams = config.cameras
    _text(cams.source, "cameras.source")
    if not isinstance(cams.devices, (str, Mapping)):
        raise ConfigError("runtime config: 'cameras.devices' takes {view name: device} or the devices in view order "
                          f"as text, got {cams.devices!r}")
    _number(cams.fps, "cameras.fps", float, none=True)
    if cams.dali_device not in ("auto", "gpu", "cpu"):
        raise ConfigError(f"runtime config: 'cameras.dali_device' is auto, gpu or cpu, got {cams.dali_device!r}")
    _text(cams.episode, "cameras.episode", none=True)
    s = config.smoothing
    _text(s.policy, "smoothing.policy")
    _number(s.crossfade_steps, "smoothing.crossfade_steps", int)
    _number(s.ensemble_m, "smoothing.ensemble_m", float)
    _number(s.margin_steps, "smoothing.margin_steps", int)
    _number(s.action_dt, "smoothing.action_dt", float, none=True)
    if s.action_dt == 0:
        raise ConfigError("runtime config: 'smoothing.action_dt' must be positive (or null: the control period)")
    b = config.bridge
    _text(b.host, "bridge.host")
    if b.base_port is not None and (_number(b.base_port, "bridge.base_port", int, low=1) > 65535 - 4):
        raise ConfigError(f"runtime config: 'bridge.base_port' must leave room for the four ports after it, "
                          f"got {b.base_port}")
    _text(b.keys, "bridge.keys", none=True)
    if not isinstance(b.insecure, bool):
        raise ConfigError(f"runtime config: 'bridge.insecure' is true or false, got {b.insecure!r}")


def config_from_dict(data: Mapping[str, Any], where: str = "runtime config", base: Path | None = None) -> RuntimeConfig:
    """A checked config from its YAML form (any subset of the keys; the rest default).
    ``format``/``format_version`` are checked when present; ``base``: the folder relative
    artifact and episode paths are relative to (the file's)."""
    data = dict(data)
    fmt, version = data.pop("format", FORMAT_NAME), data.pop("format_version", FORMAT_VERSION)
    if fmt != FORMAT_NAME:
        raise ConfigError(f"{where}: not a runtime config (expected 'format: {FORMAT_NAME}')")
    if version not in READS_VERSIONS:
        raise ConfigError(f"{where}: format_version {version!r} is not supported (this vpp-edge reads "
                          f"{', '.join(map(str, READS_VERSIONS))})")
    info = {k: data.pop(k) for k in INFO_KEYS if k in data}
    devices = None  # a value that may be a mapping (by view name): kept out of the key-by-key merge
    if isinstance(data.get("cameras"), Mapping) and "devices" in data["cameras"]:
        data["cameras"] = dict(data["cameras"])
        devices = data["cameras"].pop("devices")
    try:
        values = merge(_defaults(), data, "key")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    artifact = Path(_text(values.pop("artifact"), "artifact"))
    cams = dict(values.pop("cameras"))
    cams["devices"] = "" if devices is None else devices
    if isinstance(cams["devices"], (int, float)) and not isinstance(cams["devices"], bool):
        cams["devices"] = str(cams["devices"])  # one V4L2 index
    if base is not None:
        artifact = artifact if artifact.is_absolute() else base / artifact
        if cams["episode"] and not Path(cams["episode"]).is_absolute():
            cams["episode"] = str(base / cams["episode"])
    try:
        return RuntimeConfig(artifact=artifact, info=info, cameras=CameraConfig(**cams),
                             smoothing=SmoothingConfig(**values.pop("smoothing")),
                             bridge=LinkConfig(**values.pop("bridge")), **values)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("runtime config", where, 1)) from None


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``["smoothing.policy=ensemble", "threads=2"]`` -> the nested mapping they set (values
    are YAML: ``2`` an integer, ``null`` none, ``{static: 0, gripper: 2}`` a mapping)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set smoothing.policy=ensemble")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
        node = out
        *parents, last = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: '{part}' is set to a value and a section at once")
        node[last] = value
    return out


def deep_update(base: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``layer`` merged in key by key (nested sections merge; values replace)."""
    out = dict(base)
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "devices":
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def with_overrides(config: RuntimeConfig, pairs: Iterable[str]) -> RuntimeConfig:
    """``config`` with ``--set key=value`` overrides applied (unknown keys: an error naming the closest)."""
    pairs = list(pairs)
    if not pairs:
        return config
    data = deep_update(config.to_dict(), parse_overrides(pairs))
    return config_from_dict(data, "--set")


def load_runtime_config(path: str | Path, overrides: Iterable[str] = ()) -> RuntimeConfig:
    """Read a runtime config file (relative paths in it are relative to its folder), then apply
    ``--set`` overrides. The artifact is checked when the runtime is built, not here."""
    path = Path(path)
    data = read_yaml(path, "runtime config")
    if data.get("format") != FORMAT_NAME:
        raise ConfigError(f"{path}: not a runtime config (expected 'format: {FORMAT_NAME}')")
    return with_overrides(config_from_dict(data, str(path), base=path.parent), overrides)


def write_runtime_config(path: str | Path, config: RuntimeConfig, header: str = "") -> Path:
    """Write ``config`` as YAML, atomically; the artifact path is stored relative to the file's
    folder when it lies below it (so the folder can be moved or copied to the robot whole)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = header or f"# A vpp-edge runtime config: run it with 'vpp run --runtime-config {path.name}'.\n"
    text = header + yaml.safe_dump(config.to_dict(relative_to=path.parent), sort_keys=False)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
