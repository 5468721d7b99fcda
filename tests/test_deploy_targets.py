"""Deploy targets as data: the JetPack 6.2 / 7 profiles and what the target checks make of
a Jetson, the robot locks resolved for linux aarch64 and the target's CPython, the offline
wheelhouse install and the TensorRT requirement of the deploy agent.

Fakes only at vendor boundaries, and said so where they are: `/etc/nv_tegra_release`,
`nvpmodel`, the cpufreq sysfs tree and a stand-in `tensorrt` distribution (8.6 / 10.3).
The lock test asks the package index (PyPI) and skips without network. No torch here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vpp_edge.deploy import checks, remote
from vpp_edge.deploy.bundle import offline, robot_lock, target_settings
from vpp_edge.deploy.config import load_config, load_profile
from vpp_edge.deploy.wheels import WheelError, check_lock, platform_tags, read_pins, repo_file, target_options

from .test_deploy import Target, _copy_artifact, _wrong_dims_normalization, _zmq_ports_busy, sshd  # noqa: F401

TEGRA = "# R{major} (release), REVISION: {rev}, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: x\n"


def _tegra(tmp_path: Path, l4t: str) -> Path:
    """A stand-in /etc/nv_tegra_release (vendor file) for L4T ``l4t``."""
    major, rev = l4t.split(".", 1)
    path = tmp_path / f"nv_tegra_release-{l4t}"
    path.write_text(TEGRA.format(major=major, rev=rev))
    return path


def _python_with_tensorrt(tmp_path: Path, version: str | None) -> str:
    """A launcher of this Python that sees a stand-in `tensorrt` distribution of ``version``
    (the vendor's Python bindings; None: no TensorRT at all)."""
    site = tmp_path / f"site-trt-{version}"
    if version:
        (site / "tensorrt").mkdir(parents=True, exist_ok=True)
        (site / "tensorrt" / "__init__.py").write_text(f"__version__ = '{version}'\n")
        info = site / f"tensorrt-{version}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tensorrt\nVersion: {version}\n")
    else:
        site.mkdir(parents=True, exist_ok=True)
    launcher = tmp_path / f"python-trt-{version}"
    launcher.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} -S \"$@\"\n")
    launcher.chmod(0o755)
    return str(launcher)


# -- profiles -------------------------------------------------------------------

def test_profiles_name_the_jetpack_targets():
    jp6, jp7, default = load_profile("jetson-orin-jp6"), load_profile("jetson-orin-jp7"), load_profile("jetson-orin")
    assert default == {**jp6, "name": "jetson-orin"}  # the default is JetPack 6.2 by `extends`
    assert (jp6["python"], jp6["cuda"], jp6["tensorrt_min"], jp6["system_python"]) == \
        ("3.10", ["12.6"], "10.3", "/usr/bin/python3.10")
    assert (jp7["python"], jp7["cuda"], jp7["platform"]["glibc"]) == ("3.12", ["13"], "2.39")
    for profile in (jp6, jp7):
        assert profile["require_tensorrt"] and profile["wheelhouse"] and profile["platform"]["arch"] == "aarch64"
        assert "cuda-python" in read_pins(repo_file(profile["lock"]).read_text())
    assert read_pins(repo_file(jp6["lock"]).read_text())["cuda-python"] == "cuda-python==12.6.2.post1"
    assert read_pins(repo_file(jp7["lock"]).read_text())["cuda-python"].startswith("cuda-python==13.0.")
    # the robot side runs on JetPack 6's Python 3.10; the venv comes from the Python that sees TensorRT
    assert checks.PYTHON_MIN == "3.10" and load_profile("linux")["python_min"] == "3.10"
    assert load_config()["venv_python"] == "/usr/bin/python3.10"
    assert load_config(profile="jetson-orin-jp7")["venv_python"] == "/usr/bin/python3.12"
    assert load_config(profile="linux")["venv_python"] == "python3"


