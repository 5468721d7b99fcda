"""`vpp record metaworld` and `vpp eval metaworld`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .metaworld import DEMO_TASKS

DEFAULT_TASKS = ",".join(DEMO_TASKS)


def _tasks(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_record(args: argparse.Namespace) -> int:
    from .metaworld import record_demos

    summary = record_demos(_tasks(args.tasks), args.episodes, args.out, image_size=args.image_size, seed=args.seed,
                           split=args.split, progress=not args.quiet)
    for task, s in summary["tasks"].items():
        print(f"{task}: {s['episodes']} demos (mean {s['mean_length']:.1f} actions), "
              f"{s['failed_attempts']} failed oracle attempts dropped")
    print(f"{summary['episodes']} episodes in {args.out} ({args.split} split)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .metaworld import EvalOptions, evaluate, write_report

    options = EvalOptions(tasks=tuple(_tasks(args.tasks)), episodes=args.episodes, seed=args.seed,
                          max_steps=args.max_steps, backend=args.backend, precision=args.precision,
                          smoothing=args.smoothing, threads=args.threads, inject_latency_ms=args.inject_ms,
                          video_dir=str(args.out / "videos") if args.video else None,
                          video=AnnotatedVideo() if args.video else None,
                          on_episode=None if args.quiet else print_episode)
    results = evaluate(args.artifact, options, progress=not args.quiet)
    report = write_report(results, args.out)
    print(report.read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


class AnnotatedVideo:
    """Each episode's annotated video (vpp replay's: camera views, instruction, tick, the
    predicted chunk against the targets sent), ``<log>.mp4`` beside its run log, from the
    frames a FrameLog keeps while it runs; the frames folder goes, the log stays."""

    def sinks(self, log: Path, cameras: list) -> list:
        from vpp_edge.run_video import FrameLog, frames_dir

        return [FrameLog(frames_dir(log), cameras)]

    def finish(self, log: Path) -> Path:
        import shutil

        from vpp_edge.run_video import frames_dir, render_video

        video, _, _ = render_video(log, log.with_suffix(".mp4"))
        shutil.rmtree(frames_dir(log), ignore_errors=True)
        return video


def print_episode(task: str, episode: dict) -> None:
    """One line per finished episode, above the progress bar: MetaWorld's own success flag."""
    from tqdm import tqdm

    outcome = f"success at step {episode['steps']}" if episode["success"] else f"failed after {episode['steps']} steps"
    tqdm.write(f"{task} seed {episode['seed']}: {outcome} ({episode['chunks']} chunks)")


def add_parsers(sub) -> None:
    from vpp_edge.cli import PRECISION_CHOICES, SMOOTHING_CHOICES, LazyChoices

    p = sub.add_parser("record", help="record oracle demonstrations in a simulator into the sample format",
                       description="Run the simulator's scripted oracle on each task and keep its successful "
                                   "episodes (camera views, states, actions, the task as instruction) as a dataset "
                                   "in the official sample format, ready for 'vpp train' and 'vpp export --data'.")
    p.add_argument("simulator", choices=["metaworld"], help="simulator to record in: %(choices)s")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma list of MetaWorld tasks (default {DEFAULT_TASKS})")
    p.add_argument("--episodes", type=int, default=10, help="successful demonstrations per task (default 10)")
    p.add_argument("--out", type=Path, default=Path("data/metaworld"), help="dataset folder (default data/metaworld)")
    p.add_argument("--split", default="train", help="annotation split to write (default train)")
    p.add_argument("--image-size", type=int, default=128, help="rendered camera size (default 128)")
    p.add_argument("--seed", type=int, default=0, help="first episode seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("eval", help="closed-loop evaluation in a simulator through bridge + runtime",
                       description="Each episode: the simulator bridge resets the world, its cameras stream to the "
                                   "runtime over ZeroMQ, the runtime acts until MetaWorld reports success or the "
                                   "step limit. Writes results.json and results.md.")
    p.add_argument("simulator", choices=["metaworld"], help="simulator to evaluate in: %(choices)s")
    p.add_argument("--artifact", type=Path, required=True, help="exported artifact of a MetaWorld-shaped model")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma list of tasks (default {DEFAULT_TASKS})")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task (default 10)")
    p.add_argument("--seed", type=int, default=1000, help="first evaluation seed (default 1000)")
    p.add_argument("--max-steps", type=int, default=200, help="MetaWorld steps per episode (default 200)")
    p.add_argument("--backend", default="onnxruntime", metavar="BACKEND",
                   choices=LazyChoices("vpp_edge.runtime.engines", lambda m: m.BACKENDS),
                   help="%(choices)s (default %(default)s)")
    p.add_argument("--precision", default="fp32", choices=PRECISION_CHOICES, metavar="PRECISION",
                   help="%(choices)s (default %(default)s)")
    p.add_argument("--smoothing", default="crossfade", choices=SMOOTHING_CHOICES, metavar="MODE",
                   help="%(choices)s (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: its choice)")
    p.add_argument("--inject-ms", type=float, default=0.0,
                   help="measurement only: every inference this many ms longer, as on a slower engine (default 0)")
    p.add_argument("--out", type=Path, default=Path("results/metaworld"), help="report folder (default %(default)s)")
    p.add_argument("--video", action="store_true", help="an annotated video of each episode in OUT/videos (views, instruction, "
                   "predicted chunk vs targets sent)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
