"""systemd units for the runtime and the bridge, rendered from ``deploy/units/*.service.in``
(string.Template: ``${name}`` placeholders).

Every value that reaches a unit is checked first: a newline in a robot name or an
argument would start a directive of its own (``ExecStartPre=...`` run as the service
user), and ``%`` or ``$`` would be expanded by systemd.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from string import Template
from typing import Any

from .config import DeployConfigError

TEMPLATES = Path(__file__).with_name("units")
RUNTIME_UNIT = "vpp-runtime.service"
BRIDGE_UNIT = "vpp-bridge.service"
_PLAIN = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What each rendered value may be (whole match).
_VALUES = {
    "root": re.compile(r"/[A-Za-z0-9._+@/-]*"),  # absolute; no spaces, specifiers or variables
    "robot": re.compile(r"[A-Za-z0-9_-]+"),
    "user": re.compile(r"[a-z_][a-z0-9_-]{0,31}"),  # POSIX portable user names
    "rtprio": re.compile(r"[0-9]|[1-9][0-9]"),  # 0..99
    "memlock": re.compile(r"infinity|[0-9]+[KMG]?"),
    "nofile": re.compile(r"[0-9]+"),
}
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})|[0-9A-Fa-f:.]+")  # a host name, IPv4 or IPv6 address
_FOLDER = re.compile(r"/[A-Za-z0-9._+@/-]*")
LINK_DEFAULTS = {"bridge_host": "127.0.0.1", "bind": "127.0.0.1", "base_port": 5701}
PORT_SPAN = 5  # ports a bridge binds from base_port on (runtime/protocol.py)


def check_unit_values(values: dict[str, Any]) -> None:
    """Refuse a value that could change a unit's meaning, naming the setting."""
    for name, value in values.items():
        text = str(value)
        if not _VALUES[name].fullmatch(text):
            raise DeployConfigError(f"{name} {text!r} cannot go into a systemd unit: "
                                    f"it must match {_VALUES[name].pattern}")
    if ".." in str(values["root"]).split("/"):
        raise DeployConfigError(f"install_root {values['root']!r} must not contain '..'")


