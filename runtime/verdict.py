"""A run's verdict: whether ``vpp run`` / ``vpp demo`` did their job, from the summary.

A run can end without an exception and still have done nothing: a camera that never
delivered a frame, a bridge that vanished mid-run (the runtime keeps ticking, counting
``bridge_silent``), or chunks refused as stale one after the other. Each is a failed run
(:class:`~vpp_edge.errors.RunFailed`, a non-zero exit) with one line saying why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vpp_edge.errors import RunFailed

from .cameras.base import Camera

CHUNK_REFUSALS = ("chunk_stale_observation", "chunk_nan", "chunk_shape")  # SafetyGate.check_chunk's reasons


def run_verdict(summary: Mapping[str, Any], cameras: Sequence[Camera], dt: float) -> str | None:
    """Why the run failed, in one line, or None when it did its job. ``summary`` is
    :meth:`Runtime.run`'s; ``dt`` the control period (s), to turn tick counts into seconds."""
    counts = summary.get("counts", {})
    dark = [cam for cam in cameras if not cam.delivered]
    if dark:
        names = ", ".join(f"'{cam.name}'" + (f" ({cam.error})" if cam.error else "") for cam in dark)
        return f"camera {names} never delivered a frame: the robot was held all run"
    silent = counts.get("bridge_silent", 0)
    if silent:
        return (f"the bridge went silent mid-run: no robot state for {silent * dt:.1f} s "
                f"({silent} ticks; did the bridge exit or the link drop?)")
    chunks, refused = counts.get("chunks", 0), counts.get("chunk_rejected", 0)
    if refused > chunks:
        safety = summary.get("safety", {})
        reason = max(CHUNK_REFUSALS, key=lambda r: safety.get(r, 0))
        hint = " (inference slower than the robot config's stale_observation_s?)" if reason.endswith("stale_observation") else ""
        return f"{refused} of {chunks + refused} action chunks refused, most as {reason}{hint}"
    if chunks == 0:
        stale = counts.get("stale_observation", 0)
        why = (f": all {stale} observations were older than the robot config's stale_observation_s" if stale
               else "")
        return f"no action chunk was planned in the whole run{why}: the robot never moved"
    if not counts.get("targets_sent", 0):
        held = {k: counts.get(k, 0) for k in ("estop", "stop", "hold", "starvation", "bridge_unreachable")}
        worst = max(held, key=held.get)
        return f"{chunks} chunk(s) planned but no target reached the bridge (mostly '{worst}'): the robot never moved"
    return None


def check_run(summary: Mapping[str, Any], cameras: Sequence[Camera], dt: float) -> None:
    """Raise :class:`RunFailed` with :func:`run_verdict`'s line when the run failed."""
    why = run_verdict(summary, cameras, dt)
    if why is not None:
        raise RunFailed(why)
