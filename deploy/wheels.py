"""Robot locks and wheelhouses: the robot's packages resolved for the target's platform and
CPython (not the workstation's), and downloaded on the workstation so the target installs
them without a network (``pip install --no-index``).

A profile says what the target is (``deploy/profiles/*.yaml``)::

    python: "3.10"                            the target's CPython
    platform: {arch: aarch64, glibc: "2.35"}  manylinux tags the target's glibc accepts
    lock: requirements/robot-jp6.txt          every robot package and dependency, pinned
    extra_requirements: [cuda-python==12.6.2.post1]   on top of the deploy settings' robot_requirements
    opencv: {prefer: system, numpy: "<2", ...}        the system cv2's numpy bound, resolved into the lock

    python -m vpp_edge.deploy.wheels lock jetson-orin-jp6 --python python3.10   # (re)write the lock
    python -m vpp_edge.deploy.wheels check jetson-orin-jp6                      # every pin has a wheel

Resolution is pip's own (``--platform/--python-version/--implementation/--abi`` with
``--only-binary=:all:``, ``--dry-run --report``): nothing is installed. Markers such as
``python_version < "3.11"`` are evaluated by the Python running pip, so ``lock`` runs pip
in a Python of the target's version. Workstation side (the deploy agent never imports this).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from vpp_edge.errors import VPPError

MANYLINUX_FIRST_GLIBC = 17  # manylinux_2_17 == manylinux2014, the oldest tag current wheels carry
LEGACY_ALIASES = {17: "manylinux2014"}  # PEP 600 names with an older alias pip matches separately


class WheelError(VPPError):
    """A robot lock or wheelhouse cannot be resolved or downloaded."""


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def repo_file(relative: str) -> Path:
    """A file of the source tree this vpp-edge runs from (requirements/*.txt)."""
    spec = importlib.util.find_spec("vpp_edge")
    bases = [Path(list(spec.submodule_search_locations)[0]).parent] if spec and spec.submodule_search_locations else []
    for base in [*bases, Path.cwd()]:
        if (base / relative).is_file():
            return base / relative
    raise WheelError(f"{relative} not found beside the vpp-edge sources (run from the repository)")


def platform_tags(platform: dict[str, Any]) -> list[str]:
    """Every manylinux tag a target with ``platform`` (arch, glibc) installs, newest first.
    pip does not expand a given ``--platform`` to older glibc tags itself."""
    arch = str(platform["arch"])
    glibc_minor = int(str(platform["glibc"]).split(".")[1])
    tags = []
    for minor in range(glibc_minor, MANYLINUX_FIRST_GLIBC - 1, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in LEGACY_ALIASES:
            tags.append(f"{LEGACY_ALIASES[minor]}_{arch}")
    return tags


def target_options(profile: dict[str, Any]) -> list[str]:
    """pip options that resolve for the profile's platform and CPython, wheels only."""
    if "platform" not in profile or "python" not in profile:
        raise WheelError(f"profile '{profile.get('name')}' names no target platform/python: no robot lock for it")
    version = str(profile["python"])
    options = ["--only-binary=:all:", "--python-version", version, "--implementation", "cp",
               "--abi", "cp" + version.replace(".", "")]
    for tag in platform_tags(profile["platform"]):
        options += ["--platform", tag]
    return options


def lock_file(profile: dict[str, Any]) -> Path | None:
    """The profile's robot lock (None: the robot pins come from the workstation lock)."""
    return repo_file(profile["lock"]) if profile.get("lock") else None


def read_pins(text: str) -> dict[str, str]:
    """{normalised name: 'Name==version'} of a requirements/lock text."""
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if m:
            pins[normalize(m.group(1))] = f"{m.group(1)}=={m.group(2)}"
    return pins


def pip_command(python: str | None = None, isolated: bool = False) -> list[str]:
    """pip of ``python`` (default this one). ``isolated``: PyPI alone, no pip.conf or PIP_*
    (the workstation's own constraints and local indexes do not apply to another platform)."""
    return [python or sys.executable, "-m", "pip", *(["--isolated"] if isolated else []),
            "--disable-pip-version-check"]


def _pip(argv: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise WheelError(f"{what}: {argv[0]} -m pip could not run ({exc})") from None
    if proc.returncode:
        detail = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or proc.stderr.splitlines()[-3:]
        raise WheelError(f"{what} failed: {' | '.join(detail)}")
    return proc


def resolve(profile: dict[str, Any], requirements: list[str], python: str | None = None, isolated: bool = False,
            extra: list[str] = (), timeout: float = 600) -> dict[str, str]:
    """{normalised name: version} pip would install on the target for ``requirements``
    (``--dry-run --report``: metadata only, nothing installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        req = Path(tmp) / "requirements.txt"
        req.write_text("\n".join(requirements) + "\n")
        argv = [*pip_command(python, isolated), "install", "--dry-run", "--ignore-installed", "--quiet",
                "--report", str(report), "--target", str(Path(tmp) / "target"), *target_options(profile),
                *extra, "-r", str(req)]
        _pip(argv, timeout, f"resolving for {profile.get('name')} (CPython {profile['python']}, "
                            f"{profile['platform']['arch']})")
        items = json.loads(report.read_text())["install"]
    return {normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def lock_text(profile: dict[str, Any], resolved: dict[str, str], names: dict[str, str]) -> str:
    """The robot lock file: a header saying what it is for, then sorted pins."""
    tags = platform_tags(profile["platform"])
    header = (f"# Robot lock of deploy profile '{profile['name']}': linux {profile['platform']['arch']} "
              f"({tags[-1]} .. {tags[0]}), CPython {profile['python']}.\n"
              f"# Written by `python -m vpp_edge.deploy.wheels lock {profile['name']} --python "
              f"python{profile['python']}`; tests/test_deploy_targets.py checks that every pin has a wheel there.\n"
              "# No torch: the robot runs ONNX Runtime or TensorRT engines.\n"
              + _opencv_note(profile))
    return header + "".join(f"{names.get(k, k)}=={v}\n" for k, v in sorted(resolved.items()))


def lock_requirements(profile: dict[str, Any], robot_requirements: list[str]) -> list[str]:
    """What the profile's lock resolves: the robot packages, the profile's extra ones, and the
    numpy bound of a system cv2 the venv is to import (its bindings are built against the
    distribution's numpy: ``opencv.numpy``), so every pin, the fallback OpenCV wheel included,
    is chosen to work with it."""
    bound = (profile.get("opencv") or {}).get("numpy")
    return [*robot_requirements, *profile.get("extra_requirements", []), *([f"numpy{bound}"] if bound else [])]


def _opencv_note(profile: dict[str, Any]) -> str:
    """The lock's header line on its OpenCV pin when the target prefers the system's cv2."""
    opencv = profile.get("opencv") or {}
    if opencv.get("prefer") != "system":
        return ""
    return (f"# numpy{opencv.get('numpy', '')} for the system's cv2; {opencv['fallback']} is the fallback "
            "the agent installs only without a usable system cv2 (deploy/profiles).\n")


def write_lock(profile: dict[str, Any], robot_requirements: list[str], python: str, isolated: bool = False) -> Path:
    """Resolve the robot packages (and the profile's extra ones) for the target and write its lock."""
    out = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                         capture_output=True, text=True, timeout=60).stdout.strip()
    if not out.startswith(str(profile["python"]) + "."):
        raise WheelError(f"{python} is Python {out or '?'}: the lock of '{profile['name']}' must be resolved by "
                         f"CPython {profile['python']} (markers are evaluated by the Python running pip)")
    requested = lock_requirements(profile, robot_requirements)
    resolved = resolve(profile, requested, python, isolated)
    names = {normalize(re.split(r"[=<>~!;\[ ]", r)[0]): re.split(r"[=<>~!;\[ ]", r)[0] for r in requested}
    path = Path(profile["lock"]) if Path(profile["lock"]).is_absolute() else Path.cwd() / profile["lock"]
    path.write_text(lock_text(profile, resolved, names))
    return path


def find_python(version: str) -> str | None:
    """A CPython ``version`` on this machine (PATH, then pyenv's versions), or None."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))
    for python in filter(None, candidates):
        try:
            out = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if out.startswith(version + "."):
            return python
    return None


def check_lock(profile: dict[str, Any], python: str | None = None, isolated: bool = True) -> dict[str, str]:
    """Every pin of the profile's lock has a wheel for the target, and the pins are the whole
    dependency closure (pip adds nothing). Returns the resolution; raises WheelError.

    pip runs in a CPython of the target's version when one is here (``python``, else
    ``find_python``): it evaluates markers and Requires-Python with its own interpreter.
    Without one, Requires-Python is left to the wheels' cpXY tags (--ignore-requires-python)."""
    path = lock_file(profile)
    if path is None:
        raise WheelError(f"profile '{profile.get('name')}' has no robot lock")
    pins = read_pins(path.read_text())
    python = python or find_python(str(profile["python"]))
    resolved = resolve(profile, list(pins.values()), python, isolated,
                       extra=[] if python else ["--ignore-requires-python"])
    extra = sorted(set(resolved) - set(pins))
    if extra:
        raise WheelError(f"{path}: not the whole closure for {profile['name']}: pip also installs "
                         f"{', '.join(f'{k}=={resolved[k]}' for k in extra)}")
    return resolved


def wheel_pin(path: Path) -> tuple[str, str]:
    """(normalised name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return normalize(name), version


def download_wheelhouse(profile: dict[str, Any], dest: Path, python: str | None = None, isolated: bool = False,
                        timeout: float = 1800) -> list[Path]:
    """The lock's wheels for the target, downloaded into ``dest`` (files already there are
    kept: pip skips them), and the paths of exactly the lock's wheels (older ones left in the
    cache folder do not ship)."""
    path = lock_file(profile)
    if path is None:
        raise WheelError(f"profile '{profile.get('name')}' has no robot lock: nothing to put in a wheelhouse")
    pins = {k: v.split("==", 1)[1] for k, v in read_pins(path.read_text()).items()}

    def present() -> tuple[list[Path], list[str]]:
        wheels = sorted(p for p in dest.glob("*.whl") if pins.get(wheel_pin(p)[0]) == wheel_pin(p)[1])
        return wheels, sorted(set(pins) - {wheel_pin(p)[0] for p in wheels})

    dest.mkdir(parents=True, exist_ok=True)
    wheels, missing = present()
    if missing:  # a complete cache needs no network
        _pip([*pip_command(python, isolated), "download", "--no-deps", "--quiet", *target_options(profile),
              "-d", str(dest), "-r", str(path)], timeout, f"downloading the wheels of {path.name}")
        wheels, missing = present()
    if missing:
        raise WheelError(f"{dest}: no wheel for {', '.join(missing)} after pip download")
    return wheels


def main(argv: list[str] | None = None) -> int:
    from .config import load_config, load_profile

    p = argparse.ArgumentParser(prog="python -m vpp_edge.deploy.wheels", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["lock", "check", "download", "python"])
    p.add_argument("profile", help="deploy profile (name or YAML path); python: a version such as 3.10")
    p.add_argument("--python", help="lock: a CPython of the target's version that runs the resolution")
    p.add_argument("--dest", type=Path, help="download: the wheelhouse folder")
    p.add_argument("--isolated", action="store_true", help="pip --isolated: PyPI only, ignore pip.conf and PIP_*")
    args = p.parse_args(argv)
    if args.action == "python":  # where a CPython of that version is (exit 1: none)
        found = find_python(args.profile)
        print(found or f"no CPython {args.profile} here", file=sys.stdout if found else sys.stderr)
        return 0 if found else 1
    profile = load_profile(args.profile)
    try:
        if args.action == "lock":
            print(write_lock(profile, load_config(profile=args.profile)["robot_requirements"],
                             args.python or f"python{profile['python']}", args.isolated))
        elif args.action == "check":
            print(f"{len(check_lock(profile, isolated=args.isolated))} pins have wheels for {profile['name']}")
        else:
            wheels = download_wheelhouse(profile, args.dest or Path("build/wheelhouse") / profile["name"],
                                         isolated=args.isolated)
            print(f"{len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 2**20:.1f} MiB")
    except WheelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
