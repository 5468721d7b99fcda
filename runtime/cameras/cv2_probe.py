"""Which OpenCV (``cv2``) a Python imports: its version, file, the distribution that installed
it, whether it comes from the environment's own site-packages or from the system's (a venv
made with ``--system-site-packages`` sees JetPack's OpenCV there), and whether it was built
with GStreamer (the hardware JPEG decode of ``--cameras auto`` on a Jetson).

Standard library only, and runnable as a script that prints the facts as JSON, so the
deploy agent asks the runtime's Python before anything else is installed in it
(``python cv2_probe.py``: deploy/checks.py). The runtime's camera probe reads the same facts
in-process (cameras/gstreamer.py): one definition of "this cv2 has GStreamer".
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

GSTREAMER_LINE = re.compile(r"GStreamer:\s*(\w+)")  # in cv2.getBuildInformation()'s "Video I/O" section


def has_gstreamer(build_information: str) -> bool:
    """Whether OpenCV's build information says its video I/O has the GStreamer backend."""
    m = GSTREAMER_LINE.search(build_information)
    return bool(m) and m.group(1).upper() == "YES"


def distribution_of(module: str) -> str | None:
    """The installed distribution that provides top-level ``module`` (None: no metadata, as
    for JetPack's and Debian's OpenCV, which apt installs without a dist-info)."""
    import importlib.metadata as metadata

    names = metadata.packages_distributions().get(module) or []
    return names[0] if names else None


def in_environment(path: str) -> bool:
    """Whether ``path`` lies in this Python's own prefix while that prefix is a venv's (the
    venv installed it) rather than in the base Python's site-packages seen through
    ``--system-site-packages``."""
    if sys.prefix == sys.base_prefix:
        return False
    return Path(sys.prefix).resolve() in Path(path).resolve().parents


def describe(cv2: Any) -> dict[str, Any]:
    """The facts of an imported ``cv2`` module."""
    file = str(getattr(cv2, "__file__", None) or "")
    return {"importable": True, "version": str(getattr(cv2, "__version__", "?")), "file": file,
            "gstreamer": has_gstreamer(cv2.getBuildInformation()), "distribution": distribution_of("cv2"),
            "venv": in_environment(file) if file else False}


def probe() -> dict[str, Any]:
    """Import cv2 here and describe it; ``{"importable": False, "error": ...}`` when the import
    fails (e.g. bindings built against numpy 1.x under numpy 2: an ImportError)."""
    try:
        import cv2
    except Exception as exc:  # an extension that does not load raises ImportError, AttributeError, ...
        return {"importable": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    return describe(cv2)


def summary(facts: dict[str, Any]) -> str:
    """One line: 'cv2 4.8.0 from /usr/lib/... (system site-packages, GStreamer: yes)'."""
    if not facts.get("importable"):
        return f"cv2 not importable ({facts.get('error', 'no module named cv2')})"
    where = "the venv's" if facts["venv"] else "system"
    dist = f", {facts['distribution']}" if facts.get("distribution") else ""
    return (f"cv2 {facts['version']} from {facts['file']} ({where} site-packages{dist}, "
            f"GStreamer: {'yes' if facts['gstreamer'] else 'no'})")


if __name__ == "__main__":
    del sys.path[0]  # run as a file: this folder (cameras/*.py) must not shadow anything the import needs
    print(json.dumps(probe()))
