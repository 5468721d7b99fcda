"""vpp deploy: the bundle and its checksums, the dry run, the target checks, the self-test,
and a real deployment over SSH to a throw-away sshd on 127.0.0.1 (temporary host and
user keys, install root and unit folder under tmp_path) with rollbacks.

The target has no running systemd (a container), so the units are driven by
``vpp_edge.deploy.supervisor``, a systemctl-compatible stand-in passed as
``--service-manager``: the only fake, at the service-manager boundary. Everything else is
real: ssh, rsync, the agent, `vpp build-engines` (TensorRT absent -> ONNX Runtime
fallback), `vpp doctor --selftest`, and the units' `vpp run` / `vpp bridge` processes.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vpp_edge.cli import main
from vpp_edge.deploy.bundle import plan_bundle, write_bundle
from vpp_edge.deploy.checks import (check_cuda, check_jetpack, check_memory, check_service_manager, jetpack_for,
                                    parse_tegra_release)
from vpp_edge.deploy.checksums import BundleError, bundle_id, verify_tree
from vpp_edge.deploy.config import DeployConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
ZMQ_PORTS = (5701, 5702, 5703, 5704)  # the runtime <-> bridge defaults (runtime/protocol.py)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_artifact(exported, dest: Path) -> Path:
    """A private copy of the session artifact (tests below break their copies)."""
    shutil.copytree(exported[0], dest)
    return dest


def _wrong_dims_normalization(artifact: Path) -> Path:
    """Statistics for a 6-dim robot on a 7-dim model: every graph file intact, the policy unusable."""
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["normalization"] = {"mode": "bounds", "low": [-1.0] * 6, "high": [1.0] * 6, "mean": [], "std": []}
    path.write_text(json.dumps(manifest, indent=2))
    return artifact


# -- bundle -------------------------------------------------------------------

def test_bundle_contents_checksums_and_determinism(exported, tmp_path):
    cfg = load_config(profile="linux", install_root="/srv/vpp", python="/usr/bin/python3")
    bundle = plan_bundle(cfg, exported[0], "robot")
    out = write_bundle(bundle, tmp_path / "bundle")
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    for needed in ("code/vpp_edge/cli.py", "code/vpp_edge/runtime/policy.py", "code/vpp_edge/runtime/engines/onnxruntime.py",
                   "code/vpp_edge/runtime/cameras/replay.py", "code/vpp_edge/robots/sim.yaml",
                   "code/vpp_edge/export/manifest.py", "code/vpp_edge/firmware_bridge/bridge.py",
                   "code/vpp_edge/deploy/remote.py", "code/vpp_edge/presets/tiny.yaml",
                   "artifact/manifest.json", "artifact/tokenizer.json", "artifact/fp32/tvp.onnx",
                   "units/vpp-runtime.service", "units/vpp-bridge.service", "config/deploy.json",
                   "bin/vpp", "bin/vpp-agent", "requirements-robot.txt", "BUNDLE.json", "SHA256SUMS"):
        assert needed in files, needed
    # The robot gets no training code, no bytecode, no engines built elsewhere, and only the
    # ONNX precisions it runs (ONNX Runtime FP32 here), under a manifest that says so.
    assert not [f for f in files if f.startswith("code/vpp_edge/training") or "__pycache__" in f
                or f.startswith(("artifact/engines", "artifact/fp16", "artifact/int8"))]
    shipped = json.loads((out / "artifact/manifest.json").read_text())
    assert {k.split("/")[0] for k in shipped["graphs"]} == {"fp32"} and shipped["engines"] == {}
    assert shipped["graphs"]["fp32/tvp"] == exported[1]["graphs"]["fp32/tvp"]

    doc = json.loads((out / "BUNDLE.json").read_text())
    assert set(doc["files"]) == files - {"BUNDLE.json", "SHA256SUMS"}
    for rel, entry in doc["files"].items():  # hashes recomputed independently of the bundle code
        assert entry["sha256"] == _sha(out / rel), rel
        assert entry["size"] == (out / rel).stat().st_size
    assert doc["id"] == bundle.id == bundle_id(doc["files"])
    sums = dict(reversed(line.split("  ", 1)) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert sums == {rel: e["sha256"] for rel, e in doc["files"].items()}
    assert os.access(out / "bin/vpp", os.X_OK) and doc["files"]["bin/vpp"]["executable"]
    assert verify_tree(out)[0] == len(doc["files"])

    # Robot requirements: exactly the lock file's pins, no torch.
    lock = {line.split("==")[0].lower(): line for line in (REPO / "requirements/lock.txt").read_text().splitlines()
            if "==" in line}
    reqs = [line for line in (out / "requirements-robot.txt").read_text().splitlines() if line and line[0] != "#"]
    assert {r.split("==")[0].lower() for r in reqs} >= {"onnxruntime", "tokenizers", "pyzmq", "msgpack", "numpy"}
    assert all(lock[r.split("==")[0].lower()] == r for r in reqs)
    assert not any(r.lower().startswith(("torch", "diffusers", "transformers")) for r in reqs)

    # Rendered units: real systemd units pointing at the install root.
    unit = (out / "units/vpp-runtime.service").read_text()
    for line in ("WorkingDirectory=/srv/vpp/current", "Restart=on-failure", "KillSignal=SIGINT", "LimitRTPRIO=95",
                 "LimitMEMLOCK=infinity", "Environment=PYTHONUNBUFFERED=1", "User=robot",
                 "After=network-online.target vpp-bridge.service", "WantedBy=multi-user.target"):
        assert line in unit.splitlines(), line
    exec_start = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    assert exec_start.startswith("ExecStart=/srv/vpp/current/bin/vpp run --artifact artifact --robot sim")
    assert "--rt-priority 80" in exec_start and "--log /srv/vpp/logs/runtime.jsonl" in exec_start
    assert "exec /usr/bin/python3 -m vpp_edge.cli" in (out / "bin/vpp").read_text()

    # Deterministic: same inputs, same id and bytes; another setting, another id.
    again = write_bundle(plan_bundle(cfg, exported[0], "robot"), tmp_path / "again")
    assert (again / "BUNDLE.json").read_bytes() == (out / "BUNDLE.json").read_bytes()
    assert plan_bundle(load_config(profile="linux", install_root="/srv/vpp", python="/usr/bin/python3", robot="panda"),
                       exported[0], "robot").id != bundle.id

    # Verification names what is wrong.
    victim = out / "artifact/fp32/text.onnx"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (out / "code/stray.py").write_text("x = 1\n")
    with pytest.raises(BundleError, match=r"changed: artifact/fp32/text.onnx.*unexpected: code/stray.py"):
        verify_tree(out)


def test_bundle_ships_the_precisions_the_target_runs(exported):
    def folders(**settings) -> set[str]:
        bundle = plan_bundle(load_config(profile="linux", **settings), exported[0], "robot")
        return {p.split("/")[1] for p in bundle.files if p.startswith("artifact/") and p.count("/") == 2}

    assert folders() == {"fp32"}
    # TensorRT INT8 engines are built from the int8 graphs; the runtime asks for int8_cpu
    assert folders(engines={"precisions": ["fp16", "int8"]}, runtime={"precision": "int8_cpu"}) == \
        {"fp32", "int8", "int8_cpu"}
    assert folders(artifact_precisions="all") == {"fp32", "fp16", "int8", "int8_cpu"}
    assert folders(artifact_precisions=["fp32", "fp16"]) == {"fp32", "fp16"}
    with pytest.raises(BundleError, match=r"no int4 graphs to ship \(precisions here: fp16, fp32, int8, int8_cpu\)"):
        folders(artifact_precisions=["fp32", "int4"])


def test_bundle_refuses_an_artifact_changed_after_export(exported, tmp_path):
    art = _copy_artifact(exported, tmp_path / "art")
    victim = art / "fp32" / "former.onnx"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    cfg = load_config(profile="linux")
    with pytest.raises(BundleError, match=r"former.onnx: sha256 does not match the artifact manifest for 'fp32/former'"):
        plan_bundle(cfg, art, "robot")


def test_deploy_settings_are_checked():
    with pytest.raises(DeployConfigError, match=r"unknown deploy setting 'helth'.*did you mean 'health'"):
        load_config(helth={"settle_s": 1})
    with pytest.raises(DeployConfigError, match=r"target profile 'jetson-xavier' unknown; known: jetson-orin, jetson-orin-jp6, jetson-orin-jp7, linux"):
        load_config(profile="jetson-xavier")
    with pytest.raises(DeployConfigError, match="absolute path"):
        load_config(install_root="opt/vpp")
    with pytest.raises(DeployConfigError, match=r"artifact_precisions must be null, 'all' or a list"):
        load_config(artifact_precisions="fp32")


@pytest.mark.parametrize("setting, value, message", [
    ("robot", "sim\nExecStartPre=/bin/rm -rf /", "robot .* cannot go into a systemd unit"),
    ("install_root", "/opt/vpp/../etc", r"must not contain '\.\.'"),
    ("install_root", "/opt/vpp %h", "install_root|root .* cannot go into a systemd unit"),
    ("service_user", "robot\nUser=root", "user .* cannot go into a systemd unit"),
    ("limits", {"rtprio": 120}, "rtprio '120' cannot go into a systemd unit"),
    ("runtime", {"args": ["--camera-fps", "15\nExecStartPost=/bin/sh"]}, "contains a control character"),
    ("bridge_servo", {"rt_priority": 120}, "bridge_servo.rt_priority must be 0-99"),
    ("bridge_servo", {"cpus": "3"}, "bridge_servo.cpus must be a list"),
    ("runtime", {"threads": "2\nExecStartPost=/bin/sh"}, "runtime.threads must be a non-negative integer"),
])
def test_values_that_would_change_a_unit_are_refused(setting, value, message):
    from vpp_edge.deploy.units import render_units

    cfg = load_config(**{setting: value})
    with pytest.raises(DeployConfigError, match=message):
        render_units(cfg, cfg["service_user"] or "robot")


def test_units_are_hardened_without_blocking_real_time():
    from vpp_edge.deploy.units import render_units

    for name, text in render_units(load_config(install_root="/usr/local/vpp"), "robot").items():
        directives = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
        assert {k: directives.get(k) for k in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp")} == \
            {"NoNewPrivileges": "yes", "ProtectSystem": "full", "PrivateTmp": "yes"}, name
        assert directives["ReadWritePaths"] == "/usr/local/vpp", "logs stay writable under a read-only /usr"
        assert directives["LimitRTPRIO"] == "95" and directives["LimitMEMLOCK"] == "infinity"
        for breaking in ("RestrictRealtime", "PrivateDevices", "MemoryDenyWriteExecute", "ProtectHome"):
            assert breaking not in directives, f"{name}: {breaking} would break the GPU or SCHED_FIFO"
    bridge = render_units(load_config(bridge_servo={"cpus": [2, 3]}), "robot")["vpp-bridge.service"]
    assert "vpp bridge --robot sim --rt-priority 90 --cpus 2,3" in bridge


# -- dry run --------------------------------------------------------------------

def test_dry_run_prints_every_step_and_runs_nothing(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "")  # no ssh, no rsync, nothing: a dry run must not need them
    bundles = tmp_path / "bundles"
    code = main(["deploy", "--target", "robot@192.0.2.10", "--artifact", str(exported[0]), "--dry-run",
                 "--bundle-dir", str(bundles), "--ssh-option", "Port=2222", "--robot", "panda"])
    out = capsys.readouterr().out
    assert code == 0
    assert not bundles.exists()  # nothing written
    steps = [line for line in out.splitlines() if line.startswith("[") and not line.startswith("[rollback]")]
    assert [s.split("]")[0] for s in steps] == [f"[{i}" for i in range(13)]
    for what in ("upload the bundle", "verify every file", "JetPack, CUDA, TensorRT, Python, memory",
                 "runtime Python environment", "stop the running units", "build TensorRT engines",
                 "self-test", "install the systemd units into /etc/systemd/system", "switch /opt/vpp-edge/current",
                 "(re)start the units", "units stay active", "record the deployment"):
        assert what in out, what
    commands = [line.strip()[2:] for line in out.splitlines() if line.strip().startswith("$ ")]
    assert any(c.startswith("rsync ") and "--link-dest=/opt/vpp-edge/current/" in c and "-o Port=2222" in c
               for c in commands)
    assert any("--files-from=" in c for c in commands)  # the artifact: exactly the hashed files
    for step in ("verify", "check", "env", "stop", "build-engines", "selftest", "install-units", "switch", "start",
                 "health", "finish"):
        assert any(c.startswith("ssh ") and f"bin/vpp-agent {step}'" in c for c in commands), step
    assert "reactivate --failed" in out and "deactivate" in out
    assert "robot panda" in out
    # the default profile (JetPack 6.2): the robot lock's aarch64 wheels ship, the target installs offline
    assert "first, the wheels of robot-jp6.txt for the target are downloaded" in out
    assert "venv /opt/vpp-edge/venv from /usr/bin/python3.10 (--system-site-packages)" in out
    assert "from the bundle's wheelhouse, offline" in out


# -- target checks ------------------------------------------------------------

def test_target_checks_report_what_they_find(tmp_path):
    assert parse_tegra_release("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64") == "36.4.3"
    assert parse_tegra_release("not a tegra file") is None
    assert (jetpack_for("36.4.3"), jetpack_for("36.4.0"), jetpack_for("36.3.0"), jetpack_for("35.5.0")) == \
        ("6.2", "6.1", "6.0", "5.1.3")
    orin = {"name": "jetson-orin", "require_jetson": True, "l4t": ["36"], "require_cuda": True, "cuda": ["12"],
            "min_free_memory_mb": 2048}
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64\n")
    r = check_jetpack(orin, release)
    assert r.ok and r.found == "L4T R36.4.0 (JetPack 6.1)"
    release.write_text("# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: t186ref, EABI: aarch64\n")
    r = check_jetpack(orin, release)
    assert r.failed and "JetPack 5.1.3" in r.found and "supports L4T 36.x" in r.found
    assert check_jetpack(orin, tmp_path / "absent").failed
    assert check_jetpack({"name": "linux"}, tmp_path / "absent").ok

    cuda = tmp_path / "cuda"
    cuda.mkdir()
    (cuda / "version.json").write_text(json.dumps({"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}))
    assert check_cuda(orin, cuda).ok
    (cuda / "version.json").write_text(json.dumps({"cuda": {"name": "CUDA SDK", "version": "11.4.315"}}))
    assert check_cuda(orin, cuda).failed

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        7799400 kB\nMemFree:          812000 kB\nMemAvailable:    1536000 kB\n")
    r = check_memory(orin, meminfo)
    assert r.failed and r.found == "1500 MiB available of 7616 MiB; need >= 2048 MiB"

    r = check_service_manager([sys.executable, "-m", "vpp_edge.deploy.supervisor", "--unit-dir", str(tmp_path),
                               "--state-dir", str(tmp_path / "s")])
    assert r.ok and r.found.endswith("is-system-running: running")
    systemctl = shutil.which("systemctl")
    if systemctl and Path("/proc/1/comm").read_text().strip() != "systemd":
        r = check_service_manager([systemctl])  # this container: systemctl without systemd
        assert r.failed and "pass --service-manager" in r.found


# -- self-test ----------------------------------------------------------------

def test_selftest_passes_on_the_artifact_and_fails_clearly(exported, tmp_path, capsys):
    assert main(["doctor", "--artifact", str(exported[0]), "--selftest", "--runs", "2",
                 "--json", str(tmp_path / "st.json")]) == 0
    out = capsys.readouterr().out
    assert "every sha256 matches manifest.json" in out
    assert "self-test: engines loaded: onnxruntime/fp32" in out and "PASS" in out
    result = json.loads((tmp_path / "st.json").read_text())
    assert result["backend"] == "onnxruntime" and result["chunk_shape"] == [10, 7] and result["median_ms"] > 0

    broken = _wrong_dims_normalization(_copy_artifact(exported, tmp_path / "broken"))
    assert main(["doctor", "--artifact", str(broken), "--selftest", "--runs", "1"]) == 2
    assert "normalization statistics have 6 dims, the model outputs 7" in capsys.readouterr().err


def test_robot_side_code_runs_the_selftest_without_torch(exported, tmp_path):
    """The bundle's code alone: torch/diffusers/transformers unimportable, and no vpp_edge
    module from anywhere but the bundle (the editable install of this checkout would
    otherwise fill any gap)."""
    cfg = load_config(profile="linux", python=sys.executable)
    out = write_bundle(plan_bundle(cfg, exported[0], "robot"), tmp_path / "bundle")
    script = (
        "import sys, importlib.abc, os\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'diffusers', 'transformers', 'accelerate'):\n"
        "            raise ImportError('blocked on the robot: ' + name)\n"
        "        if name.split('.')[0] == 'vpp_edge':\n"
        "            base = os.path.join(sys.argv[1], *name.split('.'))\n"
        "            if not (os.path.isdir(base) or os.path.isfile(base + '.py')):\n"
        "                raise ImportError('not in the bundle: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import vpp_edge, vpp_edge.cli\n"
        "assert vpp_edge.__file__.startswith(sys.argv[1]), vpp_edge.__file__\n"
        "sys.exit(vpp_edge.cli.main(['doctor', '--artifact', sys.argv[2], '--selftest', '--runs', '1']))\n")
    env = {**os.environ, "PYTHONPATH": str(out / "code")}
    proc = subprocess.run([sys.executable, "-c", script, str(out / "code"), str(out / "artifact")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)  # not the repo
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ONNX Runtime fallback" in proc.stdout and "PASS" in proc.stdout


# -- the service-manager stand-in ---------------------------------------------

def test_supervisor_runs_units_as_systemctl_would(tmp_path):
    units, state = tmp_path / "units", tmp_path / "state"
    units.mkdir()
    (units / "ok.service").write_text(
        f"[Service]\nExecStart={sys.executable} -c \"import time; time.sleep(60)\"\nKillSignal=SIGINT\n"
        "Environment=GREETING=hello \"SPACED=a b\"\nWorkingDirectory=/tmp\nRestart=on-failure\n")
    (units / "crash.service").write_text(
        "[Unit]\nStartLimitBurst=2\n[Service]\nExecStart=/bin/sh -c \"exit 3\"\nRestart=on-failure\nRestartSec=0.1\n")
    sm = [sys.executable, "-m", "vpp_edge.deploy.supervisor", "--unit-dir", str(units), "--state-dir", str(state)]

    def ctl(*args):
        return subprocess.run([*sm, *args], capture_output=True, text=True, timeout=60)

    try:
        assert ctl("start", "ok.service").returncode == 0
        st = json.loads((state / "ok.service.json").read_text())
        assert ctl("is-active", "ok.service").stdout.strip() == "active"
        environ = dict(x.split("=", 1) for x in Path(f"/proc/{st['pid']}/environ").read_text().split("\0") if "=" in x)
        assert environ["GREETING"] == "hello" and environ["SPACED"] == "a b"
        assert os.readlink(f"/proc/{st['pid']}/cwd") == "/tmp"
        assert ctl("stop", "ok.service").returncode == 0
        assert ctl("is-active", "ok.service").stdout.strip() == "inactive"

        ctl("start", "crash.service")
        deadline = time.monotonic() + 20
        while ctl("is-active", "crash.service").stdout.strip() != "failed" and time.monotonic() < deadline:
            time.sleep(0.1)
        final = json.loads((state / "crash.service.json").read_text())
        assert final["state"] == "failed" and final["exit"] == 3 and final["restarts"] == 1  # burst of 2 starts
        assert ctl("is-active", "crash.service").returncode != 0
        assert ctl("start", "missing.service").returncode == 5
    finally:
        ctl("stop", "ok.service", "crash.service")


# -- a real deployment over SSH -----------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A throw-away OpenSSH server on 127.0.0.1 that lets the current user in with a temporary key."""
    sshd_bin = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").is_file() else None)
    missing = [n for n, p in (("sshd (openssh-server)", sshd_bin), ("ssh", shutil.which("ssh")),
                              ("ssh-keygen", shutil.which("ssh-keygen")), ("rsync", shutil.which("rsync"))) if not p]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: `make system-deps` installs requirements/apt.txt")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True, timeout=30)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    test = subprocess.run([sshd_bin, "-t", "-f", str(d / "sshd_config")], capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        pytest.skip(f"sshd cannot run here: {test.stderr.strip()}")
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "w"))
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()[-1000:]}")
            time.sleep(0.1)
    options = [f"Port={port}", f"IdentityFile={d / 'user_key'}", "IdentitiesOnly=yes",
               f"UserKnownHostsFile={d / 'known_hosts'}", "StrictHostKeyChecking=accept-new", "LogLevel=ERROR"]
    yield {"target": f"{getpass.getuser()}@127.0.0.1", "options": options}
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def _zmq_ports_busy() -> list[int]:
    busy = []
    for port in ZMQ_PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


