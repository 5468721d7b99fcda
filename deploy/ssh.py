"""Commands on the target over OpenSSH, and copies with rsync over the same SSH options.

Every call has a timeout; output streams through line by line (engine builds take
minutes on a Jetson) and is kept for error messages. Non-interactive: BatchMode, so a
missing key fails at once instead of waiting for a password prompt.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable

from vpp_edge.errors import MissingDependencyError

RSYNC_STAT_LINES = ("Number of regular files transferred", "Total file size", "Total transferred file size",
                    "sent ", "total size")


@dataclass
class Result:
    code: int
    output: list[str]
    seconds: float
    timed_out: bool = False

    def tail(self, n: int = 6) -> str:
        return " | ".join(line.strip() for line in self.output[-n:] if line.strip())


def require_tools() -> None:
    missing = [t for t in ("ssh", "rsync") if shutil.which(t) is None]
    if missing:
        raise MissingDependencyError(f"{' and '.join(missing)} not found on this computer: `make system-deps` installs "
                                     "openssh-client and rsync (requirements/apt.txt)")


class SSHTarget:
    """``user@host`` plus ``-o`` options (Port=, IdentityFile=, UserKnownHostsFile=, ...)."""

    def __init__(self, destination: str, options: list[str] = (), connect_timeout: float = 20):
        self.destination = destination
        # ssh keeps the first value of each option: the user's come first, so they win over ours.
        self.ssh = ["ssh"]
        for opt in [*options, "BatchMode=yes", f"ConnectTimeout={int(connect_timeout)}", "ServerAliveInterval=15",
                    "ServerAliveCountMax=4"]:
            self.ssh += ["-o", opt]

    def command(self, remote: str) -> list[str]:
        """Local argv that runs the shell command line ``remote`` on the target."""
        return [*self.ssh, self.destination, remote]

    def rsync_command(self, source: str, remote_dir: str, link_dest: str | None = None,
                      excludes: tuple[str, ...] = (), files_from: str | None = None,
                      includes: tuple[str, ...] = ()) -> list[str]:
        """rsync ``source/`` into ``remote_dir/``: the whole tree (stale files deleted, ``excludes``
        kept, ``includes`` taken even where an exclude matches), or exactly the paths listed in
        ``files_from``."""
        argv = ["rsync", "-rlpt", "--timeout=120", "--stats", "-h", "-e", shlex.join(self.ssh)]
        argv += [f"--files-from={files_from}"] if files_from else ["--delete"]
        argv += [f"--include={i}" for i in includes] + [f"--exclude={e}" for e in excludes]
        if link_dest:  # unchanged files become hard links to the running release: no copy, no space
            argv.append(f"--link-dest={link_dest}")
        return [*argv, source.rstrip("/") + "/", f"{self.destination}:{remote_dir.rstrip('/')}/"]


def run(argv: list[str], timeout: float, echo: Callable[[str], None] | None = print,
        keep: Callable[[str], bool] | None = None) -> Result:
    """Run ``argv``; stream its merged output through ``echo`` (lines passing ``keep``); kill
    it after ``timeout`` seconds."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", bufsize=1)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if echo and (keep is None or keep(line)):
                echo(line)
        code = proc.wait()
    finally:
        timer.cancel()
        proc.stdout.close()
    if timed_out.is_set():
        lines.append(f"(killed after {timeout:.0f} s)")
    return Result(code, lines, time.monotonic() - start, timed_out.is_set())


def rsync_stats(line: str) -> bool:
    return line.startswith(RSYNC_STAT_LINES) or "rsync" in line.lower() and "error" in line.lower()
