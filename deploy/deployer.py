"""``vpp deploy``: the steps, in order, and the rollback.

Workstation: plan the bundle (hashes only) and compare its id with the target's `current`
release: equal means nothing to do. Otherwise write the bundle, then over SSH: upload
(rsync), verify checksums, check the target, prepare the Python environment, and only
then touch the robot: stop the units, build engines, self-test, install units, switch
`current`, start, watch the units settle, record. A failure from the stop onwards runs
the previous release's own agent to make it current again and restart its units.
"""

from __future__ import annotations

import getpass
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vpp_edge.errors import VPPError
from vpp_edge.runtime.manifest import MANIFEST_FILE

from .bundle import Bundle, offline, plan_bundle, write_bundle
from .ssh import SSHTarget, require_tools, rsync_stats, run
from .wheels import WheelError, download_wheelhouse, lock_file


class DeployError(VPPError):
    """A deployment step failed (the message says whether the target was rolled back)."""


@dataclass
class Step:
    key: str
    title: str
    argvs: list[list[str]]
    timeout: float
    guarded: bool = False  # from this step on, a failure rolls the target back
    keep: Callable[[str], bool] | None = None  # which output lines to show


@dataclass
class TargetState:
    current: str | None = None
    finished: str | None = None  # id recorded by the last deployment that completed
    rsync: bool = False
    facts: dict[str, str] = field(default_factory=dict)