class Target:
    """The install root, unit folder and supervisor state of one test target, and `vpp deploy` into it."""

    def __init__(self, base: Path, sshd: dict):
        self.root, self.units, self.state = base / "root", base / "units", base / "supervisor"
        self.bundles, self.sshd = base / "bundles", sshd
        self.sm = [sys.executable, "-m", "vpp_edge.deploy.supervisor", "--unit-dir", str(self.units),
                   "--state-dir", str(self.state)]
        self.runs: list[str] = []  # transcripts, printed if the test fails
        self.config = base / "deploy.yaml"
        self.config.write_text("health: {settle_s: 2}\nruntime: {rt_priority: 0}\n")

    def deploy(self, artifact: Path, capsys, config: Path | None = None) -> tuple[int, str]:
        args = ["deploy", "--target", self.sshd["target"], "--artifact", str(artifact), "--profile", "linux",
                "--install-root", str(self.root), "--python", sys.executable, "--unit-dir", str(self.units),
                "--service-manager", " ".join(self.sm), "--config", str(config or self.config),
                "--bundle-dir", str(self.bundles)]
        for opt in self.sshd["options"]:
            args += ["--ssh-option", opt]
        capsys.readouterr()
        start = time.monotonic()
        code = main(args)
        out = capsys.readouterr()
        text = out.out + out.err
        self.runs.append(f"--- vpp deploy ({time.monotonic() - start:.1f} s, exit {code})\n{text}")
        return code, text

    def current(self) -> str:
        return Path(os.readlink(self.root / "current")).name

    def service(self, unit: str) -> dict:
        st = json.loads((self.state / f"{unit}.json").read_text())
        active = subprocess.run([*self.sm, "is-active", unit], capture_output=True, text=True, timeout=30)
        st["is_active"] = active.stdout.strip()
        st["cwd"] = os.readlink(f"/proc/{st['pid']}/cwd") if st.get("pid") and st["is_active"] == "active" else None
        return st

    def stop_all(self) -> None:
        subprocess.run([*self.sm, "stop", "vpp-runtime.service", "vpp-bridge.service"], capture_output=True,
                       timeout=60)


