"""File helpers: folders written all at once, JSON read with errors that name the file."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; when the block ends without an
    exception it replaces ``target`` (renames, never merges), otherwise it is removed.
    An interrupted or failed write never leaves a half-written ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; artifacts are read by services
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path, error: type[Exception], hint: str) -> dict:
    """A JSON object from ``path``; ``error`` names the file (missing: with ``hint``) instead of a traceback."""
    if not path.is_file():
        raise error(f"{path}: not found ({hint})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def named_config(name_or_path: str | Path, folder: Path, error: type[Exception], what: str) -> Path:
    """A config file: a bare name is ``folder/<name>.yaml`` (an unknown one raises ``error``
    with a did-you-mean and the known names); anything with a suffix is a path as given."""
    path = Path(name_or_path)
    if path.suffix:
        return path
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    if path.name not in known:
        close = difflib.get_close_matches(path.name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise error(f"unknown {what} '{name_or_path}'{hint} (available: {', '.join(known)})")
    return folder / f"{path.name}.yaml"
