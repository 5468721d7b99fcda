"""The deployment bundle: what the robot gets, as one folder with a checksum manifest.

    code/vpp_edge/...          the runtime code (no training/export-to-ONNX code, no torch)
    artifact/...               the export artifact (manifest, tokenizer, the ONNX precisions the
                               target runs: see shipped_precisions), engines excluded
    units/*.service            rendered systemd units
    config/deploy.json         the settings the target-side agent reads
    bin/vpp, bin/vpp-agent     launchers that put this release's code on PYTHONPATH
    requirements-robot.txt     pinned robot-side packages: the profile's robot lock (resolved for
                               the target's platform and CPython, e.g. requirements/robot-jp6.txt),
                               else pinned from requirements/lock.txt
    constraints.txt            that lock, so their dependencies get the same pins
    wheelhouse/*.whl           the robot lock's wheels for the target (profiles with wheelhouse:
                               true, unless --online): the target installs them with --no-index
    BUNDLE.json, SHA256SUMS    every file's SHA-256; the bundle id is the hash of that table

Deterministic: the same code, artifact and settings give the same bytes and the same id,
which is how a re-run finds there is nothing to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from vpp_edge import __version__, precisions
from vpp_edge.runtime.manifest import MANIFEST_FILE, manifest_precisions, read_manifest
from vpp_edge.files import atomic_dir

from .checksums import BUNDLE_FILE, SUMS_FILE, BundleError, bundle_id, manifest_text, sha256_file, sums_text
from .units import render_units
from .wheels import WheelError, lock_file, normalize, read_pins, repo_file

SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".tmp", ".swp")
ARTIFACT_DIR = "artifact/"
ARTIFACT_EXCLUDE = ("engines/",)  # built on the target: engines are tied to its GPU and TensorRT

VPP_LAUNCHER = """#!/bin/sh
# vpp-edge command of this release (written by `vpp deploy`): this release's code, the runtime's Python.
here=$$(cd -P -- "$$(dirname -- "$$0")/.." && pwd)
export PYTHONPATH="$$here/code"
export PYTHONSAFEPATH=1  # the caller's folder never shadows this release's code
exec ${python} -m ${module} "$$@"
"""


@dataclass(frozen=True)
class BundleFile:
    path: str  # relative, posix
    sha256: str
    size: int
    executable: bool
    source: Path | None = None  # file to copy (hard-linked when possible), or
    data: bytes | None = None  # generated content

    def entry(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "executable": self.executable}


@dataclass
class Bundle:
    files: dict[str, BundleFile] = field(default_factory=dict)
    artifact: Path | None = None  # source folder of the artifact/ entries

    def artifact_files(self) -> list[str]:
        """Paths, relative to the artifact folder, of the artifact files sent as they are
        (rsync --files-from); the shipped manifest is generated and travels in the bundle."""
        return sorted(p[len(ARTIFACT_DIR):] for p, f in self.files.items()
                      if p.startswith(ARTIFACT_DIR) and f.source is not None)

    @property
    def id(self) -> str:
        return bundle_id(self.table())

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    def table(self) -> dict[str, dict[str, Any]]:
        return {p: f.entry() for p, f in self.files.items()}

    def add_file(self, path: str, source: Path, sha256: str | None = None) -> None:
        st = source.stat()
        self.files[path] = BundleFile(path, sha256 or sha256_file(source), st.st_size, bool(st.st_mode & 0o111),
                                      source=source)

    def add_data(self, path: str, data: str | bytes, executable: bool = False) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.files[path] = BundleFile(path, hashlib.sha256(raw).hexdigest(), len(raw), executable, data=raw)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(f"code package '{name}' not found in this Python (is vpp-edge installed?)")
    return Path(list(spec.submodule_search_locations)[0])


def code_packages(exclude: list[str]) -> list[tuple[str, Path]]:
    """(package, folder) pairs to copy whole: the folders pyproject's package-dir maps
    (nested ones come with their parent), or the installed vpp_edge folder."""
    home = _package_dir("vpp_edge")
    pyproject = home.parent / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib  # the workstation (Python >= 3.11)
        except ImportError:  # Python 3.10 (the robot-side tests): the same parser, as a package
            import tomli as tomllib

        mapping = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
        items = [(name, (home.parent / folder).resolve()) for name, folder in mapping.items()]
    else:  # an installed wheel: every subpackage lives inside the vpp_edge folder
        items = [("vpp_edge", home.resolve())]
    keep = [(n, d) for n, d in items if not _excluded(n, exclude)]
    return sorted((n, d) for n, d in keep if not any(o in d.parents for _, o in keep))


def _excluded(package: str, exclude: list[str]) -> bool:
    return any(package == e or package.startswith(e + ".") for e in exclude)


def _tree(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and not f.endswith(SKIP_SUFFIXES)]
    return out


def robot_requirements(names: list[str], lock: Path) -> str:
    """requirements-robot.txt: ``names`` pinned to the versions in the lock file."""
    pins = read_pins(lock.read_text())
    missing = [n for n in names if normalize(n) not in pins]
    if missing:
        raise BundleError(f"{lock}: no pin for robot requirement(s) {', '.join(missing)}")
    lines = [pins[normalize(n)] for n in names]
    return (f"# Robot-side packages of vpp-edge, pinned from {lock.name} (written by `vpp deploy`).\n"
            "# No torch: the runtime runs the artifact's ONNX graphs (ONNX Runtime) or TensorRT engines.\n"
            + "\n".join(lines) + "\n")


def find_lock_file() -> Path:
    """requirements/lock.txt of the source tree this vpp-edge runs from."""
    try:
        return repo_file("requirements/lock.txt")
    except WheelError as exc:
        raise BundleError(str(exc)) from None


def robot_lock(cfg: dict[str, Any], lock: Path | None = None) -> tuple[str, str]:
    """(requirements-robot.txt, constraints.txt): the profile's robot lock as both (every
    pin, resolved for the target), else the robot packages pinned from the workstation lock
    and that lock as constraints."""
    profile_lock = lock_file(cfg["profile"])
    if profile_lock is not None:
        missing = [n for n in cfg["robot_requirements"] if normalize(n) not in read_pins(profile_lock.read_text())]
        if missing:
            raise BundleError(f"{profile_lock}: no pin for robot requirement(s) {', '.join(missing)} "
                              f"(python -m vpp_edge.deploy.wheels lock {cfg['profile']['name']})")
        text = profile_lock.read_text()
        return text, text
    lock = lock or find_lock_file()
    return robot_requirements(cfg["robot_requirements"], lock), lock.read_text()


def offline(cfg: dict[str, Any]) -> bool:
    """Whether the target installs from the bundle's wheelhouse (``--no-index``)."""
    return bool(cfg["profile"].get("wheelhouse")) and not cfg["online"] and not cfg["python"]


