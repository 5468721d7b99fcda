"""Real-time settings on this Linux machine (no fakes): SCHED_FIFO reaches the control
thread only, threads started before it keep the normal policy, and memory is locked only
where MEMLOCK is granted. Each case runs in its own process, so pytest's threads never
become real-time. No torch."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from vpp_edge.runtime import realtime

THREADS = """
import json, sys, threading
from vpp_edge.runtime import realtime
go, done = threading.Event(), threading.Event()
inference = threading.Thread(target=done.wait, name="inference", daemon=True)
camera = threading.Thread(target=done.wait, name="camera-0", daemon=True)
inference.start(); camera.start()  # started first, as the runtime does
result = {}
def control():
    result["outcome"] = realtime.control_thread_fifo(1).__dict__
    late = threading.Thread(target=done.wait, name="started-after", daemon=True)
    late.start()
    result["policies"] = realtime.thread_policies()
    done.set()
t = threading.Thread(target=control, name="control"); t.start(); t.join()
print(json.dumps(result))
"""


def test_only_the_control_thread_runs_under_sched_fifo():
    proc = subprocess.run([sys.executable, "-c", THREADS], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    if not result["outcome"]["ok"]:
        pytest.skip(f"SCHED_FIFO not permitted here: {result['outcome']['detail']}")
    policies = result["policies"]
    assert policies["control"] == "SCHED_FIFO"
    assert policies["inference"] == policies["camera-0"] == policies["MainThread"] == "SCHED_OTHER"
    assert policies["started-after"] == "SCHED_FIFO"  # inherited: why the runtime raises it last


def test_memory_is_locked_only_where_memlock_is_granted():
    assert realtime.memlock_granted(resource.RLIM_INFINITY)
    assert realtime.memlock_granted(8 << 20) == (os.geteuid() == 0)  # root locks regardless (CAP_IPC_LOCK)
    if os.geteuid() != 0:
        outcome = realtime.lock_memory(8 << 20)
        assert not outcome.ok and "LimitMEMLOCK=infinity" in outcome.detail
    code = ("from vpp_edge.runtime import realtime; o = realtime.lock_memory(); "
            "print(o.ok, [l for l in open('/proc/self/status') if l.startswith('VmLck')][0].split()[1])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    ok, locked_kb = proc.stdout.split()
    assert ok == str(realtime.memlock_granted())
    assert (int(locked_kb) > 0) == (ok == "True")  # locked pages show in VmLck
