"""Real-time settings of one thread: the runtime's control thread, the bridge's servo thread.

On Linux a thread inherits its creator's scheduling policy. The control loop therefore
asks for SCHED_FIFO only after the camera and inference threads exist: they keep the
normal policy (SCHED_OTHER), so an inference using most of a core cannot starve the
control ticks, and it cannot run at real-time priority either. Memory is locked
(``mlockall``) only where the service grants it (``LimitMEMLOCK=infinity`` in the unit):
page faults on the control path then cannot stall a tick.

Standard library only (robot side).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

# <sys/mman.h>: lock what is mapped now and what gets mapped later, each page when first
# touched (ONFAULT: CUDA's large virtual reservations are not made resident up front).
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
POLICY_NAMES = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH", "SCHED_IDLE")
                if hasattr(os, n)}


@dataclass(frozen=True)
class Outcome:
    """What a real-time request got: ``ok`` and a line for the log/metrics."""

    ok: bool
    detail: str


def control_thread_fifo(priority: int) -> Outcome:
    """SCHED_FIFO ``priority`` for the calling thread only (on Linux, pid 0 in
    sched_setscheduler is the calling thread). Call it after the other threads started."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (AttributeError, PermissionError, OSError) as exc:
        return Outcome(False, f"SCHED_FIFO {priority} not permitted ({exc}): {threading.current_thread().name} stays "
                              "best-effort "
                              "(the unit's LimitRTPRIO or CAP_SYS_NICE grants it)")
    return Outcome(True, f"SCHED_FIFO {priority} on thread {threading.current_thread().name}")


def pin_thread(cpus: tuple[int, ...]) -> Outcome:
    """Run the calling thread on ``cpus`` only (on Linux, pid 0 in sched_setaffinity is the
    calling thread): a servo loop on a core that inference does not use."""
    try:
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError, ValueError) as exc:
        return Outcome(False, f"CPU affinity {list(cpus)} refused ({exc}): the thread runs on any CPU")
    return Outcome(True, f"{threading.current_thread().name} on CPUs {sorted(os.sched_getaffinity(0))}")


@dataclass(frozen=True)
class ThreadRealtime:
    """What one thread asks for: SCHED_FIFO ``priority`` (0: none) and ``cpus`` (empty: any)."""

    priority: int = 0
    cpus: tuple[int, ...] = ()

    def apply(self) -> list[Outcome]:
        """Apply to the calling thread; one outcome per setting asked for."""
        out = [pin_thread(self.cpus)] if self.cpus else []
        return out + ([control_thread_fifo(self.priority)] if self.priority else [])


def memlock_granted(limit: int | None = None) -> bool:
    """Whether RLIMIT_MEMLOCK lets this process lock all its memory (unlimited, or root)."""
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] if limit is None else limit
    return soft == resource.RLIM_INFINITY or os.geteuid() == 0


def lock_memory(limit: int | None = None) -> Outcome:
    """``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`` when MEMLOCK is granted."""
    if not memlock_granted(limit):
        soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] if limit is None else limit
        return Outcome(False, f"memory not locked: RLIMIT_MEMLOCK is {soft} bytes (the unit's LimitMEMLOCK=infinity "
                              "grants it)")
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        err = ctypes.get_errno()
        return Outcome(False, f"mlockall failed: {os.strerror(err)}")
    return Outcome(True, "memory locked (mlockall, on fault)")


@contextmanager
def scheduling_kept() -> Iterator[None]:
    """Put the calling thread's scheduling policy back after the block: for vendor calls
    that raise it as a side effect (libfranka's Robot makes the thread that constructs it
    SCHED_FIFO 99 where permitted, even with RealtimeConfig.Ignore). Without it that thread,
    and every thread it starts later (the bridge's network thread), would run real-time."""
    get = getattr(os, "sched_getscheduler", None)
    before = (get(0), os.sched_getparam(0)) if get is not None else None
    try:
        yield
    finally:
        if before is not None and (get(0), os.sched_getparam(0)) != before:
            os.sched_setscheduler(0, *before)


def thread_policies() -> dict[str, str]:
    """{thread name: scheduling policy} of this process's live threads (Linux)."""
    out = {}
    for thread in threading.enumerate():
        if thread.native_id is None:
            continue
        try:
            out[thread.name] = POLICY_NAMES.get(os.sched_getscheduler(thread.native_id), "?")
        except OSError:  # ended meanwhile
            continue
    return out