def shipped_precisions(cfg: dict[str, Any]) -> list[str] | None:
    """The artifact's ONNX precision folders the target needs (None: every one).

    ``artifact_precisions`` when set (``all``: every one); else fp32 (ONNX Runtime's
    fallback and the source of FP16 engines), the sources of the TensorRT engines built
    there, and the precisions the runtime and the self-test ask for. At paper scale each
    folder left home is gigabytes the robot's disk does not hold for nothing."""
    chosen = cfg["artifact_precisions"]  # checked by load_config
    if chosen == "all":
        return None
    if chosen is not None:
        return sorted(set(chosen))
    sources = precisions.engine_sources()
    wanted = {precisions.reference(), *(sources.get(p, p) for p in cfg["engines"]["precisions"])}
    wanted |= {p for p in (cfg["runtime"]["precision"], cfg["selftest"]["precision"]) if p}
    return sorted(wanted)


def add_artifact(bundle: Bundle, artifact: Path, precisions: list[str] | None = None) -> None:
    """The artifact without engines (built on the target) and with only ``precisions``' ONNX
    folders (None: all), under a manifest that lists what is shipped. Graph files must match
    the artifact manifest (a file changed after export fails here, before anything is uploaded)."""
    manifest = read_manifest(artifact)
    available = manifest_precisions(manifest)
    keep = available if precisions is None else precisions
    unknown = sorted(set(keep) - set(available))
    if unknown:
        raise BundleError(f"{artifact}: no {', '.join(unknown)} graphs to ship (precisions here: "
                          f"{', '.join(available)}); re-export with them or change artifact_precisions")
    left_home = tuple(f"{p}/" for p in available if p not in keep)
    graphs = {key: entry for key, entry in manifest["graphs"].items() if not key.startswith(left_home)}
    expected = {}
    for key, entry in graphs.items():
        expected[entry["file"]] = (key, entry["sha256"])
        for extra in entry.get("external_data", []):
            expected[extra["file"]] = (key, extra["sha256"])
    for path in _tree(artifact):
        rel = path.relative_to(artifact).as_posix()
        if rel.startswith(ARTIFACT_EXCLUDE + left_home) or rel == MANIFEST_FILE:
            continue
        bundle.add_file(f"artifact/{rel}", path)
        if rel in expected and bundle.files[f"artifact/{rel}"].sha256 != expected[rel][1]:
            raise BundleError(f"{path}: sha256 does not match the artifact manifest for '{expected[rel][0]}' "
                              "(file changed after export; re-export the artifact)")
    missing = sorted(set(expected) - {p[len("artifact/"):] for p in bundle.files if p.startswith("artifact/")})
    if missing:
        raise BundleError(f"{artifact}: files listed in its manifest are missing: {', '.join(missing[:5])}")
    shipped = {**manifest, "graphs": graphs, "engines": {}}  # engines are built on the target
    bundle.add_data(f"artifact/{MANIFEST_FILE}", json.dumps(shipped, indent=2))


