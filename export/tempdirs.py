"""Temporary export folders that outlive a killed export, and signals that end one cleanly.

An export writes into a hidden sibling of its target (:func:`vpp_edge.files.atomic_dir`:
``.<name>.<8 random characters>``) and renames it into place at the end. Ctrl-C removes it;
SIGKILL or the kernel's out-of-memory killer cannot, and at paper scale such a leftover
holds gigabytes. So the export writes an owner record into its folder (host, process id,
the process's start time), and the next export to the same place removes the folders whose
owner is gone. Folders it cannot prove its own (another host, no record) are reported,
never removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

OWNER_FILE = ".vpp-export-owner.json"


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat),
    which tells a live owner from a later process that reuses its id; None if not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def claim(folder: Path) -> None:
    """Record this process as the owner of the temporary ``folder``."""
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}
    (folder / OWNER_FILE).write_text(json.dumps(owner))


def release(folder: Path) -> None:
    """Remove the owner record before ``folder`` becomes the artifact."""
    (folder / OWNER_FILE).unlink(missing_ok=True)


@dataclass(frozen=True)
class Leftover:
    """A temporary folder of an earlier export to the same target."""

    path: Path
    bytes: int
    state: str  # "stale" (its owner is gone: removed), "running" (owner alive), "unknown" (not provably ours)
    detail: str


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _inspect(folder: Path) -> tuple[str, str]:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        host, pid, start = owner["host"], int(owner["pid"]), owner["start"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown", "no owner record (an older vpp-edge, or killed before it wrote one)"
    if host != socket.gethostname():
        return "unknown", f"written by pid {pid} on host {host}"
    if start is not None and _process_start(pid) == start:
        return "running", f"export in progress (pid {pid})"
    return "stale", f"its export (pid {pid}) is gone"


def leftovers(target: str | Path) -> list[Leftover]:
    """Temporary folders of exports to ``target`` (call it before creating one's own)."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[A-Za-z0-9_]{{8}}$")  # tempfile.mkdtemp's names
    if not target.parent.is_dir():
        return []
    found = []
    for path in sorted(target.parent.iterdir()):
        if path.is_dir() and not path.is_symlink() and pattern.match(path.name):
            state, detail = _inspect(path)
            found.append(Leftover(path, _size(path), state, detail))
    return found


def sweep(target: str | Path) -> list[Leftover]:
    """Remove the stale temporary folders of earlier exports to ``target``; warn about the
    others (with their size and how to remove them). Returns every folder found."""
    found = leftovers(target)
    for item in found:
        gb = item.bytes / 1e9
        if item.state == "stale":
            shutil.rmtree(item.path, ignore_errors=True)
            log.warning("removed %s (%.2f GB): temporary folder of an export that was killed (%s)",
                        item.path, gb, item.detail)
        else:
            log.warning("left %s (%.2f GB) in place: %s; remove it with 'rm -rf %s' once no export uses it",
                        item.path, gb, item.detail, item.path)
    return found


class Terminated(KeyboardInterrupt):
    """SIGTERM (systemd, timeout, a batch scheduler) raised where the export runs, so it
    unwinds like Ctrl-C and removes its temporary folder."""


# The signal that ended the export, kept until it has unwound: Python drops an exception
# raised by a signal handler while a finaliser or a weakref callback runs ("Exception
# ignored in ..."), which would let a signalled export run on and commit its artifact.
_pending: list[KeyboardInterrupt] = []


def raise_if_interrupted() -> None:
    """Raise the interrupt a signal asked for if its first raise was swallowed; called at
    every phase boundary and before the artifact is committed."""
    if _pending:
        raise _pending[0]


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs in the main thread, SIGTERM raises :class:`Terminated` and
    SIGINT :class:`KeyboardInterrupt`, and either is raised again by
    :func:`raise_if_interrupted` until the block has unwound."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        exc = Terminated(f"signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt()
        _pending.append(exc)
        raise exc

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _pending.clear()
