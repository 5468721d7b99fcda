"""Runtime benchmark on this machine (tiny preset), printed as a table and written as JSON.

    python bench/runtime_bench.py [--artifact artifacts/tiny] [--repeats 20] [--loop-seconds 10]

1. predict step: ONNX Runtime vs PyTorch eager, run alternately (side by side, so machine
   noise hits both), median and p95, and their ratio;
2. runtime overhead outside the engines per inference (tokenizer-free path: noise draw,
   chaining, checks, de-normalisation), p50/p99;
3. control-loop jitter at 50 Hz while inference runs continuously (sim bridge over
   loopback ZeroMQ);
4. starvation at a 10 Hz control rate when each predict step is padded to Jetson-class
   latencies (``--inject-ms``, e.g. 150/200/300 ms), per chunk-smoothing policy: ticks
   without a fresh action, actions skipped as late, chunk latency p95, boundary jumps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from baseline import open_benchmark  # bench/baseline.py (scripts run from bench/)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=Path("artifacts/tiny"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--loop-seconds", type=float, default=10.0)
    ap.add_argument("--checkpoint", type=Path,
                    help="checkpoint the artifact was exported from (default: the untrained tiny one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rt-priority", type=int, default=0, help="SCHED_FIFO priority of the control thread")
    ap.add_argument("--loop-engines", default="onnxruntime:fp32",
                    help="backend:precision[:option=int...] list whose 50 Hz control-loop jitter is measured, each "
                         "loading the process in turn (e.g. onnxruntime:int8_cpu,openvino:int8_ov:pin_threads=0)")
    ap.add_argument("--inject-ms", default="150,200,300",
                    help="predict-step latencies to simulate for the starvation runs ('' to skip)")
    ap.add_argument("--starvation-seconds", type=float, default=8.0)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "runtime_cpu.json")
    args = ap.parse_args()

    import zmq

    from vpp_edge.demo_data import default_episode
    from vpp_edge.episodes import load_episode
    from vpp_edge.firmware_bridge.bridge import loopback_bridge
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.runtime.build import build_runtime, load_policy
    from vpp_edge.runtime.cameras import ReplayCameras
    from vpp_edge.runtime.config import LinkConfig, RuntimeConfig, SmoothingConfig
    from vpp_edge.runtime.metrics import percentiles
    from vpp_edge.runtime.robot_config import load_robot_config

    artifact, ckpt = open_benchmark(ap, args)
    episode = load_episode(default_episode())
    from vpp_edge.observations import sample_observations

    obs = sample_observations(artifact.preset.num_views, artifact.preset.image_size, 1)[0]

    results: dict = {"machine": {"threads": args.threads}, "preset": artifact.preset.name}
    policies = {"onnxruntime_fp32": load_policy(artifact, "onnxruntime", "fp32", args.threads).runtime,
                "pytorch_eager_fp32": load_policy(artifact, "torch", "fp32", checkpoint=ckpt).runtime}
    for p in policies.values():
        p.set_instruction(obs.instruction)
        p.infer(obs.frames)  # warm-up
    step = {name: [] for name in policies}
    overhead = []
    for _ in range(args.repeats):
        for name, p in policies.items():  # alternate: machine noise hits both the same
            start = time.perf_counter()
            chunk = p.infer(obs.frames)
            total = (time.perf_counter() - start) * 1e3
            step[name].append(total)
            if name == "onnxruntime_fp32":
                overhead.append(total - sum(chunk.timings_ms.values()))
    results["predict_step_ms"] = {n: {"median": statistics.median(v), "p95": float(np.percentile(v, 95))}
                                  for n, v in step.items()}
    ratio = results["predict_step_ms"]["pytorch_eager_fp32"]["median"] / results["predict_step_ms"]["onnxruntime_fp32"]["median"]
    results["onnxruntime_speedup_vs_pytorch"] = ratio
    results["runtime_overhead_ms"] = percentiles(overhead)

    def closed_loop(policy, robot, config) -> dict:
        """The runtime ``config`` describes (built as vpp run builds it) against a sim bridge over
        loopback ZeroMQ; its summary."""
        ctx = zmq.Context()
        bridge, base = loopback_bridge(load_bridge_config("sim"), ctx)
        bridge.start()
        cams = [ReplayCameras(episode, artifact.preset.num_views, artifact.preset.image_size)]
        config = config.replace(instruction=obs.instruction, bridge=LinkConfig(base_port=base))
        try:
            with build_runtime(config, policy=policy, cameras=cams, robot=robot, set_instruction=False) as built:
                return built.run()
        finally:
            bridge.close()
            ctx.destroy(linger=0)

    # Control loop at 50 Hz with inference running back to back, per engine.
    results["control_loop_50hz"] = {}
    for spec in args.loop_engines.split(","):
        backend, precision, *extra = spec.split(":")
        options = {"threads": args.threads, **{k: int(v) for k, v in (o.split("=") for o in extra)}}
        loop_policy = load_policy(artifact, backend, precision, **options).runtime
        loop_policy.set_instruction(obs.instruction)
        summary = closed_loop(loop_policy, dataclasses.replace(load_robot_config("sim"), control_hz=50.0),
                              RuntimeConfig(duration_s=args.loop_seconds, rt_priority=args.rt_priority,
                                            smoothing=SmoothingConfig(action_dt=0.1, margin_steps=100)))
        results["control_loop_50hz"][spec] = {"jitter_ms": summary["latency_ms"]["jitter_ms"],
                                              "inferences": summary["counts"].get("chunks", 0)}

    # Starvation when inference is as slow as on a Jetson: the runtime's injected latency pads
    # each step (RuntimeConfig.inject_latency_ms) up to the target on top of this machine's median.
    base_ms = results["predict_step_ms"]["onnxruntime_fp32"]["median"]
    results["starvation_10hz"] = []
    padded = load_policy(artifact, "onnxruntime", "fp32", threads=args.threads).runtime
    padded.set_instruction(obs.instruction)
    for target_ms in [float(v) for v in args.inject_ms.split(",") if v]:
        for smoothing in ("crossfade", "rtc"):
            s = closed_loop(padded, load_robot_config("sim"),
                            RuntimeConfig(duration_s=args.starvation_seconds, smoothing=SmoothingConfig(smoothing),
                                          inject_latency_ms=max(0.0, target_ms - base_ms)))
            ticks = s["latency_ms"]["jitter_ms"]["n"]
            results["starvation_10hz"].append({
                "step_ms": target_ms, "smoothing": smoothing, "ticks": ticks,
                "inferences": s["counts"].get("chunks", 0),
                "starved_ticks": s["safety"].get("starvation", 0),
                "actions_skipped_late": s["counts"].get("actions_skipped_late", 0),
                "chunk_latency_p95_ms": s["latency_tracker_s"]["p95"] * 1e3,
                "boundary_jump_mean": s["boundary_jump"]["mean"]})

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"runtime benchmark, tiny preset, {args.threads} threads")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for n, s in results["predict_step_ms"].items():
        t.add_row(f"predict step {n} (median / p95 ms)", f"{s['median']:.1f} / {s['p95']:.1f}")
    t.add_row("ONNX Runtime speed-up vs PyTorch eager (x)", f"{ratio:.2f}")
    o = results["runtime_overhead_ms"]
    t.add_row("overhead outside engines per inference (p50 / p99 ms)", f"{o['p50']:.3f} / {o['p99']:.3f}")
    for spec, loop in results["control_loop_50hz"].items():
        j = loop["jitter_ms"]
        t.add_row(f"control jitter at 50 Hz during {spec} inference (p50 / p99 / max ms; inferences)",
                  f"{j['p50']:.3f} / {j['p99']:.3f} / {j['max']:.3f}; {loop['inferences']}")
    for r in results["starvation_10hz"]:
        t.add_row(f"10 Hz, step {r['step_ms']:.0f} ms, {r['smoothing']}: starved ticks / skipped late / "
                  f"chunk p95 ms / jump", f"{r['starved_ticks']}/{r['ticks']} / {r['actions_skipped_late']} / "
                  f"{r['chunk_latency_p95_ms']:.0f} / {r['boundary_jump_mean']:.4f}")
    Console(width=max(140, Console().width)).print(t)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
