"""Paper-scale export (issue 20): `vpp export --preset calvin` with random weights, in a
child process, measured from outside.

    python bench/paper_export.py [--out artifacts/calvin-bench] [--precisions fp32,fp16]
                                 [--parity-samples 1] [--limit-gb 12] [--kill-gb 15]
                                 [--json bench/results/paper_export.json]
    python bench/paper_export.py --convert RELEASE [--out artifacts/calvin-converted]

``--convert RELEASE`` measures ``vpp convert`` of an official-layout release instead (a
diffusers SVD folder, a CLIP folder and a ``dp-calvin.pt`` whose state dict, like the
official file, also carries a frozen copy of the video model under ``TVP_encoder.``); a
missing RELEASE is first written with the preset's random weights (about 12 GB on disk),
in a child measured the same way, so nothing here holds two paper-scale models at once.

Prints per phase (reference run, FP32 export per graph, precision passes, parity per
precision) the wall time, the child's resident memory at the phase's end and its peak so
far (its own getrusage); then the kernel's peak resident memory of the whole child
(``os.wait4``; the largest single process of its tree), the peak of the whole tree's
resident memory (the export and its parity workers, summed, sampled every second), the
files written with their sizes and the parity figures with each worker's peak. A watchdog
kills the tree when its resident memory passes ``--kill-gb`` (on a shared machine the
kernel's out-of-memory killer would pick any process). Exits 1 when the export fails or the
tree's peak exceeds ``--limit-gb``. Timings are measured here, never asserted
in tests (tests/test_export_streaming.py runs this script only when VPP_PAPER_EXPORT=1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _PhaseFile(logging.Handler):
    """Appends each export phase's figures (the ``export_phase`` extra of
    vpp_edge.export.phases) to a JSON-lines file, and echoes it."""

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        phase = getattr(record, "export_phase", None)
        if phase is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(phase) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] {record.getMessage()}", file=sys.stderr, flush=True)


def child(args: argparse.Namespace) -> int:
    logger = logging.getLogger("vpp_edge.export.phases")
    logger.setLevel(logging.INFO)
    logger.addHandler(_PhaseFile(Path(args.phases)))
    from vpp_edge.cli import main

    cmd = ["export", "--preset", args.preset, "--out", args.out, "--parity-samples", str(args.parity_samples),
           "--quiet"]
    if args.precisions:
        cmd += ["--precisions", args.precisions]
    if args.calibration_samples:
        cmd += ["--calibration-samples", str(args.calibration_samples)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return main(cmd)


def child_release(args: argparse.Namespace) -> int:
    """Write a paper-size official-layout release (random weights) to ``args.convert``."""
    import torch
    from diffusers import EulerDiscreteScheduler

    from vpp_edge.presets import get_preset
    from vpp_edge.training.checkpoints import to_official_state_dict
    from vpp_edge.training.models import build_policy

    root = Path(args.convert)
    policy, tokenizer = build_policy(get_preset(args.preset), seed=0)
    video = root / "svd-robot"
    policy.tvp.unet.save_pretrained(video / "unet")  # one safetensors file, as the official release
    policy.tvp.vae.save_pretrained(video / "vae")
    EulerDiscreteScheduler.from_config(policy.tvp.scheduler_config).save_pretrained(video / "scheduler")
    policy.text_encoder.clip.save_pretrained(root / "clip")
    tokenizer.save(root / "clip")
    state = to_official_state_dict(policy)
    # The official action-model file keeps the frozen video model too (loaders ignore it).
    state.update({f"TVP_encoder.pipeline.unet.{k}": v for k, v in policy.tvp.unet.state_dict().items()})
    torch.save({"model": state, "global_step": 0}, root / "dp-calvin.pt")
    return 0


def child_convert(args: argparse.Namespace) -> int:
    from vpp_edge.cli import main

    root = Path(args.convert)
    return main(["convert", "--video-model", str(root / "svd-robot"), "--clip", str(root / "clip"),
                 "--action-model", str(root / "dp-calvin.pt"), "--preset", args.preset, "--out", args.out])


def child_modelopt_quantize(args: argparse.Namespace) -> int:
    """NVIDIA's INT8 path on the TVP graph (export/modelopt_int8.py): the preset's random
    weights (seed 0, as vpp export), modelopt PTQ calibrated on real frames, the fake-quant
    action chunk vs FP32 in PyTorch, the Q/DQ graph exported; saves the FP32 reference run of
    the parity observation for the ONNX Runtime chain (child_modelopt_parity)."""
    import numpy as np
    import torch

    from vpp_edge.export import modelopt_int8, parity
    from vpp_edge.export.artifact import reference
    from vpp_edge.export.options import load_options
    from vpp_edge.observations import sample_observations
    from vpp_edge.presets import get_preset
    from vpp_edge.training.models import build_policy
    from vpp_edge.training.models.graph_modules import TVPGraph

    out, figures, clock = Path(args.out), {}, time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    opts = load_options()

    def lap(name: str) -> None:
        nonlocal clock
        figures[f"{name}_s"] = round(time.perf_counter() - clock, 1)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {figures[f'{name}_s']} s", file=sys.stderr, flush=True)
        clock = time.perf_counter()

    preset = get_preset(args.preset)
    policy, tokenizer = build_policy(preset, seed=0)
    obs = sample_observations(preset.num_views, preset.image_size, 1 + args.calibration_samples)
    lap("build")
    ref = reference(policy, tokenizer, obs[0], seed=0)  # the export's parity reference
    calib = [reference(policy, tokenizer, o, seed=100 + k) for k, o in enumerate(obs[1:])]
    tvp_args = [tuple(r[k] for k in ("frames", "condition", "noise")) for r in calib]
    del calib
    lap("reference")

    graph = TVPGraph(policy)

    def loop(_: torch.nn.Module) -> None:  # the video model is quantised in place; the graph runs it
        for a in tvp_args:
            graph(*a)

    modelopt_int8.quantize(policy.tvp, loop, opts["int8"]["exclude_modules"])
    figures["quantized_layers"] = modelopt_int8.quantized_layers(policy.tvp)
    lap("calibrate")
    fake = reference(policy, tokenizer, obs[0], seed=0)  # the quantisers sit in the policy's UNet
    figures["fake_quant_actions"] = parity.compare(ref["actions"].numpy(), fake["actions"].numpy())
    figures["fake_quant_features"] = parity.compare(ref["features"].numpy(), fake["features"].numpy())
    lap("fake_quant_run")
    modelopt_int8.export_qdq(graph, tuple(ref[k] for k in ("frames", "condition", "noise")), out / "tvp" / "tvp.onnx",
                             ("frames", "condition", "noise"), ("features",), opts["opset"])
    lap("export_qdq")
    np.savez(out / "reference.npz", **{k: v.numpy() for k, v in ref.items()})
    meta = {"sigmas": list(policy.action_head.sigmas), "scale": policy.action_scale.tolist(),
            "offset": policy.action_offset.tolist(), "figures": figures}
    (out / "reference.json").write_text(json.dumps(meta, indent=1, default=float))
    return 0


def child_modelopt_parity(args: argparse.Namespace) -> int:
    """The end-to-end action chunk with the modelopt Q/DQ TVP graph in ONNX Runtime (lean
    worker) and the other graphs in FP32 (``--fp32-graphs``: an export's graph cache)."""
    import numpy as np

    from vpp_edge.export import parity
    from vpp_edge.export.graphs import GRAPHS
    from vpp_edge.export.options import load_options

    out, cache = Path(args.out), Path(args.fp32_graphs)
    paths = {g: next(cache.glob(f"fp32/{g}-*/{g}.onnx")) for g in GRAPHS}
    paths["tvp"] = out / "tvp" / "tvp.onnx"
    with np.load(out / "reference.npz", allow_pickle=False) as z:
        ref = dict(z)
    meta = json.loads((out / "reference.json").read_text())
    start = time.perf_counter()
    result = parity.evaluate_precision("int8", paths, [ref], meta["sigmas"], "sampler", np.array(meta["scale"]),
                                       np.array(meta["offset"]), load_options()["gates"])
    result["seconds"] = round(time.perf_counter() - start, 1)
    (out / "parity.json").write_text(json.dumps(result, indent=1, default=float))
    return 0


def parent_modelopt(args: argparse.Namespace) -> int:
    """Both modelopt children, each measured with the watchdog."""
    out = Path(args.out)
    base = [sys.executable, __file__, "--preset", args.preset, "--out", str(out), "--int8-modelopt",
            "--calibration-samples", str(args.calibration_samples or 1)]
    result: dict = {"preset": args.preset, "calibration_samples": args.calibration_samples or 1}
    result["quantize"] = _summary("modelopt PTQ + Q/DQ export of the TVP graph",
                                  *measure(base + ["--child-modelopt-quantize"], args.kill_gb), args.limit_gb)
    if result["quantize"]["exit_code"] == 0:
        result.update(json.loads((out / "reference.json").read_text())["figures"])
        result["files"] = _files(out / "tvp")
        print(json.dumps({k: v for k, v in result.items() if k != "files"}, indent=1))
        if args.fp32_graphs:
            result["parity"] = _summary("ONNX Runtime chain with the Q/DQ TVP graph",
                                        *measure(base + ["--fp32-graphs", args.fp32_graphs, "--child-modelopt-parity"],
                                                 args.kill_gb), args.limit_gb)
            if result["parity"]["exit_code"] == 0:
                report = json.loads((out / "parity.json").read_text())
                result["parity"].update({k: report[k] for k in ("graphs", "actions", "gate", "passed", "seconds",
                                                                "worker_peak_rss_bytes")})
                print(json.dumps(result["parity"], indent=1))
    Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {args.json}")
    return 0 if all(result[k]["exit_code"] == 0 for k in ("quantize", "parity") if k in result) else 1


def _files(out: Path) -> list[tuple[str, int]]:
    return [(str(p.relative_to(out)), p.stat().st_size) for p in sorted(out.rglob("*")) if p.is_file()]


def _tree_rss(session: int) -> dict[int, int]:
    """Resident bytes of each process in the session ``session`` (the export's tree)."""
    rss, page = {}, os.sysconf("SC_PAGE_SIZE")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == session:  # fields after the name: state ppid pgrp session ...
                with open(f"/proc/{pid}/statm") as f:
                    rss[int(pid)] = int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
    return rss


class Watchdog(threading.Thread):
    """Samples the tree's resident memory every ``every`` seconds; kills the whole session
    (SIGKILL) once it passes ``kill_bytes``. ``peak``: the largest sample."""

    def __init__(self, session: int, kill_bytes: float, every: float = 1.0):
        super().__init__(daemon=True)
        self.session, self.kill_bytes, self.every = session, kill_bytes, every
        self.peak, self.killed_at = 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            per_process = _tree_rss(self.session)
            rss = sum(per_process.values())
            self.peak = max(self.peak, rss)
            if rss > self.kill_bytes:
                self.killed_at = rss
                print(f"watchdog: the export's tree holds {rss / 1e9:.2f} GB > {self.kill_bytes / 1e9:.1f} GB, "
                      f"killing it (per process: {', '.join(f'{p} {b / 1e9:.2f} GB' for p, b in per_process.items())})",
                      file=sys.stderr, flush=True)
                os.killpg(self.session, signal.SIGKILL)
                return


def measure(cmd: list[str], kill_gb: float) -> tuple[int, float, object, Watchdog]:
    """Run ``cmd`` in its own session under the watchdog: (exit code, wall s, the child's
    rusage, the watchdog with the tree's peak)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True)  # its own session: the watchdog's unit
    watchdog = Watchdog(proc.pid, kill_gb * 1e9)
    watchdog.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)  # the kernel's accounting of this child alone
    finally:
        watchdog.done.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by a killed child
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage, watchdog


def _summary(what: str, code: int, wall: float, usage, watchdog: Watchdog, limit_gb: float) -> dict:
    peak = usage.ru_maxrss * 1024
    print(f"\n{what}: exit {code}, {wall / 60:.1f} min, tree peak resident memory {watchdog.peak / 1e9:.2f} GB "
          f"(limit {limit_gb} GB; largest process {peak / 1e9:.2f} GB)"
          f"{' KILLED by the watchdog' if watchdog.killed_at else ''}, user {usage.ru_utime / 60:.1f} min, "
          f"system {usage.ru_stime / 60:.1f} min CPU")
    return {"exit_code": code, "wall_s": round(wall, 1), "peak_rss_bytes": peak, "tree_peak_rss_bytes": watchdog.peak,
            "killed_by_watchdog_at_bytes": watchdog.killed_at, "cpu_user_s": round(usage.ru_utime, 1),
            "cpu_system_s": round(usage.ru_stime, 1)}


def parent_convert(args: argparse.Namespace) -> int:
    """``vpp convert`` of a paper-size official-layout release, measured as the export."""
    root, out = Path(args.convert), Path(args.out)
    base = [sys.executable, __file__, "--preset", args.preset, "--convert", str(root), "--out", str(out)]
    result: dict = {"preset": args.preset, "release": str(root), "cpus": os.cpu_count()}
    if not (root / "dp-calvin.pt").exists():
        result["release_written"] = _summary("writing the release (random weights)",
                                             *measure(base + ["--child-release"], args.kill_gb), args.limit_gb)
        if result["release_written"]["exit_code"]:
            return 1
    release = _files(root)
    print("\n| release file | MB |\n| --- | ---: |")
    for name, size in release:
        if size > 1e6:
            print(f"| {name} | {size / 1e6:.1f} |")
    convert = _summary(f"vpp convert ({args.preset})", *measure(base + ["--child-convert"], args.kill_gb),
                       args.limit_gb)
    files = _files(out) if convert["exit_code"] == 0 else []
    print("\n| converted file | MB |\n| --- | ---: |")
    for name, size in files:
        print(f"| {name} | {size / 1e6:.1f} |")
    result.update(convert=convert, release_files=release, files=files)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0 if convert["exit_code"] == 0 and convert["tree_peak_rss_bytes"] <= args.limit_gb * 1e9 else 1


def parent(args: argparse.Namespace) -> int:
    out = Path(args.out)
    phases_file = Path(args.json).with_suffix(".phases.jsonl")
    phases_file.parent.mkdir(parents=True, exist_ok=True)
    phases_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", "--phases", str(phases_file), "--preset", args.preset,
           "--out", str(out), "--parity-samples", str(args.parity_samples)]
    if args.precisions:
        cmd += ["--precisions", args.precisions]
    if args.calibration_samples:
        cmd += ["--calibration-samples", str(args.calibration_samples)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    code, wall, usage, watchdog = measure(cmd, args.kill_gb)
    peak = usage.ru_maxrss * 1024
    phases = [json.loads(line) for line in phases_file.read_text().splitlines()] if phases_file.exists() else []

    print(f"\npaper-scale export ({args.preset}, precisions {args.precisions or 'default'}, "
          f"{args.parity_samples} parity sample(s)): exit {code}, {wall / 60:.1f} min, "
          f"tree peak resident memory {watchdog.peak / 1e9:.2f} GB (limit {args.limit_gb} GB; "
          f"largest process {peak / 1e9:.2f} GB){' KILLED by the watchdog' if watchdog.killed_at else ''}, "
          f"user {usage.ru_utime / 60:.1f} min, system {usage.ru_stime / 60:.1f} min CPU")
    print("\n| phase | wall s | RSS at end GB | peak so far GB |\n| --- | ---: | ---: | ---: |")
    for p in phases:
        print(f"| {p['phase']} | {p['seconds']:.1f} | {p['rss_bytes'] / 1e9:.2f} | {p['peak_rss_bytes'] / 1e9:.2f} |")
    files, parity = [], {}
    if code == 0:
        files = _files(out)
        print("\n| file | MB |\n| --- | ---: |")
        for name, size in files:
            print(f"| {name} | {size / 1e6:.1f} |")
        report = json.loads((out / "parity.json").read_text())
        parity = {p: {"passed": s["passed"], "gate": s["gate"], "actions": s["actions"], "graphs": s["graphs"],
                      "worker_peak_rss_bytes": s.get("worker_peak_rss_bytes", {})}
                  for p, s in report["precisions"].items()}
        print("\n| precision | graph | worker peak GB |\n| --- | --- | ---: |")
        for p, s in parity.items():
            for graph, worker_peak in s["worker_peak_rss_bytes"].items():
                print(f"| {p} | {graph} | {worker_peak / 1e9:.2f} |")
        print((out / "parity.md").read_text())
    result = {"preset": args.preset, "precisions": args.precisions, "parity_samples": args.parity_samples,
              "exit_code": code, "wall_s": round(wall, 1), "peak_rss_bytes": peak,
              "tree_peak_rss_bytes": watchdog.peak, "killed_by_watchdog_at_bytes": watchdog.killed_at,
              "cpu_user_s": round(usage.ru_utime, 1), "cpu_system_s": round(usage.ru_stime, 1),
              "phases": phases, "files": files, "parity": parity, "cpus": os.cpu_count(),
              "machine_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    ok = code == 0 and watchdog.peak <= args.limit_gb * 1e9 and all(s["passed"] for s in parity.values())
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="calvin")
    p.add_argument("--out", help="the export's (or the converted checkpoint's) folder (default: "
                                 "artifacts/calvin-bench, with --convert artifacts/calvin-converted)")
    p.add_argument("--convert", metavar="RELEASE",
                   help="measure vpp convert of the official-layout release in this folder (written first if missing)")
    p.add_argument("--precisions", default="", help="comma list (default: what vpp export writes for the preset)")
    p.add_argument("--parity-samples", type=int, default=1)
    p.add_argument("--calibration-samples", type=int, default=0,
                   help="observations for INT8 calibration (default: the export's; 1-2 at paper scale)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--limit-gb", type=float, default=12.0, help="peak resident memory the export must stay within")
    p.add_argument("--kill-gb", type=float, default=15.0,
                   help="the watchdog kills the export's process tree when its resident memory passes this")
    p.add_argument("--int8-modelopt", action="store_true",
                   help="measure NVIDIA's INT8 path (modelopt PTQ in PyTorch, Q/DQ export) on the TVP graph")
    p.add_argument("--fp32-graphs", help="with --int8-modelopt: an export's graph cache (.<name>-graphs) whose FP32 "
                                         "graphs complete the chain for the end-to-end action gate")
    p.add_argument("--json", help="results (default: bench/results/paper_export.json, with --convert "
                                  "bench/results/paper_convert.json)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-release", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-convert", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-modelopt-quantize", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-modelopt-parity", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phases", help=argparse.SUPPRESS)
    args = p.parse_args()
    mode = "convert" if args.convert else "int8_modelopt" if args.int8_modelopt else "export"
    args.out = args.out or str(ROOT / "artifacts" / {"convert": "calvin-converted", "int8_modelopt": "calvin-modelopt",
                                                      "export": "calvin-bench"}[mode])
    args.json = args.json or str(ROOT / "bench" / "results" / f"paper_{mode}.json")
    if args.child_release:
        return child_release(args)
    if args.child_convert:
        return child_convert(args)
    if args.child_modelopt_quantize:
        return child_modelopt_quantize(args)
    if args.child_modelopt_parity:
        return child_modelopt_parity(args)
    if args.child:
        return child(args)
    return {"convert": parent_convert, "int8_modelopt": parent_modelopt, "export": parent}[mode](args)


if __name__ == "__main__":
    sys.exit(main())
