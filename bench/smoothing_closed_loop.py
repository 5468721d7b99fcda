"""Chunk smoothing compared closed loop on the trained MetaWorld policy.

Every smoothing policy of the runtime (none, ensemble, crossfade, rtc) at each injected
inference latency (the runtime's measurement mode: every inference that much longer, as on
a Jetson at paper scale), through the same path as ``vpp eval metaworld``: MetaWorld on
MuJoCo behind the bridge, streamed cameras, the runtime on ONNX Runtime. Per cell: success
rate (MetaWorld's flag), episode length, boundary jumps, action jerk, starved ticks, and the
measured end-to-end latency.

    python bench/smoothing_closed_loop.py --artifact artifacts/metaworld_tiny --episodes 5

Cells already in ``--json`` are kept (an interrupted run resumes); ``--plot`` draws the
table as a figure. Episodes per cell = episodes per task x tasks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODES = ("none", "ensemble", "crossfade", "rtc")


def cell_figures(results: dict) -> dict:
    """One cell's figures from an evaluation's results (means over every episode)."""
    from vpp_edge.evaluation.metaworld import EPISODE_MEANS

    episodes = [e for t in results["tasks"].values() for e in t["episodes_detail"]]
    return {"episodes": len(episodes), "success": sum(e["success"] for e in episodes) / len(episodes),
            "mean_length": sum(e["steps"] for e in episodes) / len(episodes),
            **{k: results[k] for k in EPISODE_MEANS}, "end_to_end_ms_p50": results["end_to_end_ms_p50_median"],
            "per_task": {t: r["success_rate"] for t, r in results["tasks"].items()}}


def table(cells: list[dict]) -> str:
    """The cells as a Markdown table."""
    lines = ["| smoothing | injected ms | measured e2e p50 ms | success | episode steps | boundary jump | "
             "action jerk | starved ticks / episode |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in cells:
        lines.append(f"| {c['smoothing']} | {c['inject_ms']:.0f} | {c['end_to_end_ms_p50'] or float('nan'):.0f} | "
                     f"{c['success']:.2f} ({c['episodes']}) | {c['mean_length']:.0f} | {c['boundary_jump']:.4f} | "
                     f"{c['action_jerk']:.4f} | {c['starved_ticks']:.1f} |")
    return "\n".join(lines)


def plot(cells: list[dict], out: Path) -> Path:
    """Success, boundary jump and jerk against the injected latency, a line per smoothing mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("success", "boundary_jump", "action_jerk"),
                              ("success rate", "mean boundary jump (normalised units)", "mean action jerk")):
        for mode in MODES:
            rows = sorted((c for c in cells if c["smoothing"] == mode), key=lambda c: c["inject_ms"])
            if rows:
                ax.plot([c["inject_ms"] for c in rows], [c[key] for c in rows], marker="o", label=mode)
        ax.set_xlabel("injected inference latency (ms)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend()
    fig.suptitle("Chunk smoothing closed loop: trained MetaWorld policy, MuJoCo behind the bridge")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    from vpp_edge.evaluation.metaworld import DEMO_TASKS, EvalOptions, evaluate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=Path("artifacts/metaworld_tiny"))
    ap.add_argument("--tasks", default=",".join(DEMO_TASKS), help="comma list (default: the demo's tasks)")
    ap.add_argument("--episodes", type=int, default=5, help="episodes per task and cell (default 5)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--inject-ms", default="0,150,300", help="injected latencies, comma list (default 0,150,300)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--seed", type=int, default=2000, help="first evaluation seed (default 2000)")
    ap.add_argument("--json", type=Path, default=Path("bench/results/smoothing_closed_loop.json"))
    ap.add_argument("--plot", type=Path, default=Path("bench/results/smoothing_closed_loop.png"))
    args = ap.parse_args(argv)

    done = json.loads(args.json.read_text()) if args.json.is_file() else {"cells": []}
    tasks = tuple(t for t in args.tasks.split(",") if t)
    for inject in [float(v) for v in args.inject_ms.split(",") if v]:
        for mode in [m for m in args.modes.split(",") if m]:
            if any(c["smoothing"] == mode and c["inject_ms"] == inject for c in done["cells"]):
                continue
            print(f"--- {mode}, +{inject:.0f} ms", flush=True)
            results = evaluate(args.artifact, EvalOptions(tasks=tasks, episodes=args.episodes, seed=args.seed,
                                                          precision=args.precision, smoothing=mode,
                                                          inject_latency_ms=inject))
            done["cells"].append({"smoothing": mode, "inject_ms": inject, **cell_figures(results)})
            done.update(artifact=str(args.artifact), precision=args.precision, tasks=list(tasks))
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(done, indent=2))  # after every cell: an interrupted run resumes
    cells = sorted(done["cells"], key=lambda c: (c["inject_ms"], MODES.index(c["smoothing"])))
    print(table(cells))
    print(f"wrote {args.json} and {plot(cells, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
