"""Export phases on the progress bar, with their wall time and the process's memory.

At paper scale an export runs for tens of minutes and its memory decides whether it
finishes, so each phase says on the bar what it holds in memory, and its figures (wall
time, resident memory at its end, the kernel's peak so far) go into the parity report,
where ``bench/paper_export.py`` reads them.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import resource
import sys
import time
from typing import Any

from .tempdirs import raise_if_interrupted

log = logging.getLogger(__name__)


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """The kernel's peak resident memory of this process so far (getrusage; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


class Phases:
    """One phase after another: ``phases.start("fp16/tvp", holds="the graph, one tensor at a
    time")`` ends the phase before it (recording its figures in :attr:`records`) and names
    the new one, with what it holds, on the progress bar ``bar`` (tqdm-like, or None);
    :meth:`finish` ends the last one. The bar itself advances where the caller says."""

    def __init__(self, bar: Any = None):
        self.bar = bar
        self.records: list[dict[str, Any]] = []
        self._current: tuple[str, float] | None = None

    def start(self, name: str, holds: str = "") -> None:
        self.finish()
        raise_if_interrupted()  # a signal whose first raise was swallowed ends the export here
        if self.bar is not None:
            self.bar.set_description(f"{name} [holds {holds}]" if holds else name)
        log.info("phase %s started (rss %s)%s", name, gb(rss_bytes()), f", holds {holds}" if holds else "")
        self._current = (name, time.perf_counter())

    def finish(self) -> None:
        if self._current is None:
            return
        name, start = self._current
        self._current = None
        record = {"phase": name, "seconds": round(time.perf_counter() - start, 3), "rss_bytes": rss_bytes(),
                  "peak_rss_bytes": peak_rss_bytes()}
        self.records.append(record)
        # extra: a log handler (bench/paper_export.py's) gets the figures as data, even of an export that fails
        log.info("phase %s: %.1f s, rss %s, peak so far %s", name, record["seconds"], gb(record["rss_bytes"]),
                 gb(record["peak_rss_bytes"]), extra={"export_phase": record})


def release_freed_memory() -> int:
    """Collect garbage, then hand the C heap's free pages back to the kernel (glibc's
    ``malloc_trim``; elsewhere only the collection): freed tensors and protobufs leave their
    pages in malloc's arenas, resident, until trimmed. Returns the bytes of RSS released."""
    before = rss_bytes()
    forget_rewriter_matches()
    gc.collect()
    collected = rss_bytes()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    after = rss_bytes()
    log.info("released %s of resident memory: %s by gc, %s by malloc_trim (rss now %s)",
             gb(before - after), gb(before - collected), gb(collected - after), gb(after))
    return before - after


# glibc's mallopt parameter and the fixed threshold set: allocations from 128 KiB up get
# their own mapping, which free() hands back to the kernel at once.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def map_large_allocations() -> bool:
    """Make every later allocation of ``MMAP_THRESHOLD_BYTES`` or more its own mapping
    (glibc's ``mallopt``; elsewhere nothing). Why: glibc raises its mmap threshold to the
    size of each large block freed (up to 32 MiB), so a process that allocates and frees
    layer-sized blocks then gets them from the heap, where the freed ones stay resident.
    Measured at paper scale: modelopt's calibration and the TorchScript trace of the Q/DQ
    export (5.9 GB above the weights), and a parity worker's INT8 TVP session without its
    arena over two forwards (peak 10.42 GB, 6.94 GB with the threshold fixed).
    Returns whether the threshold was set."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


# The state a pattern matcher of onnxscript's rewriter keeps from its last match.
_MATCH_STATE = ("_graph", "_current_node", "_tracer", "_match")


def forget_rewriter_matches() -> int:
    """Drop what onnxscript's pattern matchers keep from their last match; returns how many
    matchers were reset.

    The rewrite rules torch's exporter applies (``optimize=True``) are module-level objects,
    and each rule's matcher keeps the last graph it matched: after an export, the exported
    ONNX IR graph with its initializers, some of which are numpy views of the PyTorch
    weights (the folded transposes of the Linear weights). So freeing the policy's
    parameters freed too little: 1.5 GB of weights and the graph stayed resident at paper
    scale (issue 20, measured at the tiny preset: 158 of 300 Linear weights of the TVP held).
    A matcher sets this state at the start of each match, so clearing it is safe."""
    matcher = sys.modules.get("onnxscript.rewriter._matcher")
    if matcher is None:  # the exporter never ran here
        return 0
    reset = 0
    for obj in gc.get_objects():
        if isinstance(obj, matcher.PatternMatcher):
            for attr in _MATCH_STATE:
                vars(obj).pop(attr, None)
            reset += 1
    return reset
