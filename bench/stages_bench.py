"""Per-stage benchmark: every available backend/precision against the eager PyTorch FP32
baseline (the path that mirrors the official implementation), run side by side.

    python bench/stages_bench.py [--artifact artifacts/tiny] [--repeats 20] [--paper] [--stock-attention]

For each engine: text, TVP, Video Former, action head and the whole predict step,
median / p95 over ``--repeats`` runs after a warm-up, interleaved with the baseline so
machine noise hits every engine alike; FLOPs per stage counted with torch's
FlopCounterMode and the achieved GFLOP/s. ``--paper`` adds one paper-scale TVP forward
(CALVIN preset shapes, random weights) to anchor the FLOP count on real hardware.
Prints a table and writes JSON (``bench/results/stages_<device>.json``).
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

from vpp_edge.precisions import exported

STAGES = ("text", "tvp", "former", "action_head")


def count_flops(policy, tokenizer, frames: np.ndarray) -> dict[str, float]:
    """FLOPs of one forward of each stage (multiply-add = 2 FLOPs), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vpp_edge.export.graphs import GRAPHS

    ids, mask = (torch.from_numpy(a) for a in tokenizer(["pick up the red block"]))
    noise = policy.make_noise(1, seed=0)
    flops: dict[str, float] = {}

    def counted(stage: str, fn):
        mode = FlopCounterMode(display=False)
        with torch.inference_mode(), mode:
            out = fn()
        flops[stage] = float(mode.get_total_flops())
        return out

    condition, goal = counted("text", lambda: policy.encode_text(ids, mask))
    features = counted("tvp", lambda: GRAPHS["tvp"].adapter(policy)(torch.from_numpy(frames)[None], condition, noise.tvp))
    tokens = counted("former", lambda: policy.former(features))
    counted("action_head", lambda: policy.action_head.sample(tokens, goal, noise.action))
    return flops


