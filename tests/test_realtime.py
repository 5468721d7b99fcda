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
import threading

import pytest

from vpp_edge.runtime import realtime

THREADS = """
import os as _os
_os.sched_setscheduler(0, _os.SCHED_OTHER, _os.sched_param(0))  # start as a service does, whatever ran pytest
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


BRIDGE = """
import os as _os
_os.sched_setscheduler(0, _os.SCHED_OTHER, _os.sched_param(0))  # start as a service does, whatever ran pytest
import json, os, time
import zmq
from vpp_edge.firmware_bridge.bridge import NET_THREAD, SERVO_THREAD, Bridge, Endpoints
from vpp_edge.firmware_bridge.config import load_bridge_config
from vpp_edge.firmware_bridge.driver import KinematicSimDriver
from vpp_edge.runtime import realtime
cfg = load_bridge_config("sim")
cpu = min(os.sched_getaffinity(0))
ctx = zmq.Context()
any_port = Endpoints(*(f"tcp://127.0.0.1:*" for _ in range(5)))
with Bridge(KinematicSimDriver(cfg.dim), cfg, any_port, ctx,
            servo_realtime=realtime.ThreadRealtime(priority=1, cpus=(cpu,))) as bridge:
    time.sleep(0.3)
    threads = {t.name: t.native_id for t in __import__("threading").enumerate()}
    print(json.dumps({"cpu": cpu, "all": sorted(os.sched_getaffinity(0)),
                      "affinity": {n: sorted(os.sched_getaffinity(threads[n])) for n in (SERVO_THREAD, NET_THREAD)},
                      "policies": realtime.thread_policies(), "counts": dict(bridge.counts)}))
ctx.term()
"""


def test_the_bridge_servo_thread_alone_gets_its_priority_and_cpus():
    proc = subprocess.run([sys.executable, "-c", BRIDGE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["affinity"]["bridge-servo"] == [result["cpu"]]
    assert result["affinity"]["bridge-net"] == result["all"], "the network thread keeps every CPU"
    if result["counts"].get("event_realtime_refused"):
        pytest.skip("SCHED_FIFO not permitted here")
    assert result["counts"]["event_realtime"] == 2
    assert result["policies"]["bridge-servo"] == "SCHED_FIFO"
    assert result["policies"]["bridge-net"] == result["policies"]["MainThread"] == "SCHED_OTHER"


def test_a_vendor_call_that_makes_its_thread_real_time_is_undone():
    """libfranka's Robot makes its caller SCHED_FIFO 99; the driver wraps it in
    scheduling_kept, and Runtime.run wraps its real-time control loop the same way."""
    seen = {}

    def worker():
        seen["before"] = os.sched_getscheduler(0)
        with realtime.scheduling_kept():
            seen["inside"] = realtime.control_thread_fifo(1).ok and os.sched_getscheduler(0) == os.SCHED_FIFO
        seen["after"] = os.sched_getscheduler(0)

    t = threading.Thread(target=worker)  # a thread of its own: pytest's main thread is never touched
    t.start()
    t.join()
    if not seen["inside"]:
        pytest.skip("SCHED_FIFO not permitted here")
    assert seen["after"] == seen["before"] != os.SCHED_FIFO