class Deployment:
    def __init__(self, cfg: dict[str, Any], artifact: str | Path, target: str, ssh_options: list[str] = (),
                 bundle_dir: str | Path = "build/deploy", out: Callable[[str], None] = print):
        self.cfg, self.artifact, self.target = cfg, Path(artifact), target
        self.root = cfg["install_root"]
        ssh_user = target.split("@", 1)[0] if "@" in target else getpass.getuser()
        self.user = cfg["service_user"] or ssh_user
        self.ssh = SSHTarget(target, list(ssh_options), cfg["timeouts"]["connect"])
        self.bundle_dir = Path(bundle_dir)
        self.out = out

    def say(self, msg: str = "") -> None:
        self.out(msg)

    # -- plan ------------------------------------------------------------------
    def plan(self, wheels: list[Path] = ()) -> Bundle:
        return plan_bundle(self.cfg, self.artifact, self.user, wheels=wheels)

    def wheelhouse(self) -> list[Path]:
        """The robot lock's wheels for the target (offline installs), downloaded once into
        the workstation's cache folder; [] when the target installs from the index."""
        if not offline(self.cfg):
            return []
        profile = self.cfg["profile"]
        dest = Path(self.cfg["wheelhouse_cache"]) / profile["name"]
        try:
            wheels = download_wheelhouse(profile, dest, timeout=self.cfg["timeouts"]["pip"])
        except WheelError as exc:
            raise DeployError(f"{exc}; deploy with --online to let the target install from the package index") from None
        size = sum(w.stat().st_size for w in wheels)
        self.say(f"  wheelhouse: {len(wheels)} wheels, {size / 2**20:.1f} MiB for {profile['platform']['arch']} "
                 f"CPython {profile['python']} ({lock_file(profile).name}, cached in {dest})")
        return wheels

    def _agent(self, release: str, step: str, timeout: float) -> list[str]:
        agent = f"{self.root}/releases/{release}/bin/vpp-agent"
        # `timeout` on the target too: a killed SSH client must not leave the step running there
        return self.ssh.command(f"timeout -k 10 {int(timeout)} {shlex.quote(agent)} {step}")

    def steps(self, bundle_id: str, previous: str | None) -> list[Step]:
        t = self.cfg["timeouts"]
        rel = f"{self.root}/releases/{bundle_id}"
        link = previous and previous != bundle_id
        mkdir = self.ssh.command("mkdir -p " + " ".join(shlex.quote(f"{self.root}/{d}")
                                                          for d in ("releases", "logs", "cache")))
        # The small part (code, units, settings, the shipped artifact manifest, BUNDLE.json)
        # from the local bundle folder, then the artifact from its own folder: exactly the
        # files BUNDLE.json lists.
        rsync = self.ssh.rsync_command(str(self.bundle_dir / bundle_id), rel,
                                       f"{self.root}/current/" if link else None,
                                       excludes=("/artifact/*", "__pycache__/"),
                                       includes=(f"/artifact/{MANIFEST_FILE}",))
        rsync_artifact = self.ssh.rsync_command(str(self.artifact), f"{rel}/artifact",
                                                f"{self.root}/current/artifact/" if link else None,
                                                files_from=str(self._artifact_list(bundle_id)))
        env = ("use the configured Python" if self.cfg["python"]
               else f"venv {self.root}/venv from {self.cfg['venv_python']} (--system-site-packages) + "
                    "requirements-robot.txt" + (" from the bundle's wheelhouse, offline" if offline(self.cfg)
                                                else " from the package index"))
        settle = self.cfg["health"]["settle_s"]
        a = self._agent
        return [
            Step("upload", f"upload the bundle to {rel} (rsync"
                 + (", unchanged files hard-linked to the running release)" if link else ")"),
                 [mkdir, rsync, rsync_artifact], t["rsync"], keep=rsync_stats),
            Step("verify", "verify every file's SHA-256 on the target", [a(bundle_id, "verify", t["step"])], t["step"]),
            Step("check", "check the target: JetPack, CUDA, TensorRT, Python, memory, disk, service manager",
                 [a(bundle_id, "check", t["step"])], t["step"]),
            Step("env", f"runtime Python environment ({env})", [a(bundle_id, "env", t["pip"])], t["pip"] + 15),
            Step("stop", "stop the running units", [a(bundle_id, "stop", t["service"])], t["service"] + 15,
                 guarded=True),
            Step("build-engines", f"build TensorRT engines ({', '.join(self.cfg['engines']['precisions'])}) on the "
                 "target, timing cache kept", [a(bundle_id, "build-engines", t["build_engines"])],
                 t["build_engines"] + 15, guarded=True),
            Step("selftest", "self-test: engines load, inference, latency",
                 [a(bundle_id, "selftest", t["selftest"])], t["selftest"] + 15, guarded=True),
            Step("install-units", f"install the systemd units into {self.cfg['unit_dir']}",
                 [a(bundle_id, "install-units", t["service"])], t["service"] + 15, guarded=True),
            Step("switch", f"switch {self.root}/current -> releases/{bundle_id} (atomic symlink rename)",
                 [a(bundle_id, "switch", t["step"])], t["step"] + 15, guarded=True),
            Step("start", "(re)start the units", [a(bundle_id, "start", t["service"])], t["service"] + 15,
                 guarded=True),
            Step("health", f"units stay active for {settle:g} s",
                 [a(bundle_id, "health", t["service"] + settle)], t["service"] + settle + 15, guarded=True),
            Step("finish", "record the deployment, prune old releases",
                 [a(bundle_id, "finish", t["step"])], t["step"] + 15, guarded=True),
        ]

    def _artifact_list(self, bundle_id: str) -> Path:
        return self.bundle_dir / f"{bundle_id}.artifact-files"

    def rollback_command(self, bundle_id: str, previous: str | None) -> list[str]:
        t = self.cfg["timeouts"]
        budget = 4 * t["service"] + self.cfg["health"]["settle_s"]
        if previous:  # the previous release's own agent and settings
            return self._agent(previous, f"reactivate --failed {bundle_id}", budget)
        return self._agent(bundle_id, "deactivate", budget)

    def status_command(self) -> list[str]:
        root = shlex.quote(self.root)
        script = (f'cd {root} 2>/dev/null && {{ printf "current=%s\\n" "$(readlink current)"; '
                  f'printf "state=%s\\n" "$(tr -d "\\n" < state.json 2>/dev/null)"; }}; '
                  'printf "rsync=%s\\nuser=%s\\narch=%s\\nhost=%s\\n" "$(command -v rsync)" "$(id -un)" '
                  '"$(uname -m)" "$(hostname)"')
        return self.ssh.command("sh -c " + shlex.quote(script))

    # -- run -------------------------------------------------------------------
    def status(self) -> TargetState:
        r = run(self.status_command(), self.cfg["timeouts"]["connect"] + 15, echo=None)
        if r.code != 0:
            raise DeployError(f"cannot reach {self.target} over SSH (exit {r.code}): {r.tail(3)}")
        facts = dict(line.split("=", 1) for line in r.output if "=" in line)
        state = TargetState(current=Path(facts["current"]).name if facts.get("current") else None,
                            rsync=bool(facts.get("rsync")), facts=facts)
        try:
            state.finished = json.loads(facts.get("state") or "{}").get("current")
        except ValueError:
            state.finished = None
        return state

    def run(self, dry_run: bool = False, force: bool = False) -> int:
        start = time.monotonic()
        bundle = self.plan(wheels=[] if dry_run else self.wheelhouse())
        bid = bundle.id
        self.say(f"vpp deploy: bundle {bid} ({len(bundle.files)} files, {bundle.size / 2**20:.1f} MiB: code, "
                 f"artifact {self.artifact}, units, settings) -> {self.target}:{self.root} "
                 f"[profile {self.cfg['profile'].get('name')}, robot {self.cfg['robot']}]")
        if dry_run:
            return self._dry_run(bid)
        require_tools()
        state = self.status()
        self.say(f"  target {state.facts.get('user')}@{state.facts.get('host')} ({state.facts.get('arch')}): "
                 f"current release {state.current or '(none)'}")
        mismatch = arch_mismatch(self.cfg, state.facts.get("arch"))
        if mismatch:
            raise DeployError(f"{mismatch}; nothing was changed on the robot")
        if state.current == bid and state.finished == bid and not force:
            self.say(f"nothing to do: {self.target} already runs bundle {bid} (use --force to redeploy)")
            return 0
        write_bundle(bundle, self.bundle_dir / bid, with_artifact=False)
        self._artifact_list(bid).write_text("".join(f + "\n" for f in bundle.artifact_files()))
        self.say(f"  bundle written to {self.bundle_dir / bid} (artifact sent from {self.artifact})")
        if not state.rsync:
            raise DeployError(f"rsync is not installed on {self.target}: sudo apt-get install rsync")
        previous = state.current
        steps = self.steps(bid, previous)
        guarded = False
        for i, step in enumerate(steps, 1):
            self.say(f"[{i}/{len(steps)}] {step.title}")
            guarded = guarded or step.guarded
            t0 = time.monotonic()
            try:
                for argv in step.argvs:
                    r = run(argv, step.timeout, echo=lambda line: self.say("    " + line), keep=step.keep)
                    if r.code != 0:
                        raise DeployError(f"step '{step.key}' failed ({'timed out' if r.timed_out else f'exit {r.code}'})"
                                          f": {_cause(r.output) or r.tail(2)}")
            except (DeployError, KeyboardInterrupt) as exc:
                if not guarded:
                    raise DeployError(f"{exc or 'interrupted'}; nothing was changed on the robot "
                                      f"(current release still {previous or '(none)'})") from None
                self._rollback(bid, previous, exc)
            self.say(f"    ok ({time.monotonic() - t0:.1f} s)")
        self.say(f"deployed bundle {bid} to {self.target}:{self.root} in {time.monotonic() - start:.1f} s "
                 f"(previous release: {previous or 'none'})")
        return 0

    def _rollback(self, bid: str, previous: str | None, cause: BaseException) -> None:
        what = f"release {previous}" if previous else "no previous release: stopping the units"
        self.say(f"[rollback] {cause if str(cause) else 'interrupted'}; rolling back ({what})")
        r = run(self.rollback_command(bid, previous), self.cfg["timeouts"]["service"] * 4 + 60,
                echo=lambda line: self.say("    " + line))
        if r.code != 0:
            raise DeployError(f"{cause}; ROLLBACK FAILED too ({r.tail(2)}): log in to {self.target} and check "
                              f"{self.root}/current and `systemctl status vpp-runtime`") from None
        done = f"rolled back to release {previous}, its units restarted" if previous else "units stopped"
        raise DeployError(f"{cause}; {done}") from None

    def _dry_run(self, bid: str) -> int:
        prev = "<current>"
        self.say("dry run: nothing is written, copied or run. The steps would be:")
        if offline(self.cfg):
            self.say(f"  first, the wheels of {lock_file(self.cfg['profile']).name} for the target are downloaded into "
                     f"{self.cfg['wheelhouse_cache']}/{self.cfg['profile']['name']} and ship as the bundle's "
                     "wheelhouse/ (the bundle id above does not count them)")
        self.say("[0] read the target's current release (equal to this bundle: nothing to do)")
        self.say("      $ " + shlex.join(self.status_command()))
        for i, step in enumerate(self.steps(bid, prev), 1):
            marker = "  (failure from here on: rollback)" if step.key == "stop" else ""
            self.say(f"[{i}] {step.title}{marker}")
            for argv in step.argvs:
                self.say("      $ " + shlex.join(argv))
        self.say("[rollback] on a failure from step 'stop' on, the previous release's agent makes it current "
                 "again and restarts its units:")
        self.say("      $ " + shlex.join(self.rollback_command(bid, prev)))
        self.say("  (first deployment, no previous release: " + shlex.join(self.rollback_command(bid, None)) + ")")
        return 0


def arch_mismatch(cfg: dict[str, Any], target_arch: str | None) -> str | None:
    """Why the bundle's wheelhouse cannot install on a target of ``target_arch`` (uname -m),
    or None: the profile's platform is another machine."""
    want = (cfg["profile"].get("platform") or {}).get("arch")
    if not offline(cfg) or not want or not target_arch or target_arch == want:
        return None
    return (f"profile '{cfg['profile'].get('name')}' ships {want} wheels, the target is {target_arch}: "
            "choose its profile (--profile), or --online")


def _cause(output: list[str]) -> str:
    """The agent's error line, with the underlying tool's error when there is one."""
    errors = [line.strip() for line in output if "error:" in line]
    if not errors:
        return ""
    inner = [e for e in errors[:-1] if not e.startswith("error:")]
    return errors[-1] + (f" [{inner[-1]}]" if inner else "")
