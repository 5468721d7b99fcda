"""Checks of the target before anything is changed on it: JetPack (L4T), CUDA, TensorRT,
Python, free memory and disk, the service manager. Each says what it found; a required
check that fails stops the deployment with that line.

Standard library only (runs on the target). Requirements come from a profile
(``deploy/profiles/*.yaml``, shipped inside the bundle as JSON).
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
CUDA_ROOT = Path("/usr/local/cuda")
CPUFREQ = Path("/sys/devices/system/cpu")
PYTHON_MIN = "3.10"  # the robot side (runtime, bridge, deploy agent); the workstation needs 3.11
# L4T release -> JetPack version (NVIDIA's release notes). Longest matching prefix wins.
L4T_TO_JETPACK = {
    "38.4": "7.1", "38.2": "7.0", "38": "7.x",
    "36.4.7": "6.2.1", "36.4.4": "6.2.1", "36.4.3": "6.2", "36.4": "6.1", "36.3": "6.0", "36.2": "6.0 DP",
    "35.6": "5.1.4", "35.5": "5.1.3", "35.4": "5.1.2", "35.3": "5.1.1", "35.2": "5.1", "35.1": "5.0.2",
}


@dataclass
class CheckResult:
    name: str
    ok: bool
    found: str
    required: bool = True

    @property
    def failed(self) -> bool:
        return self.required and not self.ok

    def line(self) -> str:
        mark = "ok  " if self.ok else ("FAIL" if self.required else "warn")
        return f"[{mark}] {self.name:15s} {self.found}"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _matches(version: str, accepted: list[str]) -> bool:
    """``version`` starts with one of the accepted prefixes ("12" accepts 12.2 and 12.6)."""
    parts = version.split(".")
    return any(parts[: len(a.split("."))] == a.split(".") for a in accepted)


def parse_tegra_release(text: str) -> str | None:
    """'36.4.0' from '# R36 (release), REVISION: 4.0, ...' (None if not that format)."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def jetpack_for(l4t: str) -> str | None:
    for prefix in sorted(L4T_TO_JETPACK, key=len, reverse=True):
        if l4t == prefix or l4t.startswith(prefix + "."):
            return L4T_TO_JETPACK[prefix]
    return None


def check_jetpack(profile: dict, release_file: Path = TEGRA_RELEASE) -> CheckResult:
    required = bool(profile.get("require_jetson", False))
    if not release_file.is_file():
        return CheckResult("JetPack", not required, f"not a Jetson ({release_file} absent)"
                           + ("" if required else f"; profile '{profile.get('name')}' does not need one"), required)
    l4t = parse_tegra_release(release_file.read_text(errors="replace"))
    if l4t is None:
        return CheckResult("JetPack", False, f"{release_file}: unrecognised content", required)
    jetpack = jetpack_for(l4t) or "unknown JetPack"
    ok, supported = _in_range(l4t, profile, "l4t")
    found = f"L4T R{l4t} (JetPack {jetpack})"
    if not ok:
        found += f"; profile '{profile.get('name')}' supports L4T {supported}"
        if profile.get("unsupported"):
            found += f": {' '.join(str(profile['unsupported']).split())}"
    return CheckResult("JetPack", ok, found, required)


def _in_range(version: str, profile: dict, key: str) -> tuple[bool, str]:
    """Whether ``version`` is accepted by the profile's ``<key>`` prefixes (["36"] accepts
    36.x), ``<key>_min`` (inclusive) and ``<key>_below`` (exclusive); and the accepted
    range in words."""
    accepted = [str(v) for v in profile.get(key, [])]
    low, below = profile.get(f"{key}_min"), profile.get(f"{key}_below")
    ok = (not accepted or _matches(version, accepted)) \
        and (low is None or _version_tuple(version) >= _version_tuple(str(low))) \
        and (below is None or _version_tuple(version) < _version_tuple(str(below)))
    words = [" or ".join(f"{a}.x" for a in accepted)] if accepted else []
    words += [f">= {low}"] if low is not None else []
    words += [f"< {below}"] if below is not None else []
    return ok, ", ".join(words) or "any"


