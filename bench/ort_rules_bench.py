"""What each rewrite of ``export/ort_rules.py`` (and ``int8_cpu`` itself) is worth on this
machine: the artifact's ``int8_cpu`` graphs rebuilt with every rule, with none, and with
each rule left out in turn (plus, for scale, without onnxscript's fusions and ONNX Runtime
FP32), timed side by side in ONNX Runtime.

    python bench/ort_rules_bench.py [--artifact artifacts/tiny] [--rounds 40] [--threads 2]

Every variant is built as the export builds ``int8_cpu`` (same options, same calibration
observations and seeds), into ``--work`` (reused by later runs). The predict step less the
text encoder (TVP, Former, action head: ``runtime/predict_step.predict_actions``) runs once
per variant per round, in an order rotated every round, so the load of the moment hits
every variant alike. Read the per-round ratio to ``all``: a rule pays where leaving it out
makes the step slower in most rounds. Writes ``bench/results/ort_rules_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from baseline import open_benchmark  # bench/baseline.py (scripts run from bench/)


def variants(rules: list[str]) -> dict[str, list[str] | None]:
    """Variant name -> rules left out (``None``: not an ``int8_cpu`` rebuild, see build)."""
    out: dict[str, list[str] | None] = {"all": [], "none": list(rules)}
    out.update({f"no_{r}": [r] for r in rules})
    out.update({"unfused": None, "fp32": None})
    return out


def build(name: str, skip: list[str] | None, fp32: Path, out: Path, settings: dict, calib: dict) -> Path:
    """The variant's six graphs in ``out`` (kept when already there): ``fp32`` the artifact's
    own; ``unfused`` the int8_cpu quantisation of the plain FP32 graphs; the others
    ``fuse_for_onnxruntime`` less ``skip``, then quantised like the export does."""
    from vpp_edge.export import onnx_io
    from vpp_edge.export.graphs import GRAPHS
    from vpp_edge.export.ort_rules import RULES

    if name == "fp32":
        return fp32
    done = out / "done"  # which rules the graphs there have: rebuilt when RULES changed
    applied = json.dumps(None if skip is None else [r for r in RULES if r not in skip])
    if done.exists() and done.read_text() == applied:
        return out
    for graph in GRAPHS:
        src, dst = fp32 / f"{graph}.onnx", out / f"{graph}.onnx"
        if graph in settings["graphs"]:
            args = (calib[graph], settings["op_types"], settings["exclude_modules"], settings["calibration"])
            if skip is None:
                onnx_io.quantize_int8(src, dst, *args, variant="int8_cpu")
            else:
                fused = out / "fused" / src.name
                onnx_io.fuse_for_onnxruntime(src, fused, skip_rules=skip)
                onnx_io.quantize_int8(fused, dst, *args, variant="int8_cpu")
        elif skip is None:
            onnx_io.keep_float(src, dst, "int8")  # a plain copy
        else:
            onnx_io.fuse_for_onnxruntime(src, dst, skip_rules=skip)
    done.write_text(applied)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=Path("artifacts/tiny"))
    ap.add_argument("--checkpoint", type=Path, help="checkpoint the artifact came from (default: untrained tiny)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma list of variants to time (default: every one)")
    ap.add_argument("--keep", action="append", default=[], metavar="RULE,RULE",
                    help="also a variant with only these rules (repeatable): what a smaller rule set keeps")
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "results" / "ort_rules_graphs")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "ort_rules_cpu.json")
    args = ap.parse_args()

    import onnxruntime as ort
    from tqdm import tqdm

    from vpp_edge.export import onnx_io
    from vpp_edge.export.artifact import reference
    from vpp_edge.export.derive import int8_settings
    from vpp_edge.export.graphs import GRAPHS
    from vpp_edge.export.options import load_options
    from vpp_edge.export.ort_rules import RULES
    from vpp_edge.observations import sample_observations
    from vpp_edge.runtime.predict_step import predict_actions
    from vpp_edge.training.checkpoints import load_checkpoint

    artifact, ckpt = open_benchmark(ap, args)
    policy, tokenizer = load_checkpoint(ckpt, artifact.preset)
    policy.eval()
    opts = load_options()
    settings = int8_settings(opts["int8"], opts, "int8_cpu")
    n_parity, n_calib = int(opts["parity_samples"]), int(opts["calibration_samples"])
    preset = artifact.preset
    obs = sample_observations(preset.num_views, preset.image_size, n_parity + n_calib)
    import torch

    with torch.inference_mode():  # the export's references: parity observations seed k, calibration 100 + k
        ref = reference(policy, tokenizer, obs[0], seed=0)
        calib_refs = [reference(policy, tokenizer, o, seed=100 + k) for k, o in enumerate(obs[n_parity:])]
    calib = {g: [{i: r[i].numpy() for i in GRAPHS[g].inputs} for r in calib_refs] for g in settings["graphs"]}

    table = variants(list(RULES))
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only.split(",") or k == "all"}
    for kept in args.keep:
        rules = kept.split(",")
        if set(rules) - set(RULES):
            ap.error(f"--keep: unknown rules {sorted(set(rules) - set(RULES))}; allowed: {list(RULES)}")
        table["only_" + "+".join(rules)] = [r for r in RULES if r not in rules]
    fp32 = args.artifact / "fp32"
    sessions = {}
    for name, skip in tqdm(table.items(), desc="build", unit="variant"):
        folder = build(name, skip, fp32, args.work / name, settings, calib)
        sessions[name] = {g: onnx_io.session(folder / f"{g}.onnx", args.threads) for g in GRAPHS}

    sigmas, mode = artifact.manifest["sigmas"], artifact.manifest["action_mode"]
    inputs = [ref[k].numpy() for k in ("condition", "goal", "frames", "noise", "action_noise")]
    times = {n: {"step": [], "tvp": []} for n in sessions}
    actions = {}

    def step(name: str) -> np.ndarray:
        tvp_ms = 0.0

        def run(graph: str, feeds: dict) -> dict:
            nonlocal tvp_ms
            start = time.perf_counter()
            sess = sessions[name][graph]
            outs = dict(zip((o.name for o in sess.get_outputs()), sess.run(None, feeds)))
            if graph == "tvp":
                tvp_ms = (time.perf_counter() - start) * 1e3
            return outs

        start = time.perf_counter()
        chunk = predict_actions(run, *inputs, sigmas, mode)
        times[name]["step"].append((time.perf_counter() - start) * 1e3)
        times[name]["tvp"].append(tvp_ms)
        return chunk

    names = list(sessions)
    for _ in range(3):  # warm-up: first runs allocate and pick kernels
        for name in names:
            actions[name] = step(name)
    for series in (s for t in times.values() for s in t.values()):
        series.clear()
    for r in tqdm(range(args.rounds), desc="interleaved rounds", unit="round"):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step(name)

    expected = ref["actions"].numpy()
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                           "onnxruntime": ort.__version__},
               "preset": preset.name, "rounds": args.rounds, "action_mode": mode, "variants": {}}
    base = times["all"]
    for name, t in times.items():
        row = {"left_out": table[name]}
        for key in ("step", "tvp"):
            ratio = [a / b for a, b in zip(t[key], base[key])]
            row[key] = {"median_ms": statistics.median(t[key]), "p95_ms": float(np.percentile(t[key], 95)),
                        "ratio_to_all_median": statistics.median(ratio),
                        "ratio_to_all_p95": float(np.percentile(ratio, 95)),
                        "ratio_to_all_median_ci95": median_interval(ratio),
                        "rounds_slower_than_all": sum(x > 1 for x in ratio) / len(ratio)}
        row["action_max_abs_vs_pytorch"] = float(np.abs(actions[name] - expected).max())
        results["variants"][name] = row
    results["times_ms"] = times  # every round, for other statistics
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


def median_interval(values: list[float]) -> list[float]:
    """A distribution-free 95 % interval of the median (order statistics n/2 -/+ 1.96
    sqrt(n)/2): per-round ratios under shifting load are anything but normal."""
    ordered, n = sorted(values), len(values)
    half = 1.96 * n ** 0.5 / 2
    return [ordered[max(0, int(n / 2 - half))], ordered[min(n - 1, int(np.ceil(n / 2 + half)))]]


def print_table(results: dict) -> None:
    print(f"{results['preset']} preset, {results['machine']['threads']} threads, {results['rounds']} interleaved "
          f"rounds, ONNX Runtime {results['machine']['onnxruntime']}; ms median / p95; per-round ratio to 'all' "
          "(median [95 % interval of the median]); share of rounds slower than 'all'; action max-abs vs PyTorch")
    print("| variant | step ms | step ratio | slower | TVP ms | TVP ratio | slower | action max-abs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    def ratio(r: dict) -> str:
        low, high = r["ratio_to_all_median_ci95"]
        return f"{r['ratio_to_all_median']:.3f} [{low:.3f}, {high:.3f}]"

    for name, row in results["variants"].items():
        s, t = row["step"], row["tvp"]
        print(f"| {name} | {s['median_ms']:.1f} / {s['p95_ms']:.1f} | {ratio(s)} | {s['rounds_slower_than_all']:.0%} "
              f"| {t['median_ms']:.1f} / {t['p95_ms']:.1f} | {ratio(t)} | {t['rounds_slower_than_all']:.0%} "
              f"| {row['action_max_abs_vs_pytorch']:.2e} |")


if __name__ == "__main__":
    sys.exit(main())