def test_jetpack_check_accepts_6_2_and_refuses_6_0_and_6_1(tmp_path):
    jp6, jp7 = load_profile("jetson-orin-jp6"), load_profile("jetson-orin-jp7")
    for l4t, jetpack in (("36.4.3", "6.2"), ("36.4.4", "6.2.1")):
        r = checks.check_jetpack(jp6, _tegra(tmp_path, l4t))
        assert r.ok and r.found == f"L4T R{l4t} (JetPack {jetpack})"
    for l4t, jetpack in (("36.4.0", "6.1"), ("36.3.0", "6.0")):
        r = checks.check_jetpack(jp6, _tegra(tmp_path, l4t))
        assert r.failed and f"(JetPack {jetpack}); profile 'jetson-orin-jp6' supports L4T >= 36.4.3, < 37" in r.found
        assert "JetPack 6.0 (L4T R36.3: TensorRT 8.6, CUDA 12.2) and 6.1 (R36.4.0) are not supported" in r.found
    r = checks.check_jetpack(jp7, _tegra(tmp_path, "38.2.0"))
    assert r.ok and r.found == "L4T R38.2.0 (JetPack 7.0)"
    assert checks.check_jetpack(jp7, _tegra(tmp_path, "36.4.3")).failed

    cuda = tmp_path / "cuda"
    cuda.mkdir()
    for version, ok6, ok7 in (("12.6.68", True, False), ("12.2.140", False, False), ("13.0.48", False, True)):
        (cuda / "version.json").write_text(json.dumps({"cuda": {"version": version}}))
        assert (checks.check_cuda(jp6, cuda).ok, checks.check_cuda(jp7, cuda).ok) == (ok6, ok7), version


def test_tensorrt_check_needs_10_3_bindings_in_the_given_python(tmp_path):
    jp6 = load_profile("jetson-orin-jp6")
    r = checks.check_tensorrt(jp6, _python_with_tensorrt(tmp_path, "10.3.0.30"))
    assert r.ok and r.found.startswith("10.3.0.30 (Python bindings")
    r = checks.check_tensorrt(jp6, _python_with_tensorrt(tmp_path, "8.6.2.3"))  # JetPack 6.0
    assert r.failed and "supported: 10.x, >= 10.3" in r.found and "--allow-cpu-fallback" in r.found
    r = checks.check_tensorrt(jp6, _python_with_tensorrt(tmp_path, None))
    assert r.failed and "python3-libnvinfer" in r.found and "--allow-cpu-fallback" in r.found
    r = checks.check_tensorrt({**jp6, "require_tensorrt": False}, _python_with_tensorrt(tmp_path, None))
    assert not r.failed and "falls back to ONNX Runtime" in r.found


def test_power_mode_check_warns_below_maxn(tmp_path):
    jp6 = load_profile("jetson-orin-jp6")

    def nvpmodel(mode: str) -> str:  # stand-in for the vendor tool
        tool = tmp_path / f"nvpmodel-{mode}"
        tool.write_text(f"#!/bin/sh\n[ \"$1\" = -q ] && printf 'NV Power Mode: {mode}\\n0\\n'\n")
        tool.chmod(0o755)
        return str(tool)

    def cpufreq(locked: bool) -> Path:  # stand-in for /sys/devices/system/cpu
        root = tmp_path / f"cpu-{locked}"
        for cpu in ("cpu0", "cpu1"):
            (root / cpu / "cpufreq").mkdir(parents=True, exist_ok=True)
            (root / cpu / "cpufreq" / "cpuinfo_max_freq").write_text("2201600\n")
            (root / cpu / "cpufreq" / "scaling_min_freq").write_text("2201600\n" if locked else "729600\n")
        return root

    r = checks.check_power(jp6, nvpmodel("MAXN"), cpufreq(True))
    assert r.ok and r.found == "MAXN, jetson_clocks on"
    r = checks.check_power(jp6, nvpmodel("MAXN"), cpufreq(False))
    assert not r.ok and not r.failed and "jetson_clocks off" in r.found and "sudo jetson_clocks" in r.found
    r = checks.check_power(jp6, nvpmodel("15W"), cpufreq(True))
    assert not r.ok and not r.required and "15W" in r.found and "sudo nvpmodel -m 0" in r.found
    assert r.line().startswith("[warn] power mode")
    assert not checks.check_power(jp6, str(tmp_path / "absent"), cpufreq(True)).failed


# -- robot locks -----------------------------------------------------------------

