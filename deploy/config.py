"""Deployment settings: ``deploy/defaults.yaml``, overridden by a user YAML, then by the
command line; and the target profiles (``deploy/profiles/*.yaml``)."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

from vpp_edge.errors import ConfigError

HERE = Path(__file__).parent
DEFAULTS = HERE / "defaults.yaml"
PROFILES = HERE / "profiles"


DeployConfigError = ConfigError  # a deploy setting or profile is unknown or invalid: the one ConfigError (issue 21)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise DeployConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise DeployConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise DeployConfigError(f"{path}: expected a mapping of settings")
    return data


def _merge(base: dict[str, Any], override: dict[str, Any], where: str, prefix: str = "") -> None:
    """Deep-merge ``override`` into ``base``, refusing keys the defaults do not have."""
    for key, value in override.items():
        if key not in base:
            close = difflib.get_close_matches(str(key), list(base), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise DeployConfigError(f"{where}: unknown deploy setting '{prefix}{key}'{hint}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            _merge(base[key], value, where, f"{prefix}{key}.")
        else:
            base[key] = value


def load_config(path: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Defaults, then the YAML at ``path``, then ``overrides`` whose value is not None."""
    cfg = _read_yaml(DEFAULTS)
    if path:
        _merge(cfg, _read_yaml(Path(path)), str(path))
    _merge(cfg, {k: v for k, v in overrides.items() if v is not None}, "command line")
    cfg["profile"] = load_profile(cfg["profile"])
    if cfg["profile"].get("require_tensorrt") and not cfg["allow_cpu_fallback"]:
        for section in ("runtime", "selftest"):  # the GPU path, or a loud failure: never a silent CPU fallback
            if cfg[section]["backend"] == "auto":
                cfg[section]["backend"] = "tensorrt"
    if cfg["venv_python"] is None:  # the Python that sees the target's system packages (JetPack's TensorRT)
        cfg["venv_python"] = cfg["profile"].get("system_python", "python3")
    if not str(cfg["install_root"]).startswith("/"):
        raise DeployConfigError(f"install_root must be an absolute path on the target, got '{cfg['install_root']}'")
    if cfg["sudo"] not in ("auto", "always", "never"):
        raise DeployConfigError(f"sudo must be auto, always or never, got '{cfg['sudo']}'")
    chosen = cfg["artifact_precisions"]
    if not (chosen in (None, "all") or isinstance(chosen, list) and all(isinstance(p, str) for p in chosen)):
        raise DeployConfigError(f"artifact_precisions must be null, 'all' or a list of precisions, got {chosen!r}")
    return cfg


def load_profile(name_or_path: str | dict) -> dict[str, Any]:
    """A profile by name (deploy/profiles/<name>.yaml) or YAML path; dicts pass through."""
    if isinstance(name_or_path, dict):
        return copy.deepcopy(name_or_path)
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
            raise DeployConfigError(f"target profile '{name_or_path}' unknown; known: {', '.join(known)}")
    profile = _read_yaml(path)
    profile.setdefault("name", path.stem)
    base = profile.pop("extends", None)
    if base:  # a profile that changes a few fields of another (by name or path, relative to this one)
        parent = load_profile(base if not str(base).endswith(".yaml") else str(path.parent / base))
        profile = {**parent, **profile}
    return profile
