"""Configuration files that fail loudly: YAML read with one-line errors, and user layers
merged over defaults that refuse unknown keys at any depth, naming the key and the
closest allowed one (a misspelled ``gates: {fp32_cosin: 0.5}`` must not run with the
default gates). Standard library + PyYAML only, so commands check their inputs before
importing torch."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, Mapping

from vpp_edge.errors import ConfigError


def closest(name: str, allowed: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the allowed name nearest to ``name``, or ``""``."""
    match = difflib.get_close_matches(str(name), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown(what: str, name: str, allowed: Iterable[str]) -> ConfigError:
    """The error for an unknown ``name``: the closest allowed one, then all of them."""
    allowed = sorted(str(a) for a in allowed)
    return ConfigError(f"unknown {what} '{name}'{closest(name, allowed)}; allowed: {', '.join(allowed)}")


def check_keys(data: object, required: Iterable[str], where: str, optional: Iterable[str] = (),
               error: type[Exception] = ConfigError) -> dict[str, Any]:
    """``data`` when it is a mapping holding every ``required`` key and nothing beyond
    ``required`` and ``optional``; else ``error`` naming ``where``, the keys missing and the
    ones unknown (each with its closest allowed name). The one check of a config section's
    keys (robot descriptions, bridge and robot configs, runtime configs)."""
    required, optional = tuple(required), tuple(optional)
    if not isinstance(data, Mapping):
        raise error(f"{where}: expected a mapping with {', '.join(required) or 'no keys'}")
    allowed = (*required, *optional)
    missing, extra = [k for k in required if k not in data], sorted(str(k) for k in data if k not in allowed)
    if missing or extra:
        hints = "".join(closest(k, allowed) for k in extra[:1])
        raise error(f"{where}: keys differ (missing {sorted(missing)}, unknown {extra}){hints}")
    return dict(data)


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML mapping from ``path`` (an empty file is ``{}``); :class:`ConfigError` naming
    the file and the line for a missing file, a syntax error or a top level that is not a mapping."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} file {path}: cannot read it ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what} file {path}{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def merge(defaults: Mapping[str, Any], layer: Mapping[str, Any] | None, what: str = "key",
          where: str = "") -> dict[str, Any]:
    """``defaults`` updated by ``layer``; nested mappings merge key by key. A key of
    ``layer`` missing from ``defaults`` (at any depth) raises :class:`ConfigError` naming
    its dotted path, as does a mapping given where a value belongs, or the reverse."""
    out = dict(defaults)
    for key, value in (layer or {}).items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in defaults:
            raise unknown(what, dotted, (f"{where}.{k}" if where else k for k in defaults))
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' takes a mapping of {', '.join(sorted(defaults[key]))}, "
                                  f"got {value!r}")
            out[key] = merge(defaults[key], value, what, dotted)
        elif isinstance(value, dict):
            raise ConfigError(f"'{dotted}' takes a value, not a mapping ({value!r})")
        else:
            out[key] = value
    return out