def target_settings(cfg: dict[str, Any], units: list[str]) -> dict[str, Any]:
    """config/deploy.json: what the agent on the target needs (no workstation paths)."""
    keys = ("install_root", "python", "venv_python", "service_manager", "unit_dir", "sudo", "robot", "keep_releases", "engines",
            "selftest", "health", "timeouts", "profile", "allow_cpu_fallback")
    modules = [*cfg["robot_modules"], *cfg["profile"].get("robot_modules", [])]
    return {"vpp_edge_version": __version__, **{k: cfg[k] for k in keys}, "robot_modules": modules,
            "offline": offline(cfg), "units": units}


def plan_bundle(cfg: dict[str, Any], artifact: str | Path, user: str, lock: Path | None = None,
                wheels: list[Path] = ()) -> Bundle:
    """Everything the bundle will hold, hashed, without writing anything. ``wheels``: the
    wheelhouse (``download_wheelhouse``) of an offline install."""
    artifact = Path(artifact)
    bundle = Bundle(artifact=artifact)
    for package, src in code_packages(cfg["code_exclude"]):
        dest = "code/" + package.replace(".", "/")
        for path in _tree(src):
            rel = f"{dest}/{path.relative_to(src).as_posix()}"
            if not _excluded(".".join(Path(rel).parent.parts[1:]), cfg["code_exclude"]):
                bundle.add_file(rel, path)
    add_artifact(bundle, artifact, shipped_precisions(cfg))
    units = render_units(cfg, user)
    for name, text in units.items():
        bundle.add_data(f"units/{name}", text)
    bundle.add_data("config/deploy.json", json.dumps(target_settings(cfg, list(units)), indent=1, sort_keys=True) + "\n")
    runtime_python = cfg["python"] or f"{cfg['install_root']}/venv/bin/python"
    launcher = Template(VPP_LAUNCHER)
    bundle.add_data("bin/vpp", launcher.substitute(python=shlex.quote(runtime_python), module="vpp_edge.cli"),
                    executable=True)
    # The agent runs before the runtime's venv exists: the configured Python, or the system's.
    bundle.add_data("bin/vpp-agent", launcher.substitute(python=shlex.quote(cfg["python"] or cfg["venv_python"]),
                                                         module="vpp_edge.deploy.remote"), executable=True)
    requirements, constraints = robot_lock(cfg, lock)
    bundle.add_data("requirements-robot.txt", requirements)
    bundle.add_data("constraints.txt", constraints)  # pins the dependencies of the dependencies too
    for wheel in wheels:
        bundle.add_file(f"wheelhouse/{wheel.name}", wheel)
    return bundle


def write_bundle(bundle: Bundle, out: str | Path, with_artifact: bool = True) -> Path:
    """Materialise the bundle at ``out`` (replaced atomically). Files are copied with their
    mtime, so rsync --link-dest on the target shares unchanged files between releases.

    ``with_artifact=False`` leaves out artifact/'s files but its generated manifest
    (gigabytes for a full VPP): `vpp deploy` sends them straight from the artifact folder
    (rsync --files-from) and the target checks them against the same BUNDLE.json."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        for rel, f in sorted(bundle.files.items()):
            if not with_artifact and rel.startswith(ARTIFACT_DIR) and f.source is not None:
                continue
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if f.data is not None:
                dest.write_bytes(f.data)
                dest.chmod(0o755 if f.executable else 0o644)
                continue
            shutil.copy2(f.source, dest)
            if sha256_file(dest) != f.sha256:  # the source changed while we were bundling
                raise BundleError(f"{f.source}: changed while the bundle was written; run the deploy again")
        table = bundle.table()
        (tmp / BUNDLE_FILE).write_text(manifest_text(table))
        (tmp / SUMS_FILE).write_text(sums_text(table))
    return out