def test_robot_lock_and_wheelhouse_settings_go_into_the_bundle():
    cfg = load_config()  # jetson-orin = JetPack 6.2
    requirements, constraints = robot_lock(cfg)
    pins = read_pins(requirements)
    assert requirements == constraints == repo_file("requirements/robot-jp6.txt").read_text()
    assert all(name in pins for name in ("numpy", "onnxruntime", "av", "cuda-python"))
    assert not any(name in pins for name in ("torch", "diffusers", "transformers"))
    settings = target_settings(cfg, ["vpp-runtime.service"])
    assert settings["offline"] and not settings["allow_cpu_fallback"]
    assert "cuda=cuda-python" in settings["robot_modules"]
    assert not offline(load_config(online=True)) and not offline(load_config(profile="linux"))
    # the runtime and the self-test run the GPU path on a Jetson profile, not a silent CPU fallback
    assert cfg["runtime"]["backend"] == cfg["selftest"]["backend"] == "tensorrt"
    fallback = load_config(allow_cpu_fallback=True)
    assert fallback["allow_cpu_fallback"] is True and fallback["runtime"]["backend"] == "auto"
    assert load_config(profile="linux")["runtime"]["backend"] == "auto"
    # the linux profile keeps the workstation lock's pins, installed from the index
    requirements, constraints = robot_lock(load_config(profile="linux"))
    assert constraints == repo_file("requirements/lock.txt").read_text() and "numpy==" in requirements


def test_a_target_of_another_architecture_is_refused_before_upload():
    from vpp_edge.deploy.deployer import arch_mismatch

    cfg = load_config()
    assert arch_mismatch(cfg, "aarch64") is None
    assert arch_mismatch(cfg, "x86_64") == ("profile 'jetson-orin' ships aarch64 wheels, the target is x86_64: "
                                            "choose its profile (--profile), or --online")
    assert arch_mismatch(load_config(online=True), "x86_64") is None  # the target's pip picks its own wheels
    assert arch_mismatch(load_config(profile="linux"), "x86_64") is None