def exec_quote(arg: str) -> str:
    """One ExecStart argument as systemd parses it: specifiers (%) and variables ($)
    doubled, double quotes around anything with spaces or quotes."""
    if _CONTROL.search(arg):  # a newline would end the ExecStart line and begin a new directive
        raise DeployConfigError(f"command-line argument {arg!r} of a unit contains a control character")
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and _PLAIN.match(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it leaves the machine
        return False


def link_args(cfg: dict[str, Any], side: str) -> list[str]:
    """The link options of `vpp run` (``side`` "runtime") or `vpp bridge` ("bridge") from the
    ``link`` settings, checked here so that a unit never starts a link the process would
    refuse: an address beyond loopback needs CurveZMQ keys (and a bridge with keys the folder
    of the clients it admits) or ``insecure`` said on purpose. Nothing for the loopback defaults."""
    link = cfg["link"]
    host_key = "bridge_host" if side == "runtime" else "bind"
    host, port, keys, allow, insecure = (link[host_key], link["base_port"], link["keys"], link["allow"],
                                         link["insecure"])
    if not (isinstance(host, str) and _HOST.fullmatch(host)):
        raise DeployConfigError(f"link.{host_key} {host!r} is not a host name or address")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535 - PORT_SPAN:
        raise DeployConfigError(f"link.base_port must be a port from 1 to {65535 - PORT_SPAN}, got {port!r}")
    for name, folder in (("keys", keys), ("allow", allow)):
        if folder is not None and not (isinstance(folder, str) and _FOLDER.fullmatch(folder)
                                       and ".." not in folder.split("/")):
            raise DeployConfigError(f"link.{name} must be an absolute folder on the target without '..' or spaces, "
                                    f"got {folder!r}")
    if not isinstance(insecure, bool):
        raise DeployConfigError(f"link.insecure must be true or false, got {insecure!r}")
    if not _loopback(host) and keys is None and not insecure:
        raise DeployConfigError(f"link.{host_key} {host} is beyond loopback: set link.keys (CurveZMQ keys made by "
                                "'vpp keys') or, on an isolated network only, link.insecure: true")
    if side == "bridge" and keys is not None and allow is None:
        raise DeployConfigError("a bridge with CurveZMQ keys admits only listed clients: set link.allow (the folder "
                                "of the runtimes' public keys)")
    argv = [] if host == LINK_DEFAULTS[host_key] else ["--bridge-host" if side == "runtime" else "--host", host]
    argv += [] if port == LINK_DEFAULTS["base_port"] else ["--base-port", str(port)]
    argv += ["--keys", keys] if keys is not None else []
    argv += ["--allow", allow] if side == "bridge" and allow is not None else []
    return argv + (["--insecure"] if insecure else [])


def runtime_config(cfg: dict[str, Any]):
    """The :class:`~vpp_edge.runtime.config.RuntimeConfig` the unit runs, rendered from the deploy
    settings and checked here, on the workstation, before anything reaches the robot (the
    artifact is relative to the WorkingDirectory, i.e. the release `current` pointed to at start)."""
    from vpp_edge.errors import ConfigError
    from vpp_edge.runtime.config import CameraConfig, RuntimeConfig, SmoothingConfig

    rt = cfg["runtime"]
    threads = rt.get("threads") or 0
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise DeployConfigError(f"runtime.threads must be a non-negative integer, got {threads!r}")
    kind, _, devices = str(rt.get("cameras") or "replay").partition(":")
    try:
        config = RuntimeConfig(Path("artifact"), rt["backend"], rt.get("precision") or None, threads,
                               robot=cfg["robot"], instruction=rt.get("instruction") or None,
                               cameras=CameraConfig(kind, devices), smoothing=SmoothingConfig(rt["smoothing"]),
                               duration_s=float("inf"), rt_priority=rt["rt_priority"])
    except ConfigError as exc:
        raise DeployConfigError(f"runtime settings: {exc}") from None
    if not config.cameras.replays and not config.instruction:  # a robot never runs a demo's task
        raise DeployConfigError("runtime.instruction: the task the robot runs (live cameras have no episode to "
                                "take one from)")
    return config


def runtime_command(cfg: dict[str, Any]) -> list[str]:
    """`vpp run` as the unit starts it: :func:`runtime_config` as flags (paths on the target)."""
    root, rc = cfg["install_root"], runtime_config(cfg)
    argv = [f"{root}/current/bin/vpp", "run", "--artifact", str(rc.artifact), "--robot", rc.robot,
            "--backend", rc.backend, "--duration", "inf", "--smoothing", rc.smoothing.policy,
            "--rt-priority", str(rc.rt_priority), "--log", f"{root}/logs/runtime.jsonl", "--quiet"]
    if cfg["runtime"].get("cameras"):
        argv += ["--cameras", rc.cameras.spec(())]
    if rc.precision:
        argv += ["--precision", rc.precision]
    if rc.threads:
        argv += ["--threads", str(rc.threads)]
    if rc.instruction:
        argv += ["--instruction", rc.instruction]
    return argv + link_args(cfg, "runtime") + [str(a) for a in cfg["runtime"].get("args", [])]


def bridge_command(cfg: dict[str, Any]) -> list[str]:
    """`vpp bridge` as the unit starts it, its servo thread's priority and CPUs included."""
    servo = cfg["bridge_servo"]
    priority, cpus = servo["rt_priority"], servo["cpus"]
    if not (isinstance(priority, int) and 0 <= priority <= 99):
        raise DeployConfigError(f"bridge_servo.rt_priority must be 0-99, got {priority!r}")
    if not (isinstance(cpus, list) and all(isinstance(c, int) and c >= 0 for c in cpus)):
        raise DeployConfigError(f"bridge_servo.cpus must be a list of CPU numbers, got {cpus!r}")
    argv = [f"{cfg['install_root']}/current/bin/vpp", "bridge", "--robot", cfg["robot"], "--rt-priority", str(priority)]
    return argv + (["--cpus", ",".join(map(str, cpus))] if cpus else []) + link_args(cfg, "bridge")


def render_units(cfg: dict[str, Any], user: str) -> dict[str, str]:
    """{unit file name: content} for the units this configuration runs."""
    common = {"root": cfg["install_root"], "robot": cfg["robot"], "user": user,
              "rtprio": cfg["limits"]["rtprio"], "memlock": cfg["limits"]["memlock"],
              "nofile": cfg["limits"]["nofile"]}
    check_unit_values(common)
    bridge = bool(cfg["bridge"])
    out = {}
    if bridge:
        out[BRIDGE_UNIT] = _render("vpp-bridge.service.in", common,
                                   exec_start=" ".join(map(exec_quote, bridge_command(cfg))))
    out[RUNTIME_UNIT] = _render("vpp-runtime.service.in", common,
                                exec_start=" ".join(map(exec_quote, runtime_command(cfg))),
                                after=f" {BRIDGE_UNIT}" if bridge else "", wants=f" {BRIDGE_UNIT}" if bridge else "")
    return out


def _render(template: str, values: dict[str, Any], **more: Any) -> str:
    return Template((TEMPLATES / template).read_text()).substitute({**values, **more})
