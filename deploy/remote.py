"""The deployment agent that runs on the target, inside an uploaded release:

    <root>/releases/<id>/bin/vpp-agent STEP

Each step is one SSH call from ``vpp deploy`` and prints what it does and finds. Exit 0
on success, 1 with an ``error:`` line on failure. The release it belongs to is the folder
it was shipped in; its settings are ``config/deploy.json`` of that release, so a rollback
runs the previous release's own agent with the previous release's own settings.

Target layout::

    <root>/releases/<id>/   verified bundles (code/, artifact/, units/, config/, bin/)
    <root>/current          -> releases/<id>, switched atomically (rename of a symlink)
    <root>/previous         -> the release that was current before
    <root>/state.json       the last deployment that finished (id, time)
    <root>/cache/           TensorRT timing cache, kept across releases
    <root>/logs/            runtime JSONL log, deploy.jsonl (history)

Standard library only: it runs before the robot's Python environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vpp_edge.deploy import checks
from vpp_edge.deploy.checksums import BundleError, verify_tree
from vpp_edge.deploy.wheels import normalize, read_pins

RELEASE = Path(__file__).resolve().parents[3]  # <release>/code/vpp_edge/deploy/remote.py
ALL_UNITS = ("vpp-bridge.service", "vpp-runtime.service")  # start order; stopped in reverse
EXIT_NO_TENSORRT = 3  # `vpp build-engines` exit code when TensorRT is missing


class StepFailed(Exception):
    pass


def say(msg: str = "") -> None:
    print(msg, flush=True)


class Agent:
    def __init__(self, release: Path):
        self.release = release
        try:
            self.cfg = json.loads((release / "config" / "deploy.json").read_text())
        except (OSError, ValueError) as exc:
            raise StepFailed(f"{release}/config/deploy.json: cannot read ({exc})") from None
        self.root = Path(self.cfg["install_root"])
        # --allow-cpu-fallback: a profile's TensorRT requirement becomes a warning
        self.gpu_required = bool(self.cfg["profile"].get("require_tensorrt")) and not self.cfg.get("allow_cpu_fallback")
        self.profile = {**self.cfg["profile"], "require_tensorrt": self.gpu_required}
        self.id = release.name
        self.python = self.cfg["python"] or str(self.root / "venv" / "bin" / "python")
        self.sm = shlex.split(self.cfg["service_manager"])
        self.unit_dir = Path(self.cfg["unit_dir"])
        self.units = list(self.cfg["units"])
        sudo = self.cfg.get("sudo", "auto")
        not_root = os.geteuid() != 0
        self.sudo_sm = sudo == "always" or (sudo == "auto" and not_root and Path(self.sm[0]).name == "systemctl")
        self.sudo_units = sudo == "always" or (sudo == "auto" and not_root and not os.access(self._probe(), os.W_OK))

    def _probe(self) -> Path:
        p = self.unit_dir
        while not p.exists():
            p = p.parent
        return p

    # -- helpers -------------------------------------------------------------
    def _env(self, code: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if code:
            env["PYTHONPATH"] = str(self.release / "code")
            env["PYTHONSAFEPATH"] = "1"
        return env

    def _sm(self, *args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
        argv = (["sudo", "-n"] if self.sudo_sm else []) + self.sm + list(args)
        proc = subprocess.run(argv, capture_output=True, text=True, env=self._env(False),
                              timeout=self.cfg["timeouts"]["service"])
        if not quiet:
            say(f"  $ {shlex.join(argv)}" + (f"  [exit {proc.returncode}]" if proc.returncode else ""))
        if check and proc.returncode != 0:
            detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
            if self.sudo_sm and "password" in proc.stderr:
                detail.append("the deploy user needs passwordless sudo for systemctl (or deploy as root)")
            raise StepFailed(f"{shlex.join(argv)} failed: {' | '.join(detail)}")
        return proc

    def _vpp(self, *args: str, timeout: float) -> int:
        """Run `vpp ARGS` with this release's code in the runtime Python; output streams through."""
        argv = [self.python, "-m", "vpp_edge.cli", *args]
        say(f"  $ {shlex.join(argv)}")
        try:
            return subprocess.run(argv, env=self._env(True), timeout=timeout, cwd=self.release).returncode
        except FileNotFoundError:
            raise StepFailed(f"{self.python}: no such Python on the target") from None
        except subprocess.TimeoutExpired:
            raise StepFailed(f"vpp {args[0]} did not finish within {timeout:.0f} s") from None

    def _link(self, name: str, target: str) -> None:
        """Point <root>/<name> at ``target`` atomically (new symlink renamed over the old)."""
        link = self.root / name
        tmp = self.root / f".{name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)

    def _current(self) -> str | None:
        try:
            return Path(os.readlink(self.root / "current")).name
        except OSError:
            return None

    def _log(self, **event) -> None:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        event = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "release": self.id, **event}
        with open(logs / "deploy.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    # -- steps ---------------------------------------------------------------
    def verify(self) -> None:
        try:
            n, size = verify_tree(self.release, ignore=("artifact/engines/",))
        except BundleError as exc:
            raise StepFailed(str(exc)) from None
        say(f"  {n} files, {size / 2**20:.1f} MiB match BUNDLE.json (bundle {self.id})")

    def check(self) -> None:
        profile = self.profile
        say(f"  profile '{profile.get('name')}'" + (" (--allow-cpu-fallback: TensorRT optional)"
                                                    if self.cfg.get("allow_cpu_fallback") else ""))
        python = self.python if Path(self.python).exists() or self.cfg["python"] else sys.executable
        results = checks.run_checks(profile, python, self.root, (["sudo", "-n"] if self.sudo_sm else []) + self.sm)
        for r in results:
            say("  " + r.line())
        failed = [r for r in results if r.failed]
        if failed:
            raise StepFailed("; ".join(f"{r.name}: {r.found}" for r in failed))

    def env(self) -> None:
        """The runtime's Python: the configured one as it is, or a venv with requirements-robot.txt
        made from this agent's Python (the one that sees the system's TensorRT bindings), with
        --system-site-packages; then TensorRT and OpenCV are checked inside it.

        OpenCV (a profile's ``opencv``): the system's cv2, seen through --system-site-packages,
        when it imports and has GStreamer (JetPack's: hardware JPEG decode); the lock's
        fallback wheel (opencv-python-headless, in the wheelhouse) is installed only otherwise,
        and also when the system's cv2 does not import inside the venv after all."""
        opencv = self.cfg["profile"].get("opencv") or {}
        if not self.cfg["python"]:
            venv = self.root / "venv"
            requirements = self.release / "requirements-robot.txt"
            constraints = self.release / "constraints.txt"
            offline = bool(self.cfg.get("offline"))
            system_cv2, why = checks.system_cv2_usable(opencv, checks.opencv_facts(sys.executable)) \
                if opencv else (False, "")
            if opencv:
                say(f"  OpenCV: {'the system' if system_cv2 else 'the wheel'}'s cv2 ({why})")
            def digest(system: bool) -> str:  # which cv2 the venv uses is part of what it holds
                return hashlib.sha256(requirements.read_bytes() + constraints.read_bytes()
                                      + f"system-cv2={system}".encode()).hexdigest()

            stamp = venv / ".requirements.sha256"
            stale = venv_mismatch(venv)
            if stale:
                say(f"  {venv}: {stale}: made again")
                shutil.rmtree(venv)
            if not (venv / "bin" / "python").exists():
                self._run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], "service",
                          hint=f"on Debian/Ubuntu: sudo apt-get install python{sys.version_info[0]}.{sys.version_info[1]}-venv")
            if not stamp.is_file() or stamp.read_text().strip() != digest(system_cv2):
                wanted = requirements
                if system_cv2:  # the fallback wheel would shadow the system's cv2 (no GStreamer)
                    wanted = venv / "requirements-robot.txt"
                    wanted.write_text(without(requirements.read_text(), opencv["fallback"]))
                    say(f"  {opencv['fallback']} left out of the venv: the system's cv2 is used")
                self._pip_install(venv, ["-r", str(wanted)], offline)
                if system_cv2:  # a previous release may have installed it
                    self._run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "--disable-pip-version-check",
                               "--yes", "--quiet", opencv["fallback"]], "pip")
                stamp.write_text(digest(system_cv2) + "\n")
            else:
                say(f"  {venv}: requirements unchanged")
            if system_cv2 and not self._verify_system_cv2(venv, opencv, offline):
                stamp.write_text(digest(False) + "\n")  # the venv holds the wheel: the next deployment tries again
        else:
            say(f"  using {self.python} as it is (--python): nothing installed")
        result = checks.import_check(self.python, self.cfg["robot_modules"])
        say("  " + result.line())
        if result.failed:
            raise StepFailed(result.found)
        say("  " + checks.check_opencv(self.cfg["profile"], self.python).line())  # the cv2 the runtime imports
        gpu = checks.check_tensorrt(self.profile, self.python)  # in the venv, now that it exists
        say("  " + gpu.line())
        if gpu.failed:
            raise StepFailed(f"TensorRT in the runtime's Python: {gpu.found}")

    def _pip_install(self, venv: Path, args: list[str], offline: bool) -> None:
        """pip install into the venv with the bundle's constraints: from the wheelhouse (offline)
        or the package index."""
        source = ["--no-index", "--find-links", str(self.release / "wheelhouse")] if offline else []
        self._run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", *source,
                   *args, "-c", str(self.release / "constraints.txt")], "pip",
                  hint="offline, from the bundle's wheelhouse: a wheel missing for this Python/platform?"
                  if offline else "")

    def _verify_system_cv2(self, venv: Path, opencv: dict, offline: bool) -> bool:
        """Whether the system's cv2 imports inside the venv too (its numpy is the lock's, not
        the system's); if not, the fallback wheel goes in, from the wheelhouse, saying why."""
        facts = checks.opencv_facts(str(venv / "bin" / "python"))
        ok, why = checks.system_cv2_usable(opencv, facts)
        if ok:
            return True
        pin = read_pins((self.release / "constraints.txt").read_text()).get(normalize(opencv["fallback"]),
                                                                          opencv["fallback"])
        say(f"  OpenCV: the system's cv2 is not usable in the venv ({why}): installing {pin}")
        self._pip_install(venv, [pin], offline)
        return False

    def _run(self, argv: list[str], timeout_key: str, hint: str = "") -> None:
        say(f"  $ {shlex.join(argv)}")
        code = subprocess.run(argv, env=self._env(False), timeout=self.cfg["timeouts"][timeout_key]).returncode
        if code:
            raise StepFailed(f"{shlex.join(argv)} exited with {code}" + (f" ({hint})" if hint else ""))

    def stop(self) -> None:
        for unit in reversed(ALL_UNITS):
            if (self.unit_dir / unit).exists():
                self._sm("stop", unit, check=False)

    def build_engines(self) -> None:
        eng = self.cfg["engines"]
        artifact = self.release / "artifact"
        cache = self.root / "cache" / "timing.cache"
        local_cache = artifact / "engines" / "timing.cache"
        if cache.is_file():
            local_cache.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache, local_cache)
            say(f"  timing cache: {cache} ({cache.stat().st_size} bytes)")
        code = self._vpp("build-engines", "--artifact", str(artifact), "--precisions", ",".join(eng["precisions"]),
                         "--workspace-gb", str(eng["workspace_gb"]), timeout=self.cfg["timeouts"]["build_engines"])
        if code == EXIT_NO_TENSORRT:
            if self.gpu_required:
                raise StepFailed(f"TensorRT is not importable by {self.python}: no engines, no GPU path; profile "
                                 f"'{self.profile.get('name')}' requires it (deploy with --allow-cpu-fallback to run "
                                 "ONNX Runtime on the CPU instead)")
            say("  TensorRT not available on the target: no engines built; the runtime falls back to "
                "ONNX Runtime on the artifact's ONNX graphs")
            return
        if code:
            raise StepFailed(f"vpp build-engines exited with {code}")
        if local_cache.is_file():
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            shutil.copyfile(local_cache, tmp)
            tmp.replace(cache)
            say(f"  timing cache saved to {cache}")

    def selftest(self) -> None:
        st = self.cfg["selftest"]
        args = ["doctor", "--artifact", str(self.release / "artifact"), "--selftest", "--backend", st["backend"],
                "--runs", str(st["runs"])]
        if st.get("precision"):
            args += ["--precision", st["precision"]]
        code = self._vpp(*args, timeout=self.cfg["timeouts"]["selftest"])
        if code:
            raise StepFailed(f"self-test failed (vpp doctor --selftest exited with {code})")

    def install_units(self) -> None:
        if not self.sudo_units:
            self.unit_dir.mkdir(parents=True, exist_ok=True)
        for unit in self.units:
            src, dest = self.release / "units" / unit, self.unit_dir / unit
            if dest.is_file() and dest.read_bytes() == src.read_bytes():
                say(f"  {dest}: unchanged")
                continue
            if self.sudo_units:
                self._run(["sudo", "-n", "install", "-m", "0644", str(src), str(dest)], "service")
            else:
                tmp = dest.with_name(f".{unit}.tmp")
                shutil.copyfile(src, tmp)
                tmp.chmod(0o644)
                tmp.replace(dest)
            say(f"  installed {dest}")
        for unit in ALL_UNITS:  # a unit this release does not run (bridge disabled) must not run
            if unit not in self.units and (self.unit_dir / unit).exists():
                self._sm("stop", unit, check=False)
                self._sm("disable", unit, check=False)
        self._sm("daemon-reload")
        self._sm("enable", *self.units)

    def switch(self) -> None:
        old = self._current()
        (self.root / "releases").mkdir(parents=True, exist_ok=True)
        if old and old != self.id:
            self._link("previous", f"releases/{old}")
        self._link("current", f"releases/{self.id}")
        say(f"  current: {old or '(none)'} -> {self.id}")

    def start(self) -> None:
        for unit in ALL_UNITS:
            if unit in self.units:
                self._sm("restart", unit)

    def health(self) -> None:
        """Every unit stays active through the settle window (a crash-looping service shows
        'activating' or 'failed' at some poll)."""
        settle = float(self.cfg["health"]["settle_s"])
        end = time.monotonic() + settle
        while True:
            for unit in self.units:
                state = self._sm("is-active", unit, check=False, quiet=True).stdout.strip() or "unknown"
                if state != "active":
                    status = self._sm("status", "--no-pager", unit, check=False, quiet=True)
                    text = (status.stdout + status.stderr).strip()
                    say("\n".join("  | " + line for line in text.splitlines()[-12:]))
                    raise StepFailed(f"{unit} is {state}, not active")
            if time.monotonic() >= end:
                break
            time.sleep(0.25)
        say(f"  {', '.join(self.units)} active for {settle:g} s")

    def finish(self) -> None:
        state = {"current": self.id, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = self.root / ".state.json.tmp"
        tmp.write_text(json.dumps(state) + "\n")
        tmp.replace(self.root / "state.json")
        self._log(result="deployed")
        self.prune()

    def prune(self) -> None:
        keep = int(self.cfg["keep_releases"])
        releases = sorted((p for p in (self.root / "releases").iterdir() if p.is_dir()),
                          key=lambda p: p.stat().st_mtime, reverse=True)
        pinned = {self._current()}
        try:
            pinned.add(Path(os.readlink(self.root / "previous")).name)
        except OSError:
            pass
        for old in releases[keep:]:
            if old.name not in pinned:
                shutil.rmtree(old, ignore_errors=True)
                say(f"  removed old release {old.name}")

    # -- rollback --------------------------------------------------------------
    def reactivate(self, failed: str | None) -> None:
        """Make this (previous, known-good) release current again and restart its units."""
        say(f"  rolling back to {self.id}" + (f" (from failed {failed})" if failed else ""))
        self.stop()
        self.switch()
        self.install_units()
        self.start()
        self.health()
        self._log(result="rolled-back", failed=failed)

    def deactivate(self) -> None:
        """First deployment failed, nothing to go back to: stop the units, unlink current."""
        self.stop()
        if self._current() == self.id:
            (self.root / "current").unlink()
        self._log(result="failed-no-previous")
        say("  no previous release to go back to: services stopped")


def without(requirements: str, distribution: str) -> str:
    """A requirements text without the line pinning ``distribution``."""
    return "".join(line + "\n" for line in requirements.splitlines()
                   if normalize(re.split(r"[=<>~!;\[ ]", line.strip())[0]) != normalize(distribution))


def venv_mismatch(venv: Path, python: str = sys.executable) -> str | None:
    """Why an existing venv cannot serve as the runtime's (None: it can): made without the
    system site packages (JetPack's TensorRT bindings live there) or from another Python."""
    cfg = venv / "pyvenv.cfg"
    if not cfg.is_file():
        return None
    settings = dict((k.strip(), v.strip()) for k, _, v in
                    (line.partition("=") for line in cfg.read_text().splitlines() if "=" in line))
    if settings.get("include-system-site-packages", "false").lower() != "true":
        return "made without --system-site-packages"
    version = settings.get("version") or settings.get("version_info", "")
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if version and not (version == want or version.startswith(want + ".")):
        return f"made by Python {version}, not {want} ({python})"
    return None


STEPS = {"verify": Agent.verify, "check": Agent.check, "env": Agent.env, "stop": Agent.stop,
         "build-engines": Agent.build_engines, "selftest": Agent.selftest, "install-units": Agent.install_units,
         "switch": Agent.switch, "start": Agent.start, "health": Agent.health, "finish": Agent.finish,
         "deactivate": Agent.deactivate}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vpp-agent", description="vpp-edge deployment steps on the target")
    p.add_argument("step", choices=[*STEPS, "reactivate"])
    p.add_argument("--failed", help="reactivate: id of the release that failed")
    p.add_argument("--release", type=Path, default=RELEASE, help="release folder (default: the one shipping this agent)")
    args = p.parse_args(argv)
    try:
        agent = Agent(args.release)
        if args.step == "reactivate":
            agent.reactivate(args.failed)
        else:
            STEPS[args.step](agent)
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except subprocess.TimeoutExpired as exc:
        print(f"error: {shlex.join(map(str, exc.cmd))} timed out after {exc.timeout:.0f} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