def cuda_version(root: Path = CUDA_ROOT) -> str | None:
    """CUDA toolkit version from version.json (CUDA >= 11), version.txt or nvcc."""
    try:
        return json.loads((root / "version.json").read_text())["cuda"]["version"]
    except (OSError, ValueError, KeyError):
        pass
    try:
        m = re.search(r"CUDA Version ([\d.]+)", (root / "version.txt").read_text())
        if m:
            return m.group(1)
    except OSError:
        pass
    nvcc = shutil.which("nvcc") or (str(root / "bin/nvcc") if (root / "bin/nvcc").is_file() else None)
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
            m = re.search(r"release ([\d.]+)", out)
            return m.group(1) if m else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def check_cuda(profile: dict, root: Path = CUDA_ROOT) -> CheckResult:
    required = bool(profile.get("require_cuda", False))
    version = cuda_version(root)
    if version is None:
        return CheckResult("CUDA", False, f"not found ({root}/version.json, nvcc)", required)
    ok, supported = _in_range(version, profile, "cuda")
    return CheckResult("CUDA", ok, f"{version}" + ("" if ok else f"; supported: {supported}"), required)


def tensorrt_libraries() -> str | None:
    """Version of the TensorRT C++ libraries (libnvinfer.so.X.Y.Z), if installed system-wide."""
    versions = []
    for path in glob.glob("/usr/lib/*-linux-gnu/libnvinfer.so.*") + glob.glob("/usr/lib/libnvinfer.so.*"):
        m = re.search(r"libnvinfer\.so\.(\d+\.\d+\.\d+)", path)
        if m:
            versions.append(m.group(1))
    return max(versions, key=_version_tuple) if versions else None


def check_tensorrt(profile: dict, python: str) -> CheckResult:
    """TensorRT Python bindings in ``python`` (what engine builds and the GPU path need).
    TensorRT 8.x is refused by the profiles' ``tensorrt_min`` (10.3): its networks are
    implicit-batch unless asked, and the runtime uses the TensorRT 10 tensor API."""
    required = bool(profile.get("require_tensorrt", False))
    code = ("import importlib.util, importlib.metadata as m\n"
            "s = importlib.util.find_spec('tensorrt')\n"
            "print(m.version('tensorrt') if s else '')")
    try:
        bindings = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        bindings = ""
    libs = tensorrt_libraries()
    fallback = ("; the GPU path is required: install JetPack's TensorRT Python bindings for this Python "
                "(sudo apt-get install python3-libnvinfer) or deploy with --allow-cpu-fallback" if required
                else "; engines cannot be built: the runtime falls back to ONNX Runtime")
    if not bindings:
        where = f"libraries {libs} present but no Python bindings for {python}" if libs else f"not importable by {python}"
        return CheckResult("TensorRT", False, f"{where}{fallback}", required)
    ok, supported = _in_range(bindings, profile, "tensorrt")
    return CheckResult("TensorRT", ok, f"{bindings} (Python bindings, {python})"
                       + ("" if ok else f"; supported: {supported}{fallback}"), required)


def check_python(profile: dict, python: str) -> CheckResult:
    try:
        out = subprocess.run([python, "-c", "import sys, platform; print(platform.python_version(), sys.executable)"],
                             capture_output=True, text=True, timeout=60)
        version, exe = out.stdout.split()
    except (OSError, subprocess.SubprocessError, ValueError):
        return CheckResult("Python", False, f"{python}: cannot run it")
    minimum = str(profile.get("python_min", PYTHON_MIN))
    ok = _version_tuple(version) >= _version_tuple(minimum)
    return CheckResult("Python", ok, f"{version} ({exe})" + ("" if ok else f"; vpp-edge needs >= {minimum}"))


def meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo in MiB."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[key] = int(fields[0]) // 1024
    return out


def check_memory(profile: dict, path: Path = Path("/proc/meminfo")) -> CheckResult:
    """Available memory: on a Jetson the GPU shares it, so it bounds engines + activations too."""
    minimum = int(profile.get("min_free_memory_mb", 0))
    try:
        info = meminfo(path)
    except OSError as exc:
        return CheckResult("memory", False, f"cannot read {path}: {exc}")
    free, total = info.get("MemAvailable", 0), info.get("MemTotal", 0)
    ok = free >= minimum
    return CheckResult("memory", ok, f"{free} MiB available of {total} MiB" + ("" if ok else f"; need >= {minimum} MiB"))


