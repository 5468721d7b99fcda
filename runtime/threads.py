"""Worker threads that cannot die silently (shared by the runtime and the bridges).

A thread that ends on an unexpected exception leaves a process that looks alive to its
supervisor while it no longer answers (an e-stop, a camera, an inference). Every long-lived
worker therefore runs under :func:`guarded`: the exception goes to an ``on_failure``
callback that brings the robot to a safe stop and publishes the event, and the owner's
liveness check (:func:`dead`) then ends the process with :class:`ThreadFailure`, a non-zero
exit that makes systemd restart it.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

from vpp_edge.errors import VPPError

log = logging.getLogger(__name__)


class ThreadFailure(VPPError):
    """A worker thread failed unexpectedly; the robot was brought to a safe stop."""


def guarded(name: str, target: Callable[[], None], on_failure: Callable[[str, Exception], None]) -> threading.Thread:
    """A daemon thread running ``target``; an exception escaping it calls ``on_failure(name, exc)``."""

    def run() -> None:
        try:
            target()
        except Exception as exc:
            log.exception("thread %s failed", name)
            on_failure(name, exc)

    return threading.Thread(target=run, name=name, daemon=True)


def describe(name: str, exc: BaseException) -> str:
    """One line for logs and events: which thread, which exception."""
    return f"thread {name} failed: {type(exc).__name__}: {exc}"


def dead(threads: Iterable[threading.Thread]) -> list[str]:
    """Names of the threads that were started and are no longer running."""
    return [t.name for t in threads if t.ident is not None and not t.is_alive()]
