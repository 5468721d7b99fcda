"""The safety chain under attack and under faults, over real ZeroMQ sockets (sim bridge).

    python bench/safety_bench.py [--fuzz 20000] [--trials 5] [--soak-hours 2]

* fuzz: mutated frames (the property tests' mutator: byte flips, truncations, nasty header
  values) into each endpoint: the bridge's action socket and command socket, the runtime's
  state subscription, a network camera. Reported per endpoint: frames, accepted, refused,
  crashes (threads lost), forwarded-that-should-not (a target outside the workspace or a
  setpoint step beyond the velocity limit at the robot; a non-finite state taken by the
  runtime), and the process's resident memory before and after.
* faults: hold and stop latency at the bridge, from the fault to the bridge's
  ``watchdog_hold`` / ``watchdog_stop`` event (its own stamp), ``--trials`` per class: a dead
  runtime (SIGKILL), a frozen one (SIGSTOP), an alive but starved one (heartbeats say
  ``starved``), and one that says ``stop``. Runtimes are separate processes for the first two.
* soak: metrics series and chunking statistics over hours of 50 Hz ticks on an accelerated
  clock; traced memory before and after.
Timings are measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the property tests' mutator (tests/test_protocol_fuzz.py)

# A runtime in its own process: hello, then a zero target every 0.1 s until killed or frozen;
# its link is the one vpp run opens (runtime/build.py) from a config (argv: the bridge's base port).
RUNTIME_SCRIPT = """
import sys, time, numpy as np
from vpp_edge.runtime import protocol as P
from vpp_edge.runtime.build import open_link
from vpp_edge.runtime.config import LinkConfig, RuntimeConfig
link = open_link(RuntimeConfig(bridge=LinkConfig(base_port=int(sys.argv[1]))))
link.handshake("sim", 7)
print("ready", flush=True)
while True:
    link.send_target(np.array([0, 0, 0, 0, 0, 0, 1.0]), P.now(), 0.1)
    time.sleep(0.1)
