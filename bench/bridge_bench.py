"""Loopback round trip runtime <-> bridge over real ZeroMQ sockets (kinematic sim driver).

    python bench/bridge_bench.py [--n 500] [--servo-hz 1000]

* target -> state: a target goes out on the action socket; time until a state message that
  acknowledges it (``last_chunk_seq``) arrives on the state socket. Includes validation,
  one servo tick (the state is published from the servo loop) and both hops, so it is
  bounded below by the servo period: the bridge runs at ``--servo-hz`` here.
* command -> reply: ``status`` on the DEALER/ROUTER pair, correlated by sequence number.
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
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "bridge_loopback.json")
    args = ap.parse_args()

    import zmq

    from vpp_edge.firmware_bridge.bridge import Bridge, Endpoints
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.firmware_bridge.driver import KinematicSimDriver
    from vpp_edge.runtime import protocol as P
    from vpp_edge.runtime.link import BridgeLink
    from vpp_edge.runtime.metrics import percentiles

    cfg = dataclasses.replace(load_bridge_config("sim"), servo_hz=args.servo_hz, state_hz=args.servo_hz)
    ctx = zmq.Context()
    bridge = Bridge(KinematicSimDriver(cfg.dim), cfg, Endpoints(*["tcp://127.0.0.1:*"] * 4), ctx).start()
    ends = bridge.bound()
    link = BridgeLink(ends.action, ends.state, ends.events, ends.command, context=ctx)
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


if __name__ == "__main__":
    sys.exit(main())