@pytest.mark.slow
def test_deploy_over_ssh_noop_and_rollbacks(exported, sshd, tmp_path, capsys):
    busy = _zmq_ports_busy()
    if busy:
        pytest.skip(f"ZeroMQ ports {busy} on 127.0.0.1 are in use (a `vpp demo` or bridge running?): the deployed "
                    "bridge needs them")
    target = Target(tmp_path, sshd)
    try:
        # 1. First deployment: TensorRT absent -> ONNX Runtime, units rendered and running, self-test run.
        code, out = target.deploy(exported[0], capsys)
        assert code == 0, out
        first = target.current()
        assert f"deployed bundle {first}" in out
        assert "vpp build-engines: TensorRT not available" in out
        assert "falls back to ONNX Runtime" in out
        assert "self-test: TensorRT not available: ONNX Runtime fallback" in out
        assert "self-test: engines loaded: onnxruntime/fp32" in out and "first inference" in out and "PASS" in out
        assert f"code from {target.root}/releases/{first}/code/vpp_edge" in out  # the bundle's code ran the self-test
        assert "[ok  ] robot packages" in out and "[warn] TensorRT" in out
        unit = (target.units / "vpp-runtime.service").read_text()
        assert f"WorkingDirectory={target.root}/current" in unit and "LimitRTPRIO=95" in unit
        assert (target.units / "vpp-runtime.service").read_bytes() == \
            (target.root / "releases" / first / "units/vpp-runtime.service").read_bytes()
        runtime, bridge = target.service("vpp-runtime.service"), target.service("vpp-bridge.service")
        assert runtime["is_active"] == bridge["is_active"] == "active"
        assert runtime["cwd"] == str(target.root / "releases" / first)  # started from the switched release
        assert json.loads((target.root / "state.json").read_text())["current"] == first

        # 2. Nothing changed: nothing done (no new release, the same processes).
        code, out = target.deploy(exported[0], capsys)
        assert code == 0 and f"nothing to do: {sshd['target']} already runs bundle {first}" in out
        assert "[1/12]" not in out
        assert sorted(p.name for p in (target.root / "releases").iterdir()) == [first]
        assert target.service("vpp-runtime.service")["pid"] == runtime["pid"]

        # 3. An artifact file changed after export: refused on the workstation, the robot untouched.
        corrupt = _copy_artifact(exported, tmp_path / "corrupt")
        (corrupt / "fp32" / "action_step.onnx").write_bytes(b"not the exported graph")
        code, out = target.deploy(corrupt, capsys)
        assert code == 2 and "sha256 does not match the artifact manifest" in out
        assert target.current() == first and target.service("vpp-runtime.service")["pid"] == runtime["pid"]

        # 4. A broken bundle whose self-test fails on the target: the previous release comes back.
        broken = _wrong_dims_normalization(_copy_artifact(exported, tmp_path / "broken"))
        code, out = target.deploy(broken, capsys)
        assert code == 2, out
        assert "step 'selftest' failed" in out and "normalization statistics have 6 dims" in out
        assert f"rolled back to release {first}, its units restarted" in out
        assert target.current() == first
        runtime = target.service("vpp-runtime.service")
        assert runtime["is_active"] == "active" and runtime["cwd"] == str(target.root / "releases" / first)
        log = [json.loads(line) for line in (target.root / "logs/deploy.jsonl").read_text().splitlines()]
        assert log[-1]["result"] == "rolled-back" and log[-1]["release"] == first

        # 5. A release whose runtime crashes after the switch: the health check catches it, rollback again.
        crashing = tmp_path / "crash.yaml"
        crashing.write_text("health: {settle_s: 2}\nruntime: {rt_priority: 0, args: [--episode, /nonexistent.json]}\n")
        code, out = target.deploy(exported[0], capsys, config=crashing)
        assert code == 2, out
        assert "step 'health' failed" in out and "vpp-runtime.service is" in out
        assert "--episode /nonexistent.json: no such file or folder" in out  # the unit's own log, shown by `status`
        assert f"rolled back to release {first}" in out
        assert target.current() == first
        runtime = target.service("vpp-runtime.service")
        assert runtime["is_active"] == "active" and runtime["cwd"] == str(target.root / "releases" / first)
        assert "--episode" not in (target.units / "vpp-runtime.service").read_text()  # the old units are back
    except AssertionError:
        print("\n".join(target.runs))
        raise
    finally:
        target.stop_all()