def bench_engines(engines: dict, frames: np.ndarray, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Per engine and stage, the wall times (ms) of ``repeats`` interleaved runs."""
    from vpp_edge.runtime.policy import RuntimePolicy

    policies = {name: RuntimePolicy(eng.artifact, eng, seed=0) for name, eng in engines.items()}
    times = {name: {s: [] for s in (*STAGES, "predict_step")} for name in policies}
    for name, p in policies.items():  # warm-up: first runs allocate and pick kernels
        p.set_instruction("warm up")
        p.infer(frames)
    from tqdm import tqdm

    for i in tqdm(range(repeats), desc="interleaved runs", unit="run"):
        for name, p in policies.items():
            t = times[name]
            t["text"].append(p.set_instruction(f"pick up block {i}"))  # a new instruction re-runs text
            start = time.perf_counter()
            chunk = p.infer(frames)
            t["predict_step"].append((time.perf_counter() - start) * 1e3)
            for stage in ("tvp", "former", "action_head"):
                t[stage].append(chunk.timings_ms[stage])
    return times


def openvino_engines(artifact, variants: str, threads: int) -> dict:
    """Unloaded OpenVINO engines for ``variants`` (comma list of f32, bf16, int8_ov) that
    this machine and artifact can run, model cache off (so loading measures compilation)."""
    from vpp_edge.extras import is_available

    if not variants or not is_available("openvino"):
        return {}
    import openvino as ov

    from vpp_edge.runtime.engines.openvino import OvEngine

    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    out = {}
    for v in variants.split(","):
        if v in ("f32", "bf16") and (v == "f32" or bf16):
            out[f"openvino_fp32_{v}"] = OvEngine(artifact, "fp32", threads=threads, inference_precision=v, cache_dir="")
        elif v == "int8_ov" and v in artifact.precisions():
            out["openvino_int8_ov"] = OvEngine(artifact, v, threads=threads, cache_dir="")
    return out


def summarise(times: dict, flops: dict[str, float], baseline: str) -> dict:
    out = {}
    for name, stages in times.items():
        row = {}
        for stage, values in stages.items():
            med = statistics.median(values)
            row[stage] = {"median_ms": med, "p95_ms": float(np.percentile(values, 95)),
                          "speedup_vs_baseline": statistics.median(times[baseline][stage]) / med}
            f = sum(flops.values()) - flops["text"] if stage == "predict_step" else flops.get(stage)
            if f:
                row[stage]["gflop"] = f / 1e9
                row[stage]["gflop_per_s"] = f / 1e9 / (med / 1e3)
        out[name] = row
    return out


def paper_scale(frames_per_view: int, threads: int) -> dict:
    """CALVIN-preset shapes with random weights: FLOPs of every stage at full size (counted on
    the meta device, nothing allocated) and one real TVP forward here (``frames_per_view``
    frames per view, to keep the run short) to anchor the FLOP count to a measured rate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vpp_edge.export.graphs import GRAPHS
    from vpp_edge.presets import get_preset
    from vpp_edge.training.models import build_policy

    def flops_of(fn) -> tuple[float, object]:
        mode = FlopCounterMode(display=False)
        with torch.inference_mode(), mode:
            out = fn()
        return float(mode.get_total_flops()), out

    def tvp_inputs(policy, preset, device):
        with torch.device(device):
            frames = torch.randint(0, 255, (1, preset.num_views, preset.image_size, preset.image_size, 3),
                                   dtype=torch.uint8)
            condition = torch.randn(1, preset.text.max_length, policy.tvp.unet.config.cross_attention_dim)
            noise = torch.randn(policy.noise_shapes(1)[0])
        return frames, condition, noise

    preset = get_preset("calvin")
    meta, _ = build_policy(preset, device="meta")
    full: dict[str, float] = {}
    full["tvp"], features = flops_of(lambda: GRAPHS["tvp"].adapter(meta)(*tvp_inputs(meta, preset, "meta")))
    full["former"], tokens = flops_of(lambda: meta.former(features))
    with torch.device("meta"):
        goal = torch.zeros(1, meta.action_head.inner_model.lang_emb[0].in_features)
        action_noise = torch.zeros(meta.noise_shapes(1)[1])
    full["action_head"], _ = flops_of(lambda: meta.action_head.sample(tokens, goal, action_noise))

    small = preset.replace(tvp={"num_frames": frames_per_view}, former={"num_frames": frames_per_view})
    torch.set_num_threads(threads)
    policy, _ = build_policy(small, seed=0)
    tvp, inputs = GRAPHS["tvp"].adapter(policy), tvp_inputs(policy, small, "cpu")
    measured, _ = flops_of(lambda: tvp(*inputs))
    with torch.inference_mode():
        start = time.perf_counter()
        tvp(*inputs)
        seconds = time.perf_counter() - start
    rate = measured / seconds
    return {"preset": "calvin", "views": preset.num_views, "frames_per_view": preset.tvp.num_frames,
            "image_size": preset.image_size, "unet_params": sum(p.numel() for p in meta.tvp.unet.parameters()),
            "features_shape": list(features.shape), "tflop_per_stage": {k: v / 1e12 for k, v in full.items()},
            "timed_frames_per_view": frames_per_view, "timed_tvp_tflop": measured / 1e12, "timed_tvp_s": seconds,
            "gflop_per_s": rate / 1e9, "extrapolated_step_s": sum(full.values()) / rate}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=Path("artifacts/tiny"))
    ap.add_argument("--checkpoint", type=Path, help="checkpoint the artifact came from (default: untrained tiny)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default=",".join(exported()), help="ONNX Runtime precisions to include")
    ap.add_argument("--openvino", default="f32,bf16,int8_ov",
                    help="OpenVINO variants when openvino is installed: f32 / bf16 (inference precision on the fp32 "
                         "graphs; bf16 only where the CPU has it), int8_ov (NNCF graphs, when the artifact has them)")
    ap.add_argument("--compile", action="store_true", help="also PyTorch with torch.compile (slow to compile)")
    ap.add_argument("--stock-attention", action="store_true",
                    help="also eager PyTorch with diffusers' stock attention processors, as the official code "
                         "computes the TVP (ours project the temporal text context once per video)")
    ap.add_argument("--paper", action="store_true",
                    help="also paper-scale FLOPs (CALVIN shapes) and one paper-width TVP forward")
    ap.add_argument("--paper-frames", type=int, default=4,
                    help="frames per view of the timed paper-width TVP forward (default 4; the paper uses 16)")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "stages_cpu.json")
    args = ap.parse_args()

    import torch

    from vpp_edge.runtime.engines.onnxruntime import OrtEngine
    from vpp_edge.runtime.engines.torch_backend import TorchEngine
    from vpp_edge.training.checkpoints import load_checkpoint

    artifact, ckpt = open_benchmark(ap, args)
    from vpp_edge.observations import sample_observations

    frames = sample_observations(artifact.preset.num_views, artifact.preset.image_size, 1)[0].frames

    baseline = "pytorch_eager_fp32"
    engines, load_s = {}, {}

    def add(name: str, engine) -> None:  # first-call cost: sessions built, graphs compiled (no cache)
        start = time.perf_counter()
        engines[name] = engine.load()
        load_s[name] = time.perf_counter() - start

    add(baseline, TorchEngine(artifact, "fp32", checkpoint=ckpt))
    if args.compile:
        add("pytorch_compiled_fp32", TorchEngine(artifact, "fp32", checkpoint=ckpt, compile=True))
    if args.stock_attention:
        from diffusers.models.attention_processor import AttnProcessor2_0

        engines["pytorch_eager_fp32_stock_attention"] = TorchEngine(artifact, "fp32", checkpoint=ckpt).load()
        engines["pytorch_eager_fp32_stock_attention"].policy.tvp.unet.set_attn_processor(AttnProcessor2_0())
    for precision in args.precisions.split(","):
        if precision in artifact.precisions():
            add(f"onnxruntime_{precision}", OrtEngine(artifact, precision, threads=args.threads))
    for name, engine in openvino_engines(artifact, args.openvino, args.threads).items():
        add(name, engine)
    policy, tokenizer = load_checkpoint(ckpt, artifact.preset)
    flops = count_flops(policy, tokenizer, frames)
    times = bench_engines(engines, frames, args.repeats)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                           "torch": torch.__version__},
               "preset": artifact.preset.name, "repeats": args.repeats, "baseline": baseline,
               "flops_per_stage": flops, "engines": summarise(times, flops, baseline)}
    for name, seconds in load_s.items():  # torch.compile compiles at the warm-up call, not here
        results["engines"][name]["load_s"] = seconds
    if args.paper:
        results["paper_scale"] = paper_scale(args.paper_frames, args.threads)
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['preset']} preset, {results['machine']['threads']} threads, "
                        f"median / p95 ms over {results['repeats']} interleaved runs")
    table.add_column("engine")
    for stage in (*STAGES, "predict_step"):
        table.add_column(stage, justify="right")
    table.add_column("step vs eager", justify="right")
    table.add_column("step GFLOP/s", justify="right")
    table.add_column("load s", justify="right")
    for name, row in results["engines"].items():
        cells = [f"{row[s]['median_ms']:.1f} / {row[s]['p95_ms']:.1f}" for s in (*STAGES, "predict_step")]
        step = row["predict_step"]
        table.add_row(name, *cells, f"{step['speedup_vs_baseline']:.2f}x", f"{step.get('gflop_per_s', 0):.1f}",
                      f"{row.get('load_s', 0):.1f}")
    flops = results["flops_per_stage"]
    table.caption = "GFLOP per forward: " + ", ".join(f"{s} {flops[s] / 1e9:.3f}" for s in STAGES)
    console = Console(width=max(150, Console().width))
    console.print(table)
    if "paper_scale" in results:
        p = results["paper_scale"]
        per_stage = ", ".join(f"{k} {v:.3f}" for k, v in p["tflop_per_stage"].items())
        console.print(f"paper scale ({p['views']} views x {p['frames_per_view']} frames x {p['image_size']}px, UNet "
                      f"{p['unet_params'] / 1e9:.2f} B params), TFLOP per predict step: {per_stage}")
        console.print(f"timed here: TVP with {p['timed_frames_per_view']} frames per view, {p['timed_tvp_tflop']:.2f} "
                      f"TFLOP in {p['timed_tvp_s']:.1f} s = {p['gflop_per_s']:.0f} GFLOP/s -> a full paper-scale "
                      f"step would take ~{p['extrapolated_step_s']:.0f} s on this CPU")


if __name__ == "__main__":
    sys.exit(main())
