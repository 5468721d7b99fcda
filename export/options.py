"""Export options: ``defaults.yaml``, then a user YAML file, then keyword overrides.
No torch here, so ``vpp export --config`` is checked before the heavy imports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vpp_edge.config_schema import merge, read_yaml
from vpp_edge.errors import ConfigError

from vpp_edge import precisions

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")


def load_options(path: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """The export options; a key of the file or the overrides that the defaults do not
    have, at any depth, is a :class:`ConfigError` naming it and the closest allowed key."""
    options = yaml.safe_load(DEFAULTS_FILE.read_text())
    options = merge(options, read_yaml(path, "export config") if path else {}, "export option")
    options = merge(options, overrides, "export option")
    # Any registered precision: the ones vpp export does not write itself (int8_ov) are added
    # to the artifact it committed when their tools are installed (export/openvino_int8.py).
    allowed, reference = precisions.names(), precisions.reference()
    bad = [p for p in options["precisions"] if p not in allowed]
    if bad or reference not in options["precisions"]:
        raise ConfigError(f"precisions must include {reference} and come from {list(allowed)}, "
                          f"got {options['precisions']}")
    return options


def names_precisions(path: str | Path | None) -> bool:
    """Whether the export config file at ``path`` sets ``precisions``."""
    return bool(path) and "precisions" in (read_yaml(path, "export config") or {})


def precisions_for(options: dict[str, Any], weight_bytes: int, named: bool) -> list[str]:
    """The precisions to export: ``options["precisions"]`` when the user ``named`` them
    (--precisions, an export config) or the model is small; for a model whose weights reach
    ``large_model.weight_bytes``, ``large_model.precisions`` (what its targets run, see
    defaults.yaml)."""
    large = options["large_model"]
    if named or weight_bytes < int(large["weight_bytes"]):
        return list(options["precisions"])
    return list(large["precisions"])
