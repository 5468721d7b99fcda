"""Loopback round trip runtime <-> bridge over real ZeroMQ sockets (kinematic sim driver).

    python bench/bridge_bench.py [--n 500] [--servo-hz 1000]

* target -> state: a target goes out on the action socket; time until a state message that
  acknowledges it (``last_chunk_seq``) arrives on the state socket. Includes validation,
  one servo tick (the state is published from the servo loop) and both hops, so it is
  bounded below by the servo period: the bridge runs at ``--servo-hz`` here.
* command -> reply: ``status`` on the DEALER/ROUTER pair, correlated by sequence number.

    python bench/bridge_bench.py --jitter [--seconds 6] [--infer-ms 120] [--rt-priority 80]

* jitter of targets at the robot (issue 19): the bridge runs in its own process (as deployed)
  with a driver that records what it receives (time, setpoint) on every servo tick; the
  runtime runs in this process with a fake policy whose inference holds the GIL for
  ``--infer-ms`` (the load a Python-side inference puts on the control thread) and plans a
  constant-velocity move (delta actions). For each target stream (``per_tick``: this tick's
  action as it comes, the stream before the bridge owned time; ``waypoints``: absolute,
  timestamped, executed on the bridge's clock) and each scheduling (best-effort; SCHED_FIFO
  for the runtime's control thread and the bridge's servo thread), over the steady part of
  the move: the servo period's deviation at the driver; how far each servo tick's step is
  from the usual (median) step; the setpoint's jitter (its distance from its own 0.2 s moving
  average); stalls (servo ticks where the setpoint stood still); the runtime's starved ticks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="round trips per measure (default 500)")
    ap.add_argument("--servo-hz", type=float, default=1000.0, help="bridge servo/state rate (default 1000)")
    ap.add_argument("--json", type=Path, default=None, help="results file (default bench/results/bridge_*.json)")
    ap.add_argument("--jitter", action="store_true", help="measure the jitter of targets at the robot instead")
    ap.add_argument("--seconds", type=float, default=6.0, help="--jitter: length of each run (default 6)")
    ap.add_argument("--infer-ms", type=float, default=120.0, help="--jitter: GIL-holding inference time (default 120)")
    ap.add_argument("--rt-priority", type=int, default=80, help="--jitter: SCHED_FIFO priority of the rt runs")
    ap.add_argument("--repeat", type=int, default=2, help="--jitter: interleaved repetitions, pooled (default 2)")
    ap.add_argument("--serve-bridge", nargs=3, metavar=("BASE_PORT", "RT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bridge:
        return _serve_bridge(int(args.serve_bridge[0]), int(args.serve_bridge[1]), Path(args.serve_bridge[2]))
    if args.jitter:
        return _jitter(args)
    args.json = args.json or Path(__file__).parent / "results" / "bridge_loopback.json"

    import zmq

    from vpp_edge.firmware_bridge.bridge import loopback_bridge
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.runtime import protocol as P
    from vpp_edge.runtime.build import open_link
    from vpp_edge.runtime.config import LinkConfig, RuntimeConfig
    from vpp_edge.runtime.metrics import percentiles

    cfg = dataclasses.replace(load_bridge_config("sim"), servo_hz=args.servo_hz, state_hz=args.servo_hz)
    ctx = zmq.Context()
    bridge, base = loopback_bridge(cfg, ctx)
    bridge.start()
    link = open_link(RuntimeConfig(robot=cfg.name, bridge=LinkConfig(base_port=base)), context=ctx)
    time.sleep(0.3)  # subscriptions settle
    link.handshake("sim", cfg.dim)
    target_ms, command_ms, lost = [], [], 0
    zero = np.array([0, 0, 0, 0, 0, 0, 1.0])
    try:
        for _ in range(args.n):
            start = time.perf_counter()
            link.send_target(zero, P.now(), 0.1)
            seq = link.last_seq
            while time.perf_counter() - start < 0.5:
                state, _ = link.poll()
                if state is not None and state.last_chunk_seq >= seq:
                    target_ms.append((time.perf_counter() - start) * 1e3)
                    break
                time.sleep(0.00005)
            else:
                lost += 1
            start = time.perf_counter()
            if link.command("status") is not None:
                command_ms.append((time.perf_counter() - start) * 1e3)
    finally:
        link.close()
        bridge.close()
        ctx.destroy(linger=0)
    results = {"servo_hz": args.servo_hz, "n": args.n, "lost": lost,
               "target_to_state_ms": percentiles(target_ms), "command_reply_ms": percentiles(command_ms)}
    for name in ("target_to_state_ms", "command_reply_ms"):
        r = results[name]
        print(f"{name:20s} p50 {r['p50']:.3f}  p95 {r['p95']:.3f}  p99 {r['p99']:.3f}  max {r['max']:.3f} ms "
              f"(n={r['n']})")
    print(f"servo {args.servo_hz:g} Hz (one tick = {1e3 / args.servo_hz:.2f} ms); targets without an "
          f"acknowledging state within 0.5 s: {lost}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    return 0


# --- jitter of targets at the robot ---------------------------------------------------------
JITTER_ROBOT = "panda"  # 50 Hz control, 100 Hz servo, end-effector deltas
JITTER_START = (0.3, 0.0, 0.4, 0.0, 0.0, 0.0, 0.0)  # inside the Panda's workspace
JITTER_STEP = 0.001  # m per control tick along x: 5 cm/s at 50 Hz
JITTER_CHUNK = 32  # actions per chunk: 0.64 s, well beyond an inference under load (starving is not jitter)
JITTER_MARGIN_TICKS = 15  # infer this early (0.3 s): the GIL-held inference ends before the plan runs dry
JITTER_WINDOW_S = 0.2  # the moving average the setpoint's jitter is measured against


def _serve_bridge(base_port: int, rt: int, out: Path) -> int:
    """The bridge process: serve until stdin closes, then save what the driver received (a
    recording sim driver in place of the description's)."""
    from vpp_edge.firmware_bridge.bridge import Bridge, Endpoints
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.firmware_bridge.driver import KinematicSimDriver
    from vpp_edge.runtime.realtime import ThreadRealtime

    class Recorder(KinematicSimDriver):
        def __init__(self):
            super().__init__(7, np.asarray(JITTER_START))
            self.log = np.zeros((200_000, 2))
            self.n = 0

        def servo(self, setpoint):
            super().servo(setpoint)
            if self.n < len(self.log):
                self.log[self.n] = (time.monotonic(), setpoint[0])
                self.n += 1

    driver = Recorder()
    bridge = Bridge(driver, load_bridge_config(JITTER_ROBOT), Endpoints.on("127.0.0.1", base_port),
                    servo_realtime=ThreadRealtime(rt)).start()
    print("ready", flush=True)
    sys.stdin.read()  # the parent closes it when its run is over
    realtime = [k for k in bridge.counts if k.startswith("event_realtime")]
    bridge.close()
    np.save(out, driver.log[:driver.n])
    print(json.dumps({k: int(v) for k, v in bridge.counts.items()}), flush=True)
    print("realtime:" + ",".join(realtime), flush=True)
    return 0


class _GilPolicy:
    """Inference that holds the GIL for ``infer_ms`` (pure Python), then plans a constant step
    (a stand-in for the RuntimePolicy that build_runtime would load from an artifact)."""

    def __init__(self, infer_ms: float):
        from types import SimpleNamespace

        self.preset = SimpleNamespace(action_dim=7)
        self.infer_ms = infer_ms

    def set_instruction(self, text):
        return 0.0

    def infer(self, frames, prefix=None, delay_steps=0, **_):
        from vpp_edge.runtime.policy import Chunk

        end = time.perf_counter() + self.infer_ms / 1e3
        x = 0
        while time.perf_counter() < end:  # the GIL is held: the control thread waits its turn
            x += 1
        actions = np.zeros((JITTER_CHUNK, 7), np.float32)
        actions[:, 0] = JITTER_STEP
        return Chunk(actions, actions, {"engine_ms": self.infer_ms})


def _jitter_run(stream: str, rt: int, args, tmp: Path) -> dict:
    import subprocess

    from vpp_edge.runtime import protocol as P
    from vpp_edge.runtime.build import build_runtime
    from vpp_edge.runtime.cameras.base import Camera, Frame
    from vpp_edge.runtime.config import LinkConfig, RuntimeConfig, SmoothingConfig

    class Cam(Camera):
        def capture_loop(self):
            k = 0
            while not self._stop.wait(0.02):
                self._publish(Frame(np.zeros((1, 8, 8, 3), np.uint8), time.monotonic(), k))
                k += 1

    base = P.free_base_port()
    out = tmp / f"{stream}_{rt}.npy"
    child = subprocess.Popen([sys.executable, __file__, "--serve-bridge", str(base), str(rt), str(out)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    config = RuntimeConfig(robot=JITTER_ROBOT, instruction="move along x", duration_s=args.seconds,
                           target_stream=stream, rt_priority=rt, bridge=LinkConfig(base_port=base),
                           smoothing=SmoothingConfig(margin_steps=JITTER_MARGIN_TICKS))
    try:
        with build_runtime(config, policy=_GilPolicy(args.infer_ms), cameras=[Cam("bench")]) as built:
            time.sleep(0.3)  # subscriptions settle
            summary = built.run()
            control_jitter = list(built.metrics.series.get("jitter_ms", []))
    finally:
        child.stdin.close()
    counts = json.loads(child.stdout.readline())
    realtime = child.stdout.readline().strip()
    child.wait(timeout=30)
    log = np.load(out)
    t, x = log[:, 0], log[:, 1]
    moving = np.flatnonzero(np.abs(x - JITTER_START[0]) > 1e-9)
    start = t[moving[0]] + 1.0 if len(moving) else t[0]
    steady = (t >= start) & (t <= start + args.seconds - 2.5)  # after the first chunks, before the closing hold
    dt, dx = np.diff(t[steady]), np.diff(x[steady])
    servo_dt = 1.0 / 100.0
    # The setpoint's jitter: its distance from its own moving average over JITTER_WINDOW_S
    # (what a smooth stream would give; the slow drift of a runtime that sometimes starves is
    # not counted here, its starved ticks are, below).
    xs = x[steady]
    width = int(JITTER_WINDOW_S * 100) // 2 * 2 + 1  # odd: centred on a sample (a ramp's residual is 0)
    if len(xs) > width:
        smooth = np.convolve(xs, np.ones(width) / width, mode="valid")
        residual = np.abs(xs[width // 2: width // 2 + len(smooth)] - smooth) * 1e3
    else:
        residual = np.zeros(0)
    step_dev = np.abs(dx - np.median(dx)) * 1e3 if len(dx) else dx  # what each servo tick moves, vs the usual
    return {
        "stream": stream, "rt_priority": rt, "servo_ticks": int(steady.sum()), "step_dev": step_dev.tolist(),
        "period_dev": (np.abs(dt - servo_dt) * 1e3).tolist(), "position_dev": residual.tolist(),
        "stalled": (np.abs(dx) < 1e-9).tolist(), "control_jitter": control_jitter,
        "runtime_realtime_denied": int(summary["counts"].get("realtime_denied", 0)),
        "starved_ticks": int(summary["counts"].get("starvation", 0)),
        "bridge_realtime": realtime,
        "bridge": {k: v for k, v in counts.items() if k.startswith(("accepted", "rejected", "waypoints_late"))},
    }


def _jitter(args) -> int:
    import tempfile

    from vpp_edge.runtime.metrics import percentiles

    runs: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):  # interleaved: a change in the machine's load hits every condition
            for rt in (0, args.rt_priority):
                for stream in ("per_tick", "waypoints"):
                    runs.setdefault((stream, rt), []).append(_jitter_run(stream, rt, args, Path(tmp)))
    results = []
    for (stream, rt), reps in runs.items():
        def pooled(key):
            return [v for r in reps for v in r[key]]

        r = {"stream": stream, "rt_priority": rt, "runs": len(reps),
             "servo_ticks": sum(x["servo_ticks"] for x in reps),
             "servo_period_dev_ms": percentiles(pooled("period_dev")),
             "position_dev_mm": percentiles(pooled("position_dev")),
             "step_dev_mm": percentiles(pooled("step_dev")),
             "stalls_pct": float(np.mean(pooled("stalled")) * 100),
             "control_jitter_ms": percentiles(pooled("control_jitter")),
             "runtime_realtime_denied": sum(x["runtime_realtime_denied"] for x in reps),
             "starved_ticks": sum(x["starved_ticks"] for x in reps),
             "bridge_realtime": reps[-1]["bridge_realtime"], "bridge": [x["bridge"] for x in reps]}
        results.append(r)
        dev, pos, step = r["servo_period_dev_ms"], r["position_dev_mm"], r["step_dev_mm"]
        print(f"{stream:9s} rt={rt:<3d} servo period dev p50/p99/max {dev['p50']:.2f}/{dev['p99']:.2f}/{dev['max']:.2f} ms"
              f" | step dev p50/p99 {step['p50']:.3f}/{step['p99']:.3f} mm"
              f" | setpoint jitter p50/p99/max {pos['p50']:.3f}/{pos['p99']:.3f}/{pos['max']:.3f} mm | stalls {r['stalls_pct']:.1f} % | "
              f"control tick jitter p99 {r['control_jitter_ms']['p99']:.1f} ms | starved ticks {r['starved_ticks']} | "
              f"rt denied (runtime) "
              f"{r['runtime_realtime_denied']} | bridge {r['bridge_realtime']} {r['bridge']}", flush=True)
    path = args.json or Path(__file__).parent / "results" / "bridge_jitter.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"robot": JITTER_ROBOT, "seconds": args.seconds, "infer_ms": args.infer_ms,
                                "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
