"""``vpp calibrate``: calibration sets, latency/accuracy sweeps and their report.

    vpp calibrate sweep [--grid tiny] [--out DIR] [--checkpoint CKPT]   measure (resumable) + report
    vpp calibrate report DIR                                            re-render a sweep's report
    vpp calibrate dataset --out FILE.npz [--samples N]                  a calibration set from real episodes
    vpp calibrate knobs                                                 what a grid can turn

Heavy imports happen inside the commands, so ``vpp --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``vpp calibrate`` and its subcommands on the ``vpp`` parser."""
    p = sub.add_parser("calibrate", help="INT8 calibration sets and latency/accuracy sweeps: which configuration "
                                         "should the robot run?",
                       description="Sweep precision, backend and model knobs (TVP steps, DiT steps, frames, extract "
                                   "layer, views), measure per-stage latency and action error against FP32 on "
                                   "held-out episodes, and recommend the fastest configuration within tolerance.")
    csub = p.add_subparsers(dest="calibrate_command", required=True, metavar="SUBCOMMAND")

    s = csub.add_parser("sweep", help="run (or resume) a sweep and write its report",
                        description="Measure every point of a sweep file not yet measured in --out (finished points "
                                    "are kept: Ctrl-C and run again to resume), then write report.csv/json, "
                                    "pareto.png, stages.png, summary.md and recommended.yaml. Exits 2 when no point "
                                    "is within the tolerance.")
    s.add_argument("--grid", default="tiny", help="sweep name in calibrate/sweeps (default tiny) or a YAML file")
    s.add_argument("--out", type=Path, help="output folder (default artifacts/calibrate/<sweep name>)")
    s.add_argument("--checkpoint", type=Path, help="trained vpp-edge checkpoint (default: the sweep's model section)")
    s.add_argument("--data", type=Path, action="extend", nargs="+", metavar="DIR",
                   help="folder(s) of datasets in the official sample format (repeatable; default shared/vpp_samples)")
    s.add_argument("--calibration-set", type=Path, help="calibration set .npz from 'vpp calibrate dataset'")
    s.add_argument("--heldout-set", type=Path, help="held-out set .npz from 'vpp calibrate dataset'")
    s.add_argument("--fresh", action="store_true", help="discard earlier results in --out (the graph cache stays)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_opt_in(s)
    s.set_defaults(func=cmd_sweep)

    r = csub.add_parser("report", help="re-render a sweep's report from its finished points",
                        description="Rebuild the report and the recommendation of a sweep folder without measuring "
                                    "(e.g. after changing recommend.tolerance in the sweep file).")
    r.add_argument("out", type=Path, help="sweep output folder")
    r.add_argument("--grid", help="sweep file whose 'recommend' section to use (default: the one the sweep ran)")
    _add_opt_in(r)
    r.set_defaults(func=cmd_report)

    d = csub.add_parser("dataset", help="sample a calibration set from real episodes into an .npz",
                        description="Sample observations (every camera view + the instruction) across episodes in "
                                    "the official sample format and save them as an .npz (no pickle).")
    d.add_argument("--out", type=Path, required=True, help="output .npz")
    d.add_argument("--preset", default="tiny", help="preset giving the views and image size (default tiny)")
    d.add_argument("--samples", type=int, default=16, help="observations (default 16)")
    d.add_argument("--offset", type=int, default=0,
                   help="time-step offset (use another one for a held-out set; default %(default)s)")
    d.add_argument("--data", type=Path, action="extend", nargs="+", metavar="DIR",
                   help="folder(s) of datasets in the official sample format (repeatable; default shared/vpp_samples)")
    d.set_defaults(func=cmd_dataset)

    k = csub.add_parser("knobs", help="list the knobs a sweep grid can turn",
                        description="List every knob a sweep file's grid can turn, what it changes and the values "
                                    "it takes for a preset.")
    k.add_argument("--preset", default="tiny", help="show values for this preset (default tiny)")
    k.set_defaults(func=cmd_knobs)


def _add_opt_in(parser: argparse.ArgumentParser) -> None:
    """The opt-in that lets a recommendation change what the policy is fed."""
    parser.add_argument("--allow-input-changes", action="store_true",
                        help="let the recommendation change the policy's inputs (fewer cameras: views; fewer "
                             "frames). Off by default: such points are measured and plotted, never recommended")


def _overrides(args: argparse.Namespace) -> dict:
    return {"data": {"roots": [str(p) for p in args.data]}} if getattr(args, "data", None) else {}


def _model_description(spec, checkpoint: Path | None) -> str:
    if checkpoint is not None:
        return f"checkpoint {checkpoint}"
    return f"untrained '{spec['model']['preset']}' model (random weights, seed {spec['model']['seed']})"


def _render(out: Path, spec, checkpoint: Path | None, rows: list, allow_input_changes: bool = False) -> dict:
    from .report import write_report
    from .sweep import STATE_FILE, base_preset
    from . import knobs as K

    state = json.loads((out / STATE_FILE).read_text())
    wall = sum(r.get("wall_s", 0.0) for r in state.get("runs", []))
    split = out / "data" / "split.txt"
    note = split.read_text().strip() if split.is_file() else ""
    base = K.normalize({**K.base_values(base_preset(spec, checkpoint)), **spec["base"]})
    return write_report(out, spec, rows, base, wall, note, _model_description(spec, checkpoint), allow_input_changes)


def cmd_sweep(args: argparse.Namespace) -> int:
    from .grid import load_spec
    from .sweep import run_sweep

    spec = load_spec(args.grid, _overrides(args))
    out = args.out or Path("artifacts") / "calibrate" / spec.name
    checkpoint = args.checkpoint or (Path(spec["model"]["checkpoint"]) if spec["model"]["checkpoint"] else None)
    outcome = run_sweep(spec, out, checkpoint, fresh=args.fresh, progress=not args.quiet,
                        calibration_set=args.calibration_set, heldout_set=args.heldout_set)
    _save_spec(out, args.grid, spec)
    report = _render(out, spec, checkpoint, outcome.rows, args.allow_input_changes)
    _print(report, out, outcome.measured_now, outcome.wall_s)
    return 0


def _save_spec(out: Path, grid: str, spec) -> None:
    from .sweep import STATE_FILE

    state = json.loads((out / STATE_FILE).read_text())
    state["spec"] = {"grid": str(grid), "source": spec.source, "checkpoint": spec["model"]["checkpoint"]}
    (out / STATE_FILE).write_text(json.dumps(state, indent=1, default=str))


def cmd_report(args: argparse.Namespace) -> int:
    from vpp_edge.errors import VPPError

    from .grid import load_spec
    from .sweep import STATE_FILE, read_rows

    state_path = args.out / STATE_FILE
    if not state_path.is_file():
        raise VPPError(f"{args.out}: no {STATE_FILE} (not a sweep folder; run 'vpp calibrate sweep' first)")
    state = json.loads(state_path.read_text())
    saved = state.get("spec") or {}
    spec = load_spec(args.grid or saved.get("source") or saved.get("grid") or "tiny")
    ckpt = state["context"].get("checkpoint")
    checkpoint = Path(ckpt["path"]) if ckpt else None
    rows = read_rows(args.out)
    report = _render(args.out, spec, checkpoint, rows, args.allow_input_changes)
    _print(report, args.out, 0, None)
    return 0


def _print(report: dict, out: Path, measured_now: int, wall_s: float | None) -> None:
    from rich.console import Console

    console = Console()
    c = report["counts"]
    extra = f"; {measured_now} measured now in {wall_s:.0f} s" if wall_s is not None else ""
    console.print(f"[bold]sweep {report['sweep']}[/bold]: {c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped"
                  f"{extra}; report in {out}/summary.md")
    pick = next((p for p in report["points"] if p["id"] == report["recommended"]), None)
    if pick:
        console.print(f"recommended: [green]{pick['label']}[/green] ({pick['total_p50_ms']:.1f} ms p50, action MSE "
                      f"{pick['action_mse']:.2e}) -> {report['runtime_config']}")
        console.print(f"trades: {report['trade']}", highlight=False)
    if report["ineligible"]:
        console.print(f"{len(report['ineligible'])} point(s) that change the policy's inputs (cameras, frames) were "
                      "not considered; --allow-input-changes lets them be", highlight=False)


def cmd_dataset(args: argparse.Namespace) -> int:
    from vpp_edge.presets import get_preset

    from .dataset import build_observation_set
    from vpp_edge.observations import find_episodes

    preset = get_preset(args.preset)
    episodes = find_episodes(preset.num_views, args.data)
    obs = build_observation_set(preset.num_views, preset.image_size, args.samples, episodes, args.offset)
    obs.save(args.out)
    states = ("no robot states (a state-taking policy gets seeded ones)" if obs.states is None
              else f"their recorded {obs.states.shape[1]}-value robot states")
    print(f"wrote {args.out}: {len(obs)} observations of {obs.num_views} view(s) at {obs.image_size} px from "
          f"{len(episodes)} episode(s), with {states}")
    return 0


def cmd_knobs(args: argparse.Namespace) -> int:
    from vpp_edge.presets import get_preset

    from . import knobs as K

    preset = get_preset(args.preset)
    base = K.base_values(preset)
    import textwrap

    for name, knob in K.KNOBS.items():  # 80 columns: the name line, then the help indented
        print(f"{name:14s} [{knob.kind}] trained/default: {base[name]}")
        print(textwrap.fill(knob.help, 80, initial_indent="    ", subsequent_indent="    "))
    return 0