def check_disk(profile: dict, root: Path) -> CheckResult:
    minimum = int(profile.get("min_free_disk_mb", 0))
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free // 2**20
    ok = free >= minimum
    return CheckResult("disk", ok, f"{free} MiB free at {probe}" + ("" if ok else f"; need >= {minimum} MiB"))


def check_service_manager(command: list[str]) -> CheckResult:
    """The service manager answers and is running: `systemctl is-system-running` prints
    'running' or 'degraded' (some other unit failed) on a booted systemd host, 'offline'
    in a container without systemd."""
    try:
        out = subprocess.run([*command, "is-system-running"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return CheckResult("service manager", False, f"{' '.join(command)}: cannot run ({exc})")
    state = (out.stdout.strip() or out.stderr.strip() or "no answer").splitlines()[0]
    ok = state in ("running", "degraded", "starting", "initializing")
    hint = "" if ok else ("; systemd is not running here: pass --service-manager with a systemctl-compatible "
                          "command (see README, 'Deploying to a Jetson')")
    return CheckResult("service manager", ok, f"{' '.join(command)} is-system-running: {state}{hint}")


def nvpmodel_mode(nvpmodel: str = "nvpmodel") -> str | None:
    """The power mode's name from `nvpmodel -q` ('NV Power Mode: MAXN' then its number)."""
    try:
        out = subprocess.run([nvpmodel, "-q"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"NV Power Mode:\s*(\S+)", out)
    return m.group(1) if m else None


def clocks_locked(cpufreq: Path = CPUFREQ) -> bool | None:
    """Whether `jetson_clocks` is on: it pins every online CPU's minimum frequency to its
    maximum (sysfs, readable without root; `jetson_clocks --show` needs root). None: no cpufreq."""
    cpus = sorted(cpufreq.glob("cpu[0-9]*/cpufreq"))
    if not cpus:
        return None
    try:
        return all((c / "scaling_min_freq").read_text().strip() == (c / "cpuinfo_max_freq").read_text().strip()
                   for c in cpus)
    except OSError:
        return None


def check_power(profile: dict, nvpmodel: str = "nvpmodel", cpufreq: Path = CPUFREQ) -> CheckResult:
    """Power mode (`nvpmodel -q`) and `jetson_clocks`: a warning, never a failure, when the
    mode is not one of the profile's ``power.max_modes`` or the clocks float."""
    max_modes = [str(m) for m in (profile.get("power") or {}).get("max_modes", [])]
    mode = nvpmodel_mode(nvpmodel)
    if mode is None:
        return CheckResult("power mode", not max_modes, f"{nvpmodel} -q: no answer"
                           + ("; cannot tell whether the Jetson runs at full power" if max_modes else ""), False)
    locked = clocks_locked(cpufreq)
    clocks = {True: "jetson_clocks on", False: "jetson_clocks off (clocks scale with load)",
              None: "jetson_clocks unknown"}[locked]
    ok = (not max_modes or mode in max_modes) and locked is not False
    hint = "" if ok else (f"; latency figures assume {'/'.join(max_modes) or 'the maximum mode'} with fixed clocks: "
                          "sudo nvpmodel -m 0 && sudo jetson_clocks")
    return CheckResult("power mode", ok, f"{mode}, {clocks}{hint}", False)


def cv2_probe_file() -> Path:
    """The runtime's cv2 probe (runtime/cameras/cv2_probe.py, standard library only), beside
    this package as it ships (vpp_edge/deploy -> vpp_edge/runtime/cameras) and in the source
    tree (deploy -> runtime/cameras, pyproject's package-dir)."""
    return Path(__file__).resolve().parent.parent / "runtime" / "cameras" / "cv2_probe.py"


def opencv_facts(python: str) -> dict:
    """What ``python`` imports as cv2 (cv2_probe's JSON: version, file, GStreamer, venv or
    system site-packages); ``{"importable": False, "error": ...}`` when it cannot say."""
    try:
        proc = subprocess.run([python, str(cv2_probe_file())], capture_output=True, text=True, timeout=120)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"importable": False, "error": f"{python}: the cv2 probe did not run"}


@functools.cache
def _cv2_probe():
    """runtime/cameras/cv2_probe.py loaded by its path: its package's __init__ imports numpy,
    which the agent's Python (before the venv exists) may not have."""
    spec = importlib.util.spec_from_file_location("_vpp_cv2_probe", cv2_probe_file())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cv2_line(facts: dict) -> str:
    """'cv2 4.8.0 from PATH (system site-packages, GStreamer: yes)' (cv2_probe.summary)."""
    return _cv2_probe().summary(facts)


def system_cv2_usable(opencv: dict, facts: dict) -> tuple[bool, str]:
    """Whether the runtime's venv is to import the system's cv2 (a profile's ``opencv``:
    prefer system, optionally only with GStreamer) given what the system Python imports,
    and why, in words."""
    if opencv.get("prefer") != "system":
        return False, f"profile prefers the {opencv.get('fallback', 'wheel')} wheel"
    if not facts.get("importable"):
        return False, f"the system's cv2 is not importable ({facts.get('error', '?')})"
    if facts.get("venv"):
        return False, "the system Python's cv2 is a venv's"
    if opencv.get("require_gstreamer") and not facts.get("gstreamer"):
        return False, f"the system's cv2 {facts.get('version')} ({facts.get('file')}) has no GStreamer"
    return True, f"the system's cv2 {facts.get('version')} ({facts.get('file')}) has GStreamer"


def check_opencv(profile: dict, python: str, facts: dict | None = None) -> CheckResult:
    """Which cv2 ``python`` imports (path, version, GStreamer), as a report that never fails
    on its own (the robot packages' import check requires cv2): a warning when it does not
    import, or has no GStreamer where the profile wants the system's (Jetson: the cameras
    then decode JPEG on the CPU)."""
    facts = facts if facts is not None else opencv_facts(python)
    wants = bool((profile.get("opencv") or {}).get("require_gstreamer"))
    ok = bool(facts.get("importable")) and (bool(facts.get("gstreamer")) or not wants)
    hint = "" if ok or not facts.get("importable") else "; --cameras auto decodes JPEG on the CPU"
    return CheckResult("OpenCV", ok, f"{cv2_line(facts)} in {python}{hint}", required=False)


# Where the checks look on the target; a profile's ``paths`` may move them (a container
# with the host's files mounted elsewhere, or a rehearsal with stand-in vendor files).
TARGET_PATHS = {"tegra_release": str(TEGRA_RELEASE), "cuda_root": str(CUDA_ROOT), "cpufreq": str(CPUFREQ),
                "nvpmodel": "nvpmodel"}


def run_checks(profile: dict, python: str, root: Path, service_manager: list[str]) -> list[CheckResult]:
    paths = {**TARGET_PATHS, **(profile.get("paths") or {})}
    results = [check_jetpack(profile, Path(paths["tegra_release"])), check_cuda(profile, Path(paths["cuda_root"])),
               check_tensorrt(profile, python), check_python(profile, python), check_memory(profile),
               check_disk(profile, root), check_service_manager(service_manager)]
    if profile.get("require_jetson"):
        results.append(check_power(profile, paths["nvpmodel"], Path(paths["cpufreq"])))
    if profile.get("opencv"):  # what the runtime's venv would see of the system's OpenCV: the env step decides
        results.append(check_opencv(profile, python))
    return results


def import_check(python: str, modules: list[str]) -> CheckResult:
    """The runtime's Python imports every robot-side module (versions reported)."""
    code = ("import importlib.util, importlib.metadata as m, sys, json\n"
            "out = {}\n"
            "for name, dist in (a.split('=') for a in sys.argv[1:]):\n"
            "    ok = importlib.util.find_spec(name) is not None\n"
            "    try: v = m.version(dist) if ok else None\n"
            "    except m.PackageNotFoundError: v = 'from the system (no pip metadata)'\n"
            "    out[name] = v\n"
            "print(json.dumps(out))")
    try:
        proc = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True, timeout=120)
        found = json.loads(proc.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return CheckResult("robot packages", False, f"{python}: cannot run the import check")
    missing = [k for k, v in found.items() if v is None]
    if missing:
        return CheckResult("robot packages", False, f"missing in {python}: {', '.join(missing)} "
                           "(install requirements-robot.txt from the bundle)")
    return CheckResult("robot packages", True, ", ".join(f"{k} {v}" for k, v in found.items()))


if __name__ == "__main__":  # quick look on a machine: python -m vpp_edge.deploy.checks
    for r in run_checks({"name": "any"}, sys.executable, Path.cwd(), ["systemctl"]):
        print(r.line())