def test_platform_options_cover_every_glibc_the_target_accepts():
    tags = platform_tags({"arch": "aarch64", "glibc": "2.35"})
    assert tags[0] == "manylinux_2_35_aarch64" and tags[-2:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert "manylinux_2_28_aarch64" in tags and len(tags) == 35 - 17 + 2
    options = target_options(load_profile("jetson-orin-jp6"))
    assert options[:7] == ["--only-binary=:all:", "--python-version", "3.10", "--implementation", "cp", "--abi", "cp310"]
    with pytest.raises(WheelError, match="names no target platform"):
        target_options(load_profile("linux"))


def _index_reachable(host: str = "pypi.org") -> bool:
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.network
@pytest.mark.parametrize("profile", ["jetson-orin-jp6", "jetson-orin-jp7"])
def test_every_robot_pin_has_an_aarch64_wheel_for_the_target_python(profile):
    """pip resolves the lock for linux aarch64 + the profile's CPython, wheels only, against
    PyPI (--dry-run --report: metadata, nothing installed), and adds nothing to it."""
    if not _index_reachable():
        pytest.skip("pypi.org unreachable: the aarch64 resolution needs the package index")
    p = load_profile(profile)
    resolved = check_lock(p, isolated=True)
    pins = read_pins(repo_file(p["lock"]).read_text())
    assert {k: f"{k}=={v}" for k, v in resolved.items()}.keys() == pins.keys()
    assert all(pins[k].split("==")[1] == v for k, v in resolved.items())


# -- the agent: offline install, TensorRT in the venv --------------------------------

def _wheel(dest: Path, name: str, version: str, module: str | None = None, code: str | None = None) -> Path:
    """A minimal pure-Python wheel of distribution ``name`` providing package ``module``
    (default: the name) with ``code`` as its __init__ (what the wheelhouse holds, without a
    network)."""
    module = module or name.replace("-", "_")
    dist = name.replace("-", "_")
    path = dest / f"{dist}-{version}-py3-none-any.whl"
    files = {f"{module}/__init__.py": code or f"__version__ = '{version}'\n",
             f"{dist}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                   "Tag: py3-none-any\n",
             f"{dist}-{version}.dist-info/top_level.txt": f"{module}\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},"
                     f"{len(t.encode())}\n" for p, t in files.items())
    files[f"{dist}-{version}.dist-info/RECORD"] = record + f"{dist}-{version}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for p, t in files.items():
            z.writestr(p, t)
    return path


def _release(tmp_path: Path, **settings) -> Path:
    """A release folder as `vpp deploy` uploads it: settings, robot lock, wheelhouse."""
    release = tmp_path / "root" / "releases" / "r1"
    (release / "config").mkdir(parents=True)
    (release / "wheelhouse").mkdir()
    _wheel(release / "wheelhouse", "vppstub", "1.0")
    lock = "vppstub==1.0\n"
    (release / "requirements-robot.txt").write_text(lock)
    (release / "constraints.txt").write_text(lock)
    cfg = load_config(install_root=str(tmp_path / "root"), **settings)
    out = {**target_settings(cfg, ["vpp-runtime.service"]), "robot_modules": ["vppstub=vppstub"]}
    (release / "config" / "deploy.json").write_text(json.dumps(out))
    return release


def test_agent_installs_offline_and_requires_tensorrt_in_the_venv(tmp_path, capfd):
    """The JetPack 6.2 profile: the venv (--system-site-packages, from the agent's Python)
    installs the wheelhouse with --no-index; this Python has no TensorRT, so the env step
    fails loudly, and passes with --allow-cpu-fallback."""
    release = _release(tmp_path)
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}  # no index, no find-links but the wheelhouse
    proc = subprocess.run([sys.executable, "-m", "vpp_edge.deploy.remote", "env", "--release", str(release)],
                          capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    venv = tmp_path / "root" / "venv"
    assert "--no-index --find-links " + str(release / "wheelhouse") in out, out
    assert "[ok  ] robot packages  vppstub 1.0" in out, out
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    assert proc.returncode == 1 and "[FAIL] TensorRT" in out
    assert f"error: TensorRT in the runtime's Python: not importable by {venv}/bin/python" in out
    assert "--allow-cpu-fallback" in out

    release = _release(tmp_path / "fallback", allow_cpu_fallback=True)
    proc = subprocess.run([sys.executable, "-m", "vpp_edge.deploy.remote", "env", "--release", str(release)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[warn] TensorRT" in proc.stdout and "falls back to ONNX Runtime" in proc.stdout


def test_agent_remakes_a_venv_without_system_site_packages(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.10.12\n")
    assert remote.venv_mismatch(venv) == "made without --system-site-packages"
    here = f"{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}"
    (venv / "pyvenv.cfg").write_text(f"include-system-site-packages = true\nversion = {here}\n")
    assert remote.venv_mismatch(venv) is None
    (venv / "pyvenv.cfg").write_text("include-system-site-packages = true\nversion = 2.7.18\n")
    assert remote.venv_mismatch(venv).startswith("made by Python 2.7.18")
    assert remote.venv_mismatch(tmp_path / "absent") is None


# -- OpenCV on the robot: the system's cv2 (JetPack's, GStreamer) or the wheelhouse's ---------

STAND_IN_SYSTEM_CV2 = '''"""Stand-in for JetPack 6.2's OpenCV 4.8 Python bindings (vendor boundary, tests only): built
with GStreamer and against numpy 1.x's C API, so under numpy 2 its import fails as the real one's does."""
__version__ = "4.8.0"
try:
    import numpy
except ImportError:  # JetPack's python3-numpy: not in the private system Python of these tests
    numpy = None
if numpy is not None and int(numpy.__version__.split(".")[0]) >= 2:
    raise ImportError("A module that was compiled using NumPy 1.x cannot be run in NumPy " + numpy.__version__)


def getBuildInformation():
    return "\\n  Video I/O:\\n    FFMPEG:                      YES\\n    GStreamer:                   YES (1.20.3)\\n"
'''

STAND_IN_WHEEL_CV2 = '''"""Stand-in for PyPI's opencv-python-headless (tests only): no GStreamer."""
__version__ = "4.11.0"


def getBuildInformation():
    return "\\n  Video I/O:\\n    FFMPEG:                      YES\\n    GStreamer:                   NO\\n"
'''


def test_the_system_cv2_is_used_when_it_has_gstreamer_else_the_wheel():
    opencv = load_profile("jetson-orin-jp6")["opencv"]
    jetpack = {"importable": True, "version": "4.8.0", "file": "/usr/lib/python3.10/dist-packages/cv2/__init__.py",
               "gstreamer": True, "distribution": None, "venv": False}
    assert checks.system_cv2_usable(opencv, jetpack) == (
        True, "the system's cv2 4.8.0 (/usr/lib/python3.10/dist-packages/cv2/__init__.py) has GStreamer")
    assert checks.system_cv2_usable(opencv, {**jetpack, "gstreamer": False})[1].endswith("has no GStreamer")
    assert checks.system_cv2_usable(opencv, {**jetpack, "venv": True}) == (False, "the system Python's cv2 is a venv's")
    missing = {"importable": False, "error": "ModuleNotFoundError: No module named 'cv2'"}
    assert checks.system_cv2_usable(opencv, missing) == (
        False, "the system's cv2 is not importable (ModuleNotFoundError: No module named 'cv2')")
    assert checks.system_cv2_usable({**opencv, "prefer": "wheel"}, jetpack)[0] is False
    line = checks.check_opencv(load_profile("jetson-orin-jp6"), "/venv/bin/python", jetpack).line()
    assert line == ("[ok  ] OpenCV          cv2 4.8.0 from /usr/lib/python3.10/dist-packages/cv2/__init__.py "
                    "(system site-packages, GStreamer: yes) in /venv/bin/python")
    wheel = {**jetpack, "gstreamer": False, "venv": True, "distribution": "opencv-python-headless"}
    assert checks.check_opencv(load_profile("jetson-orin-jp6"), "/venv/bin/python", wheel).line().startswith("[warn]")


@pytest.mark.parametrize("profile", ["jetson-orin-jp6", "jetson-orin-jp7"])
def test_the_jetson_locks_hold_numpy_1_for_the_system_cv2_and_pin_the_fallback(profile):
    """What the profiles say about OpenCV is what their locks hold: numpy within the system
    cv2's bound (its bindings are built against the distribution's numpy 1.x) and a pin of the
    fallback wheel (shipped in the wheelhouse, installed only without a usable system cv2)."""
    from vpp_edge.deploy.wheels import lock_requirements

    p = load_profile(profile)
    pins = read_pins(repo_file(p["lock"]).read_text())
    assert p["opencv"] == {"prefer": "system", "require_gstreamer": True, "numpy": "<2",
                           "fallback": "opencv-python-headless"}
    assert pins["numpy"].startswith("numpy==1.26.")
    assert pins["opencv-python-headless"].startswith("opencv-python-headless==4.")
    assert "numpy<2" in lock_requirements(p, load_config(profile=profile)["robot_requirements"])


def _cv2_release(tmp_path: Path, name: str, numpy: str) -> Path:
    """A release as `vpp deploy` uploads it for JetPack 6.2: a lock with numpy (a stand-in
    distribution of that version), the fallback OpenCV wheel and vppstub, all in its wheelhouse."""
    release = tmp_path / "root" / "releases" / name
    (release / "config").mkdir(parents=True)
    house = release / "wheelhouse"
    house.mkdir()
    _wheel(house, "vppstub", "1.0")
    _wheel(house, "numpy", numpy)
    _wheel(house, "opencv-python-headless", "4.11.0.86", module="cv2", code=STAND_IN_WHEEL_CV2)
    lock = f"numpy=={numpy}\nopencv-python-headless==4.11.0.86\nvppstub==1.0\n"
    (release / "requirements-robot.txt").write_text(lock)
    (release / "constraints.txt").write_text(lock)
    cfg = load_config(install_root=str(tmp_path / "root"), profile="jetson-orin-jp6")
    out = {**target_settings(cfg, ["vpp-runtime.service"]),
           "robot_modules": ["vppstub=vppstub", "numpy=numpy", "cv2=opencv-python-headless"]}
    (release / "config" / "deploy.json").write_text(json.dumps(out))
    return release


def test_agent_uses_the_system_cv2_and_installs_the_fallback_wheel_only_without_one(tmp_path):
    """The env step on a JetPack 6.2 'system Python' 3.10 (stand-in TensorRT and, from the
    second release on, a stand-in JetPack OpenCV with GStreamer in its site-packages; vendor
    boundary), offline from the wheelhouse: no system cv2, the fallback wheel goes in; a system
    cv2 with GStreamer, the wheel is left out (and taken out of the venv); a lock whose numpy 2
    the system cv2 cannot import under, the wheel goes back in, saying why."""
    from .test_camera_decoders import _code_tree

    python = _system_python_310(tmp_path / "system")
    site = _install_stand_in_tensorrt(python)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")}, "PIP_CONFIG_FILE": os.devnull,
           "PYTHONPATH": str(_code_tree(tmp_path / "code"))}
    venv = tmp_path / "root" / "venv"
    venv_site = venv / "lib" / "python3.10" / "site-packages"

    def env_step(name: str, numpy: str) -> str:
        release = _cv2_release(tmp_path, name, numpy)
        proc = subprocess.run([str(python), "-m", "vpp_edge.deploy.remote", "env", "--release", str(release)],
                              capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)  # not the repo's vpp_edge
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert f"--no-index --find-links {release / 'wheelhouse'}" in out, out
        return out

    out = env_step("r1", "1.26.4")  # no system cv2: the wheel
    assert "OpenCV: the wheel's cv2 (the system's cv2 is not importable (ModuleNotFoundError" in out, out
    assert (f"[warn] OpenCV          cv2 4.11.0 from {venv_site}/cv2/__init__.py (the venv's site-packages, "
            "opencv-python-headless, GStreamer: no)") in out, out

    (site / "cv2").mkdir()
    (site / "cv2" / "__init__.py").write_text(STAND_IN_SYSTEM_CV2)
    out = env_step("r2", "1.26.4")  # JetPack's cv2 with GStreamer: the wheel is left out and taken out
    assert f"OpenCV: the system's cv2 (the system's cv2 4.8.0 ({site}/cv2/__init__.py) has GStreamer)" in out, out
    assert "opencv-python-headless left out of the venv" in out and "pip uninstall" in out, out
    assert f"[ok  ] OpenCV          cv2 4.8.0 from {site}/cv2/__init__.py (system site-packages, GStreamer: yes)" in out
    assert not (venv_site / "cv2").exists() and not list(venv_site.glob("opencv_python_headless-*"))
    assert "[ok  ] TensorRT        10.3.0.30" in out

    out = env_step("r3", "2.0.0")  # numpy 2 in the venv: the system cv2 does not import there
    assert ("OpenCV: the system's cv2 is not usable in the venv (the system's cv2 is not importable (ImportError: "
            "A module that was compiled using NumPy 1.x cannot be run in NumPy 2.0.0)): installing "
            "opencv-python-headless==4.11.0.86") in out, out
    assert f"[warn] OpenCV          cv2 4.11.0 from {venv_site}/cv2/__init__.py" in out, out
    out = env_step("r4", "2.0.0")  # the venv holds the wheel: the next deployment tries the system's again
    assert "requirements unchanged" not in out and "OpenCV: the system's cv2 is not usable in the venv" in out, out


# -- a JetPack 6.2 rehearsal over SSH ----------------------------------------------------

STAND_IN_TENSORRT = '''"""Stand-in for JetPack 6.2's TensorRT 10.3 Python bindings (vendor boundary, rehearsal
only): the builder calls `vpp build-engines` makes, producing a placeholder plan."""
__version__ = "10.3.0.30"


class Logger:
    WARNING = 2

    def __init__(self, severity=None):
        pass


class MemoryPoolType:
    WORKSPACE = 0


class BuilderFlag:
    FP16, INT8 = 0, 1


class _Cache:
    def serialize(self):
        return b"timing-cache"


class _Config:
    def set_memory_pool_limit(self, pool, size):
        pass

    def set_flag(self, flag):
        pass

    def create_timing_cache(self, data):
        return _Cache()

    def set_timing_cache(self, cache, ignore_mismatch):
        return True

    def get_timing_cache(self):
        return _Cache()


class OnnxParser:
    num_errors = 0

    def __init__(self, network, logger):
        pass

    def parse_from_file(self, path):
        return open(path, "rb").read(4) != b""


class Builder:
    def __init__(self, logger):
        pass

    def create_network(self, flags):
        assert flags == 0, "TensorRT 10: explicit batch is the only mode"
        return object()

    def create_builder_config(self):
        return _Config()

    def build_serialized_network(self, network, config):
        return b"stand-in plan"
'''


def _system_python_310(base: Path) -> Path:
    """A private 'system Python 3.10' (JetPack 6.2's /usr/bin/python3.10): this machine's
    CPython 3.10 binary with its standard library linked in and an own, empty
    site-packages, where the stand-in TensorRT bindings go, as JetPack installs them."""
    from vpp_edge.deploy.wheels import find_python

    found = find_python("3.10")
    if found is None:
        pytest.skip("no CPython 3.10 on this machine: the JetPack 6.2 rehearsal needs one (e.g. pyenv install 3.10)")
    real = Path(subprocess.run([found, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True,
                               timeout=30).stdout.strip()).resolve()
    prefix = real.parent.parent
    stdlib = prefix / "lib" / "python3.10"
    (base / "bin").mkdir(parents=True)
    (base / "lib" / "python3.10" / "site-packages").mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name not in ("site-packages", "test"):
            (base / "lib" / "python3.10" / entry.name).symlink_to(entry)
    python = base / "bin" / "python3.10"
    python.write_bytes(real.read_bytes())  # a copy: Python finds its prefix from the real file
    python.chmod(0o755)
    return python


def _install_stand_in_tensorrt(python: Path) -> Path:
    site = python.parent.parent / "lib" / "python3.10" / "site-packages"
    (site / "tensorrt").mkdir()
    (site / "tensorrt" / "__init__.py").write_text(STAND_IN_TENSORRT)
    info = site / "tensorrt-10.3.0.30.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorrt\nVersion: 10.3.0.30\n")
    return site


def _install_stand_in_system_opencv(site: Path, wheelhouse: list[Path]) -> None:
    """JetPack 6.2's OpenCV in the 'system Python's site-packages, as apt puts it there (no
    pip metadata), with the numpy it needs (Ubuntu's python3-numpy, a 1.x): the lock's own
    numpy and opencv-python-headless wheels unpacked (real OpenCV, which the runtime's replay
    cameras use), whose build information is made to say GStreamer: the one fake, at the
    vendor boundary (JetPack's build has it; PyPI's wheel has not)."""
    for name in ("numpy", "opencv_python_headless"):
        wheel = next(w for w in wheelhouse if w.name.startswith(name + "-"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    for info in site.glob("opencv_python_headless-*.dist-info"):
        shutil.rmtree(info)
    with open(site / "cv2" / "__init__.py", "a") as f:
        f.write("\n\n# Rehearsal stand-in (vendor boundary): JetPack's OpenCV is built with GStreamer.\n"
                "import re as _re\n_wheel_build_information = getBuildInformation\n\n\n"
                "def getBuildInformation():\n"
                "    return _re.sub(r'GStreamer:\\s*NO', 'GStreamer:                   YES (1.20.3)', "
                "_wheel_build_information())\n")


def _jetson_files(base: Path) -> dict[str, str]:
    """Stand-ins for the vendor's files and tools: L4T R36.4.3, CUDA 12.6, MAXN with
    jetson_clocks on."""
    (base / "cuda").mkdir(parents=True)
    (base / "cuda" / "version.json").write_text(json.dumps({"cuda": {"version": "12.6.68"}}))
    release = _tegra(base, "36.4.3")
    nvpmodel = base / "nvpmodel"
    nvpmodel.write_text("#!/bin/sh\nprintf 'NV Power Mode: MAXN\\n0\\n'\n")
    nvpmodel.chmod(0o755)
    freq = base / "cpu" / "cpu0" / "cpufreq"
    freq.mkdir(parents=True)
    (freq / "cpuinfo_max_freq").write_text("2201600\n")
    (freq / "scaling_min_freq").write_text("2201600\n")
    return {"tegra_release": str(release), "cuda_root": str(base / "cuda"), "nvpmodel": str(nvpmodel),
            "cpufreq": str(base / "cpu")}


@pytest.mark.slow
@pytest.mark.network
def test_jetpack_6_2_rehearsal_offline_with_tensorrt_in_the_venv(exported, sshd, tmp_path, capsys):  # noqa: F811
    """`vpp deploy` of the JetPack 6.2 profile to 127.0.0.1, whose 'system Python' is 3.10
    with stand-in TensorRT 10.3 bindings: the check passes, the venv (from that Python,
    --system-site-packages) sees TensorRT, the robot lock installs offline from the
    bundle's wheelhouse (its x86_64 wheels here: same pins), the engine build runs, the
    units run under Python 3.10; the venv imports the system's OpenCV (stand-in: JetPack's,
    with GStreamer) and has no opencv-python-headless; without TensorRT the next deployment
    fails loudly before touching the robot, and --allow-cpu-fallback deploys ONNX Runtime on
    purpose, on a system without OpenCV, so the fallback wheel installs from the wheelhouse."""
    if _zmq_ports_busy():
        pytest.skip("ZeroMQ ports on 127.0.0.1 in use: the deployed bridge needs them")
    if not _index_reachable():
        pytest.skip("pypi.org unreachable: the rehearsal's wheelhouse is downloaded from the package index")
    python = _system_python_310(tmp_path / "system")
    site = _install_stand_in_tensorrt(python)
    profile = tmp_path / "rehearsal-jp6.yaml"
    profile.write_text(json.dumps({
        "name": "rehearsal-jp6", "extends": "jetson-orin-jp6", "system_python": str(python),
        "platform": {"arch": "x86_64", "glibc": "2.28"}, "paths": _jetson_files(tmp_path / "vendor")}))
    target = Target(tmp_path, sshd)
    cache = repo_file("requirements/robot-jp6.txt").parent.parent / "build" / "wheelhouse"
    from vpp_edge.deploy.wheels import download_wheelhouse

    _install_stand_in_system_opencv(site, download_wheelhouse(load_profile(str(profile)), cache / "rehearsal-jp6"))

    def deploy(*extra: str, settle: int = 2) -> tuple[int, str]:
        config = tmp_path / f"deploy-{settle}.yaml"
        config.write_text(json.dumps({"health": {"settle_s": settle}, "wheelhouse_cache": str(cache),
                                      "runtime": {"rt_priority": 0, "backend": "onnxruntime"},
                                      "selftest": {"backend": "onnxruntime", "runs": 1}}))
        args = ["deploy", "--target", sshd["target"], "--artifact", str(exported[0]), "--profile", str(profile),
                "--install-root", str(target.root), "--unit-dir", str(target.units), "--service-manager",
                " ".join(target.sm), "--config", str(config), "--bundle-dir", str(target.bundles), *extra]
        for opt in sshd["options"]:
            args += ["--ssh-option", opt]
        from vpp_edge.cli import main

        capsys.readouterr()
        code = main(args)
        out = capsys.readouterr()
        target.runs.append(out.out + out.err)
        return code, out.out + out.err

    venv = target.root / "venv"
    try:
        code, out = deploy()
        assert code == 0, out
        first = target.current()
        assert "[ok  ] JetPack         L4T R36.4.3 (JetPack 6.2)" in out
        assert "[ok  ] CUDA            12.6.68" in out and "[ok  ] power mode      MAXN, jetson_clocks on" in out
        assert "[ok  ] Python          3.10" in out
        assert f"[ok  ] TensorRT        10.3.0.30 (Python bindings, {venv}/bin/python)" in out  # inside the venv
        assert "--no-index --find-links" in out and "wheelhouse: 35 wheels" in out
        assert "cuda 12.6.2.post1" in out  # cuda-python imported in the venv
        venv_site = venv / "lib" / "python3.10" / "site-packages"
        system_cv2 = f"cv2 4.11.0 from {site}/cv2/__init__.py (system site-packages, GStreamer: yes)"
        assert "opencv-python-headless left out of the venv: the system's cv2 is used" in out, out
        assert f"[ok  ] OpenCV          {system_cv2} in {venv}/bin/python" in out, out
        assert f"self-test: OpenCV: {system_cv2}" in out, out
        assert not (venv_site / "cv2").exists() and not list(venv_site.glob("opencv_python_headless-*"))
        assert "numpy 1.26.4" in out  # the lock's numpy < 2, for the system cv2's bindings
        assert (venv / "pyvenv.cfg").read_text().startswith(f"home = {python.parent}\n")
        manifest = json.loads((target.root / "current" / "artifact" / "manifest.json").read_text())
        assert manifest["engines"] and all(e["tensorrt_version"] == "10.3.0.30" for e in manifest["engines"].values())
        runtime = target.service("vpp-runtime.service")
        assert runtime["is_active"] == "active"
        assert os.readlink(f"/proc/{runtime['pid']}/exe") == str(python)  # the units run on Python 3.10
        wheels = list((target.root / "releases" / first / "wheelhouse").glob("*.whl"))
        assert len(wheels) == 35

        # TensorRT gone from the system Python: refused before anything on the robot changes
        shutil.rmtree(site / "tensorrt")
        code, out = deploy(settle=3)
        assert code == 2 and "step 'check' failed" in out and "python3-libnvinfer" in out, out
        assert "nothing was changed on the robot" in out and target.current() == first

        # ... unless the CPU fallback is asked for; and with no OpenCV on the system, the
        # wheelhouse's opencv-python-headless goes into the venv, offline
        shutil.rmtree(site / "cv2")
        code, out = deploy("--allow-cpu-fallback", settle=3)
        assert code == 0, out
        assert "OpenCV: the wheel's cv2 (the system's cv2 is not importable (ModuleNotFoundError" in out, out
        assert (f"[warn] OpenCV          cv2 4.11.0 from {venv_site}/cv2/__init__.py (the venv's site-packages, "
                f"opencv-python-headless, GStreamer: no) in {venv}/bin/python") in out, out
        assert list(venv_site.glob("opencv_python_headless-4.11.0.86.dist-info"))
        assert "TensorRT not available on the target: no engines built" in out and target.current() != first
        fallback = target.current()

        # a release whose self-test fails on the target: the previous one comes back
        broken = _wrong_dims_normalization(_copy_artifact(exported, tmp_path / "broken"))
        code, out = deploy("--allow-cpu-fallback", "--artifact", str(broken), settle=3)
        assert code == 2 and "step 'selftest' failed" in out, out
        assert f"rolled back to release {fallback}, its units restarted" in out and target.current() == fallback
        assert target.service("vpp-runtime.service")["is_active"] == "active"
        print("\n".join(line for run in target.runs for line in run.splitlines()
                        if line.startswith(("deployed bundle", "vpp deploy: bundle", "  wheelhouse:"))))
    except AssertionError:
        print("\n".join(target.runs))
        raise
    finally:
        target.stop_all()