def test_deploy_takes_the_calibrated_runtime_config(exported, tmp_path, monkeypatch):
    """`vpp calibrate`'s recommended.yaml picks the artifact, backend and precision the robot runs."""
    from vpp_edge.calibrate.runtime_config import RuntimeConfig, write_runtime_config
    from vpp_edge.deploy import deployer
    from vpp_edge.deploy.units import runtime_command

    config = write_runtime_config(tmp_path / "recommended.yaml",
                                  RuntimeConfig(artifact=exported[0], backend="onnxruntime", precision="int8",
                                                threads=2))
    seen = {}

    class Recorder:
        def __init__(self, cfg, artifact, *args, **kwargs):
            seen.update(cfg=cfg, artifact=artifact)

        def run(self, dry_run, force):
            return 0

    monkeypatch.setattr(deployer, "Deployment", Recorder)
    assert main(["deploy", "--target", "robot@192.0.2.10", "--runtime-config", str(config), "--dry-run"]) == 0
    assert Path(seen["artifact"]).resolve() == Path(exported[0]).resolve()
    argv = runtime_command(seen["cfg"])
    assert argv[argv.index("--backend") + 1] == "onnxruntime" and argv[argv.index("--precision") + 1] == "int8"
    assert argv[argv.index("--threads") + 1] == "2"  # the thread count it was measured with


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client here (openssh-client)")
def test_ssh_options_of_the_user_win_over_the_built_in_ones():
    from vpp_edge.deploy.ssh import SSHTarget

    def effective(target: SSHTarget) -> dict[str, str]:  # ssh -G: the configuration ssh would use, no connection
        out = subprocess.run([*target.ssh, "-G", target.destination], capture_output=True, text=True, timeout=30)
        return dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)

    assert effective(SSHTarget("robot@jetson", connect_timeout=20))["connecttimeout"] == "20"
    chosen = effective(SSHTarget("robot@jetson", ["ConnectTimeout=3", "Port=2222"], connect_timeout=20))
    assert chosen["connecttimeout"] == "3" and chosen["port"] == "2222" and chosen["batchmode"] == "yes"


