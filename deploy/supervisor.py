"""A small user-mode stand-in for ``systemctl``, for machines without a running systemd
(containers, CI). It is the test double at the service-manager boundary: the tests and
``vpp deploy --service-manager`` drive it exactly as they drive ``systemctl``.

    python -m vpp_edge.deploy.supervisor --unit-dir DIR --state-dir DIR VERB [UNIT ...]

Verbs: is-system-running, daemon-reload, enable, disable, start, stop, restart,
is-active, status. From a unit file it honours ExecStart, WorkingDirectory, Environment,
EnvironmentFile, User (when run as root), KillSignal, TimeoutStopSec, Restart
(no/on-failure/always), RestartSec, StartLimitBurst/StartLimitIntervalSec and the
LimitRTPRIO/LimitMEMLOCK/LimitNOFILE resource limits. Each started unit gets a monitor
process (its parent, which restarts it per Restart=); output goes to STATE/<unit>.log
instead of the journal. Not for production robots: use systemd there.

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

RLIMITS = {"LimitRTPRIO": resource.RLIMIT_RTPRIO, "LimitMEMLOCK": resource.RLIMIT_MEMLOCK,
           "LimitNOFILE": resource.RLIMIT_NOFILE}
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class UnitError(Exception):
    pass


def parse_unit(path: Path) -> dict[str, list[str]]:
    """Unit file -> {"Section.Key": [values in order]} (keys repeat, e.g. Environment)."""
    if not path.is_file():
        raise UnitError(f"Unit {path.name} not found in {path.parent}.")
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if sep:
            out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def _one(unit: dict[str, list[str]], key: str, default: str = "") -> str:
    return unit.get(key, [default])[-1]


def _seconds(text: str) -> float:
    text = text.strip()
    for suffix, scale in (("ms", 1e-3), ("min", 60.0), ("s", 1.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text) if text else 0.0


def _unescape(text: str) -> str:
    return text.replace("%%", "%").replace("$$", "$")


def service_env(unit: dict[str, list[str]]) -> dict[str, str]:
    import pwd

    env = dict(BASE_ENV)
    try:  # as systemd: the service user's HOME, USER, LOGNAME, SHELL
        pw = pwd.getpwnam(_one(unit, "Service.User")) if _one(unit, "Service.User") else pwd.getpwuid(os.geteuid())
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell)
    except KeyError:
        pass
    for path in unit.get("Service.EnvironmentFile", []):
        optional = path.startswith("-")
        path = path.lstrip("-")
        try:
            for line in Path(path).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#") and "=" in line:
                    k, _, v = line.partition("=")
                    env[k.strip()] = v.strip().strip('"')
        except OSError:
            if not optional:
                raise UnitError(f"EnvironmentFile {path} not readable") from None
    for value in unit.get("Service.Environment", []):
        for item in shlex.split(value):
            k, _, v = item.partition("=")
            env[k] = _unescape(v)
    return env


def _limits(unit: dict[str, list[str]]) -> tuple[list[tuple[int, int, int]], list[str]]:
    """(resource, soft, hard) to set in the service, and a note for each limit this process
    may not raise (no CAP_SYS_RESOURCE, e.g. in a container): that one is raised only as
    far as the current hard limit allows."""
    out, notes = [], []
    inf = resource.RLIM_INFINITY
    for key, res in RLIMITS.items():
        value = _one(unit, f"Service.{key}")
        if not value:
            continue
        n = inf if value == "infinity" else int(value)
        hard = resource.getrlimit(res)[1]
        fits = hard == inf or (n != inf and n <= hard)
        try:
            if not fits:  # probe: root with CAP_SYS_RESOURCE may raise the hard limit
                resource.setrlimit(res, resource.getrlimit(res)[:1] + (n,))
                resource.setrlimit(res, (resource.getrlimit(res)[0], hard))  # undo in the monitor
                fits = True
        except (ValueError, OSError):
            pass
        if fits:
            out.append((res, n, n))
        else:
            out.append((res, hard, hard))
            notes.append(f"{key}={value} not applied: hard limit here is {hard} and raising it is not allowed")
    return out, notes


class Supervisor:
    def __init__(self, unit_dir: Path, state_dir: Path):
        self.unit_dir, self.state = Path(unit_dir), Path(state_dir)
        self.state.mkdir(parents=True, exist_ok=True)

    # -- state files --------------------------------------------------------
    def _status_path(self, name: str) -> Path:
        return self.state / f"{name}.json"

    def status(self, name: str) -> dict:
        try:
            st = json.loads(self._status_path(name).read_text())
        except (OSError, ValueError):
            return {"state": "inactive"}
        if st.get("state") in ("active", "activating") and not _alive(st.get("monitor_pid")):
            st["state"] = "failed"  # the monitor died without recording a stop
        return st

    def _write_status(self, name: str, **fields) -> None:
        path = self._status_path(name)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(fields))
        tmp.replace(path)

    def _enabled(self) -> set[str]:
        try:
            return set(json.loads((self.state / "enabled.json").read_text()))
        except (OSError, ValueError):
            return set()

    def _set_enabled(self, names: set[str]) -> None:
        (self.state / "enabled.json").write_text(json.dumps(sorted(names)))

    # -- verbs --------------------------------------------------------------
    def start(self, name: str) -> None:
        parse_unit(self.unit_dir / name)  # fail now on a missing unit, as systemctl does
        if self.status(name)["state"] in ("active", "activating"):
            return
        (self.state / f"{name}.stop").unlink(missing_ok=True)
        log = open(self.state / f"{name}.log", "ab")
        monitor = subprocess.Popen(
            [sys.executable, "-m", "vpp_edge.deploy.supervisor", "--unit-dir", str(self.unit_dir),
             "--state-dir", str(self.state), "_monitor", name],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 10
        # Like systemd for Type=simple: done once the service was forked (whether it then
        # keeps running is for is-active to tell).
        while time.monotonic() < deadline:
            if self.status(name).get("monitor_pid") == monitor.pid or monitor.poll() is not None:
                return
            time.sleep(0.02)
        raise UnitError(f"Job for {name} did not start within 10 s")

    def stop(self, name: str) -> None:
        st = self.status(name)
        (self.state / f"{name}.stop").touch()
        if st["state"] not in ("active", "activating"):
            return
        unit = parse_unit(self.unit_dir / name)
        sig = signal.Signals[_one(unit, "Service.KillSignal", "SIGTERM")]
        timeout = _seconds(_one(unit, "Service.TimeoutStopSec", "10"))
        pid = st.get("pid")
        if pid and _alive(pid):
            _signal_group(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(st.get("monitor_pid")):
            time.sleep(0.05)
        if _alive(st.get("monitor_pid")):  # as systemd: SIGKILL after TimeoutStopSec
            if pid:
                _signal_group(pid, signal.SIGKILL)
            _signal_group(st["monitor_pid"], signal.SIGKILL)
            self._write_status(name, state="inactive", result="timeout")

    def is_active(self, name: str) -> str:
        return self.status(name)["state"]

    def status_text(self, name: str, lines: int = 15) -> str:
        st = self.status(name)
        enabled = "enabled" if name in self._enabled() else "disabled"
        head = (f"* {name} - {self.unit_dir / name} ({enabled})\n   Active: {st['state']}"
                f"{' pid ' + str(st['pid']) if st.get('pid') and st['state'] == 'active' else ''}"
                f"{' exit ' + str(st['exit']) if st.get('exit') is not None else ''}, restarts {st.get('restarts', 0)}")
        log = self.state / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-lines:] if log.is_file() else []
        return "\n".join([head, *tail])

    # -- the monitor: parent of the service, applies Restart= ----------------
    def monitor(self, name: str) -> int:
        unit = parse_unit(self.unit_dir / name)
        argv = shlex.split(_unescape(_one(unit, "Service.ExecStart")).lstrip("-@+!"))
        if not argv:
            raise UnitError(f"{name}: no ExecStart")
        cwd = _one(unit, "Service.WorkingDirectory") or "/"
        restart = _one(unit, "Service.Restart", "no")
        restart_s = _seconds(_one(unit, "Service.RestartSec", "0.1"))
        burst = int(_one(unit, "Unit.StartLimitBurst", "5"))
        interval = _seconds(_one(unit, "Unit.StartLimitIntervalSec", "10"))
        user = _one(unit, "Service.User") or None
        limits, notes = _limits(unit)
        stop_flag = self.state / f"{name}.stop"
        starts: list[float] = []
        restarts = 0
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stop goes through the flag + the service's signal
        while True:
            starts = [t for t in starts if time.monotonic() - t < interval] + [time.monotonic()]
            env = service_env(unit)

            def preexec(limits=limits) -> None:
                os.setsid()
                for res, soft, hard in limits:
                    try:
                        resource.setrlimit(res, (soft, hard))
                    except (ValueError, OSError):
                        pass  # reported in the log below

            run_as = user if user and os.geteuid() == 0 and user != _current_user() else None
            me = os.getpid()
            log = open(self.state / f"{name}.log", "ab")
            for note in notes:
                log.write(f"supervisor: {name}: {note}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, preexec_fn=preexec, user=run_as)
            except (OSError, subprocess.SubprocessError) as exc:
                log.write(f"{name}: failed to execute {argv[0]}: {exc}\n".encode())
                self._write_status(name, state="failed", result="exec", restarts=restarts, monitor_pid=me)
                return 0
            finally:
                log.close()
            self._write_status(name, state="active", pid=proc.pid, monitor_pid=me, restarts=restarts, since=time.time())
            code = proc.wait()
            if stop_flag.exists():
                self._write_status(name, state="inactive", exit=code, restarts=restarts, monitor_pid=me)
                return 0
            wanted = restart == "always" or (restart == "on-failure" and code != 0)
            if not wanted or len(starts) >= burst:
                self._write_status(name, state="failed" if code or wanted else "inactive", exit=code,
                                   restarts=restarts, monitor_pid=me,
                                   result="start-limit-hit" if wanted else "exit-code")
                return 0
            restarts += 1
            self._write_status(name, state="activating", exit=code, restarts=restarts, monitor_pid=me)
            time.sleep(restart_s)
            if stop_flag.exists():
                self._write_status(name, state="inactive", exit=code, restarts=restarts, monitor_pid=me)
                return 0


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _alive(pid: int | None) -> bool:
    """True for a running process (a zombie counts as gone)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vpp-supervisor", description=__doc__.split("\n\n")[0])
    p.add_argument("--unit-dir", type=Path, required=True)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("verb")
    p.add_argument("units", nargs="*")
    p.add_argument("--no-pager", action="store_true", help="accepted for systemctl compatibility")
    args = p.parse_intermixed_args(argv)  # `status --no-pager UNIT` as systemctl takes it
    sup = Supervisor(args.unit_dir, args.state_dir)
    try:
        if args.verb == "is-system-running":
            print("running")
            return 0
        if args.verb == "daemon-reload":
            return 0  # units are read at every start
        if args.verb in ("enable", "disable"):
            names = sup._enabled()
            for u in args.units:
                parse_unit(sup.unit_dir / u) if args.verb == "enable" else None
            names = names | set(args.units) if args.verb == "enable" else names - set(args.units)
            sup._set_enabled(names)
            return 0
        if args.verb == "_monitor":
            return sup.monitor(args.units[0])
        code = 0
        for u in args.units:
            if args.verb == "start":
                sup.start(u)
            elif args.verb == "stop":
                sup.stop(u)
            elif args.verb == "restart":
                sup.stop(u)
                sup.start(u)
            elif args.verb == "is-active":
                state = sup.is_active(u)
                print(state)
                code = code or (0 if state == "active" else 3)
            elif args.verb == "status":
                print(sup.status_text(u))
                code = code or (0 if sup.is_active(u) == "active" else 3)
            else:
                print(f"Unknown command verb {args.verb}.", file=sys.stderr)
                return 1
        return code
    except UnitError as exc:
        print(str(exc), file=sys.stderr)
        return 5


if __name__ == "__main__":
    sys.exit(main())