"""


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sim_rig(ctx):
    """(bridge, runtime config): the sim bridge on loopback, started, and a runtime config
    that reaches it (its link: ``open_link(config)``, the one vpp run opens)."""
    from vpp_edge.firmware_bridge.bridge import loopback_bridge
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.runtime.config import LinkConfig, RuntimeConfig

    bridge, base = loopback_bridge(load_bridge_config("sim"), ctx)
    return bridge.start(), RuntimeConfig(robot="sim", bridge=LinkConfig(base_port=base))


def fuzz(n: int, seed: int) -> dict:
    import msgpack
    import zmq

    from tests.test_protocol_fuzz import mutate
    from vpp_edge.runtime import protocol as P
    from vpp_edge.runtime.build import open_link
    from vpp_edge.runtime.cameras.network import ZmqCameras
    from vpp_edge.runtime.link import BridgeLink
    from vpp_edge.runtime.transport import make_socket, recv

    rng = random.Random(seed)
    ctx = zmq.Context()
    bridge, config = sim_rig(ctx)
    cfg, driver, ends, link = bridge.cfg, bridge.driver, bridge.bound(), open_link(config, context=ctx)
    time.sleep(0.3)
    link.handshake("sim", cfg.dim)
    out: dict = {}

    def wire(msg) -> bytes:
        return msgpack.packb(mutate(P.encode(msg), rng), use_bin_type=True)

    # bridge action socket: fresh, in-session targets (they reach every check behind the decoder)
    before = rss_mb()
    push = make_socket(ctx, zmq.PUSH, ends.action, bind=False, timeout_ms=1000)
    received = bridge.counts["received"]
    for _ in range(n):
        msg = P.ActionChunk(**link._next(), obs_stamp=P.now(), dt=0.1, actions=np.full((1, 7), 0.01, np.float32))
        push.send(wire(msg))
    deadline = time.monotonic() + 60
    while bridge.counts["received"] < received + n and time.monotonic() < deadline:
        time.sleep(0.05)
    history = np.stack(driver.history) if driver.history else np.zeros((1, cfg.dim))
    outside = (history < cfg.vec("setpoint_low")) | (history > cfg.vec("setpoint_high"))
    too_fast = np.abs(np.diff(history, axis=0)) > cfg.vec("max_vel") / cfg.servo_hz + 1e-9
    bad_setpoints = int(np.sum(np.any(outside, axis=1)) + np.sum(np.any(too_fast, axis=1)))
    out["bridge_action"] = {"frames": n, "received": bridge.counts["received"] - received,
                            "accepted": bridge.counts["accepted"], "refused": bridge.counts["rejected"],
                            "threads_lost": len([t for t in bridge._threads if not t.is_alive()]),
                            "forwarded_that_should_not": bad_setpoints, "rss_mb": [before, rss_mb()]}

    # bridge command socket: mutated hellos and commands; every frame must get a reply
    before = rss_mb()
    dealer = make_socket(ctx, zmq.DEALER, ends.command, bind=False, timeout_ms=1000)
    replies = ok = 0
    for k in range(n // 4):
        msg = (P.CommandMsg(**link._next(), command=rng.choice([c.value for c in P.Command])) if k % 2
               else P.Hello(**link._next(), role="operator", robot="sim", action_dim=7))
        msg = P.CommandMsg(**{**link._next(), "session": rng.getrandbits(63)}, command="status") if k % 7 == 0 else msg
        dealer.send(wire(msg))
        reply = recv(dealer)
        replies += reply is not None
        ok += bool(reply is not None and reply.ok)
    out["bridge_command"] = {"frames": n // 4, "replies": replies, "ok": ok, "refused": replies - ok,
                             "threads_lost": len([t for t in bridge._threads if not t.is_alive()]),
                             "bridge_health": bridge.health(), "rss_mb": [before, rss_mb()]}
    estop_answered = bool((r := link.command("estop")) is not None and r.ok)
    out["bridge_command"]["estop_answered_after"] = estop_answered

    # runtime state subscription: the runtime's link against a hostile "bridge"
    before = rss_mb()
    pub = make_socket(ctx, zmq.PUB, "tcp://127.0.0.1:*", bind=True)
    ep = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
    victim = BridgeLink(ends.action, ep, ends.events, ends.command, context=ctx)  # a hostile state publisher
    victim.action_dim = 7
    time.sleep(0.3)
    taken = bad_taken = 0
    for k in range(n):
        state = P.RobotState(seq=k, stamp=P.now(), joints=np.zeros(7), ee_pose=np.zeros(7), target=np.zeros(7))
        pub.send(wire(state))
        if k % 50 == 0:
            got, _ = victim.poll()
            if got is not None:
                taken += 1
                bad_taken += not (got.target.shape == (7,) and np.all(np.isfinite(got.target)))
    out["runtime_state"] = {"frames": n, "states_taken": taken, "refused": dict(victim.counts),
                            "forwarded_that_should_not": bad_taken, "rss_mb": [before, rss_mb()]}

    # network camera
    before = rss_mb()
    cam_pub = make_socket(ctx, zmq.PUB, "tcp://127.0.0.1:*", bind=True)
    cam = ZmqCameras(cam_pub.getsockopt(zmq.LAST_ENDPOINT).decode(), views=2, size=16, context=ctx).start()
    time.sleep(0.3)
    for k in range(n // 4):
        frames = P.CameraFrames(seq=k, stamp=P.now(), index=k, images=np.zeros((2, 8, 8, 3), np.uint8))
        cam_pub.send(wire(frames))
        time.sleep(0.0002)  # latest-only socket: let the camera take most of them
    time.sleep(0.3)
    out["network_camera"] = {"frames": n // 4, "dropped": cam.dropped, "thread_alive": cam._thread.is_alive(),
                             "failure": cam.failure, "rss_mb": [before, rss_mb()]}
    cam.stop()
    for s in (push, dealer, pub, cam_pub):
        s.close(linger=0)
    victim.close()
    link.close()
    bridge.close()
    ctx.destroy(linger=0)
    return out


def faults(trials: int) -> dict:
    import zmq

    from vpp_edge.runtime import protocol as P
    from vpp_edge.runtime.build import open_link
    from vpp_edge.runtime.transport import make_socket, recv

    ctx = zmq.Context()
    bridge, config = sim_rig(ctx)
    cfg = bridge.cfg
    events = make_socket(ctx, zmq.SUB, bridge.bound().events, bind=False, timeout_ms=50)
    time.sleep(0.3)

    def wait_for(kinds: set[str], limit_s: float) -> dict[str, float]:
        """Stamps of the first event of each kind (the bridge's clock = this machine's)."""
        seen: dict[str, float] = {}
        end = time.monotonic() + limit_s
        while time.monotonic() < end and set(seen) != kinds:
            m = recv(events)
            if m is not None and m.kind in kinds and m.kind not in seen:
                seen[m.kind] = m.stamp
        return seen

    def drain() -> None:
        while recv(events) is not None:
            pass

    results: dict[str, dict[str, list[float]]] = {}
    zero = np.array([0, 0, 0, 0, 0, 0, 1.0])
    for fault in ("dead_sigkill", "frozen_sigstop", "starved", "says_stop"):
        hold, stop = [], []
        for _ in range(trials):
            proc = link = None
            if fault in ("dead_sigkill", "frozen_sigstop"):
                proc = subprocess.Popen([sys.executable, "-c", RUNTIME_SCRIPT, str(config.bridge.base_port)],
                                        stdout=subprocess.PIPE, text=True)
                assert proc.stdout.readline().strip() == "ready"
                time.sleep(0.5)  # tracking
                drain()
                t0 = P.now()
                os.kill(proc.pid, signal.SIGKILL if fault == "dead_sigkill" else signal.SIGSTOP)
                seen = wait_for({"watchdog_hold", "watchdog_stop"}, cfg.stop_after_s + 2)
            else:
                link = open_link(config, context=ctx)
                link.handshake("sim", 7)
                for _ in range(5):
                    link.send_target(zero, P.now(), 0.1)
                    time.sleep(0.1)
                drain()
                t0 = P.now()
                mode = P.RuntimeMode.STARVED if fault == "starved" else P.RuntimeMode.STOP
                seen = {}
                end = time.monotonic() + cfg.stop_after_s + 2
                while time.monotonic() < end and "watchdog_stop" not in seen:
                    link.send_heartbeat(mode)  # alive, every control tick
                    seen.update({k: v for k, v in wait_for({"watchdog_hold", "watchdog_stop"}, 0.1).items()
                                 if k not in seen})
            if "watchdog_hold" in seen:
                hold.append(seen["watchdog_hold"] - t0)
            stop.append(seen.get("watchdog_stop", float("nan")) - t0)
            if proc is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            if link is not None:
                link.close()
        results[fault] = {"hold_s": hold, "stop_s": stop}
    events.close(linger=0)
    bridge.close()
    ctx.destroy(linger=0)
    return {"hold_after_s": cfg.hold_after_s, "stop_after_s": cfg.stop_after_s, "classes": results}


def soak(hours: float) -> dict:
    from vpp_edge.runtime.chunking import ActionPlan
    from vpp_edge.runtime.metrics import Metrics

    ticks = int(hours * 3600 * 50)
    m = Metrics()
    plan = ActionPlan(0.02, "crossfade")
    chunk = np.random.default_rng(0).normal(size=(8, 7))
    tracemalloc.start()
    marks = {}
    started = time.perf_counter()
    for tick in range(ticks):
        now = tick * 0.02
        if tick % 6 == 0:
            plan.add_chunk(chunk, now, now, seq=tick)
        plan.pop(now)
        for name in ("jitter_ms", "queue_depth", "frame_age_ms"):
            m.observe(name, tick % 13)
        if tick in (50 * 600, ticks - 1):  # after 10 min (windows full) and at the end
            marks[f"{tick / 50 / 3600:.2f} h"] = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    m.close()
    return {"ticks": ticks, "hours": hours, "wall_s": time.perf_counter() - started, "traced_mb": marks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fuzz", type=int, default=20000, help="frames into the action and state endpoints")
    ap.add_argument("--trials", type=int, default=5, help="trials per fault class")
    ap.add_argument("--soak-hours", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "safety.json")
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)  # thousands of refusals are counted, not printed
    results = {"fuzz": fuzz(args.fuzz, args.seed)}
    for endpoint, r in results["fuzz"].items():
        print(f"fuzz {endpoint:15s} " + "  ".join(f"{k} {v}" for k, v in r.items()))
    results["faults"] = faults(args.trials)
    f = results["faults"]
    print(f"faults (bridge hold_after_s {f['hold_after_s']}, stop_after_s {f['stop_after_s']}), "
          "seconds from the fault:")
    for name, r in f["classes"].items():
        def fmt(v):
            return f"median {np.median(v):.3f} max {np.max(v):.3f} (n={len(v)})" if v else "none"
        print(f"  {name:15s} hold {fmt(r['hold_s'])}  stop {fmt(r['stop_s'])}")
    results["soak"] = soak(args.soak_hours)
    print(f"soak {results['soak']['hours']} h of 50 Hz ticks in {results['soak']['wall_s']:.1f} s; traced MB "
          f"{results['soak']['traced_mb']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