# -- the runtime-bridge link: endpoints and keys (issue 19) ------------------------------------
REMOTE = {"bind": "0.0.0.0", "bridge_host": "10.0.0.2", "base_port": 5801, "keys": "/etc/vpp-edge/keys",
          "allow": "/etc/vpp-edge/clients"}


@pytest.mark.parametrize("link, message", [
    ({"bind": "0.0.0.0"}, r"link.bind 0.0.0.0 is beyond loopback: set link.keys"),
    ({"bridge_host": "10.0.0.2"}, r"link.bridge_host 10.0.0.2 is beyond loopback"),
    ({"bind": "0.0.0.0", "keys": "/etc/vpp-edge/keys"}, "admits only listed clients: set link.allow"),
    ({"bridge_host": "robot\nExecStartPre=/bin/sh"}, "is not a host name or address"),
    ({"keys": "/etc/vpp-edge/../../root"}, "without '..'"),
    ({"keys": "keys"}, "absolute folder"),
    ({"base_port": 65534}, "link.base_port must be a port"),
    ({"insecure": "yes"}, "link.insecure must be true or false"),
])
def test_link_settings_that_the_processes_would_refuse_are_refused_before_the_units(link, message):
    from vpp_edge.deploy.units import render_units

    with pytest.raises(DeployConfigError, match=message):
        render_units(load_config(link=link), "robot")


def test_units_take_the_link_endpoints_and_key_folders_and_vpp_parses_them():
    from vpp_edge.cli import build_parser
    from vpp_edge.deploy.units import bridge_command, render_units, runtime_command

    default = load_config()
    assert not {"--bridge-host", "--host", "--keys", "--insecure"} & {*runtime_command(default), *bridge_command(default)}
    cfg = load_config(link=REMOTE)
    units = render_units(cfg, "robot")
    assert "--host 0.0.0.0 --base-port 5801 --keys /etc/vpp-edge/keys --allow /etc/vpp-edge/clients" in \
        units["vpp-bridge.service"]
    assert "--bridge-host 10.0.0.2 --base-port 5801 --keys /etc/vpp-edge/keys" in units["vpp-runtime.service"]
    parser = build_parser()
    run = parser.parse_args(runtime_command(cfg)[1:])
    bridge = parser.parse_args(bridge_command(cfg)[1:])
    assert (run.bridge_host, run.base_port, str(run.keys)) == ("10.0.0.2", 5801, "/etc/vpp-edge/keys")
    assert (bridge.host, bridge.base_port, str(bridge.keys), str(bridge.allow)) == \
        ("0.0.0.0", 5801, "/etc/vpp-edge/keys", "/etc/vpp-edge/clients")
    plain = load_config(link={"bind": "0.0.0.0", "insecure": True})
    assert parser.parse_args(bridge_command(plain)[1:]).insecure, "plaintext beyond loopback only when said"
