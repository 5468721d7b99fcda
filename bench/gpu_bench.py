"""Paper-scale predict step on a GPU: the eager FP32 path that mirrors the official code
against BF16 eager and the optimised path (training/models/fast_step.py: BF16,
channels-last, SDPA, torch.compile, the whole step in one CUDA graph).

    python bench/gpu_bench.py                      # CALVIN preset, random weights, CUDA
    python bench/gpu_bench.py --device cpu --preset tiny --no-compile --repeats 3   # smoke run

Every variant runs interleaved with the baseline; median / p95 ms over ``--repeats`` runs
after warm-up (CUDA events on a GPU), FLOPs counted once with torch's FlopCounterMode, the
achieved TFLOP/s and its fraction of this GPU's measured BF16 matmul peak, and the action
error against FP32 eager. Prints a table, writes ``bench/results/gpu_<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vpp_edge.presets import get_preset
from vpp_edge.training.models import build_policy
from vpp_edge.training.models.fast_step import FastPredictStep, FastStepOptions


def inputs(policy, tokenizer, preset, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    s = preset.image_size
    frames = torch.rand(1, preset.num_views, 3, s, s, generator=gen) * 2 - 1
    ids, mask = (torch.from_numpy(a) for a in tokenizer(["pick up the red block and place it in the drawer"]))
    tvp_shape, action_shape = policy.noise_shapes(1)
    return tuple(t.to(device) for t in (frames, ids, mask, torch.randn(tvp_shape, generator=gen),
                                         torch.randn(action_shape, generator=gen)))


def timer(device: torch.device):
    """A function that times ``fn()`` in ms: CUDA events on a GPU (no sync inside the step)."""
    def run(fn) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return run


def matmul_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float | None:
    """Measured dense BF16 matmul throughput (the yardstick for the step's utilisation)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ms = statistics.median(timer(device)(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="calvin")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes at paper scale)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or --device cpu for a smoke run", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False  # the baseline is true FP32
    preset = get_preset(args.preset)
    base, tokenizer = build_policy(preset, seed=0, device=device)
    base.eval()
    x = inputs(base, tokenizer, preset, device, seed=1)

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        reference = base(*x).float()
    flops = float(counter.get_total_flops())

    variants = {"eager FP32 (baseline)": lambda *a: base(*a)}
    eager_low = FastPredictStep(copy.deepcopy(base), FastStepOptions(dtype, channels_last=False, compile=False,
                                                                     cuda_graph=False))
    variants[f"eager {args.dtype.upper()}"] = eager_low
    fast = FastPredictStep(copy.deepcopy(base), FastStepOptions(dtype, compile=not args.no_compile))
    name = f"optimised {args.dtype.upper()}" + (" + compile" if not args.no_compile else "") + \
        (" + CUDA graph" if fast.uses_cuda_graph else "")
    variants[name] = fast

    errors, times = {}, {k: [] for k in variants}
    with torch.inference_mode():
        for k, fn in variants.items():  # warm-up: compilation, autotuning, graph capture
            start = time.perf_counter()
            out = fn(*x).float()
            errors[k] = {"max_abs": float((out - reference).abs().max()),
                         "cosine": float(torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(),
                                                                               dim=0)),
                         "first_call_s": time.perf_counter() - start}
        run = timer(device)
        for _ in range(args.repeats):
            for k, fn in variants.items():
                times[k].append(run(lambda fn=fn: fn(*x)))

    peak = matmul_peak_tflops(device)
    rows = {}
    baseline = statistics.median(times["eager FP32 (baseline)"])
    for k, t in times.items():
        med = statistics.median(t)
        achieved = flops / (med * 1e-3) / 1e12
        rows[k] = {"median_ms": med, "p95_ms": sorted(t)[int(0.95 * (len(t) - 1))], "speedup": baseline / med,
                   "tflops": achieved, "of_matmul_peak": achieved / peak if peak else None, **errors[k]}
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "preset": args.preset, "tflop_per_step": flops / 1e12, "bf16_matmul_peak_tflops": peak}
    print(f"{env['device']} | torch {env['torch']} | {args.preset}: {flops / 1e12:.3f} TFLOP per step"
          + (f" | measured BF16 matmul peak {peak:.0f} TFLOP/s" if peak else ""))
    print(f"{'path':44s} {'median ms':>10s} {'p95 ms':>8s} {'speed-up':>9s} {'TFLOP/s':>8s} {'of peak':>8s} "
          f"{'cosine':>9s} {'max abs':>8s}")
    for k, r in rows.items():
        frac = f"{r['of_matmul_peak']:.1%}" if r["of_matmul_peak"] is not None else "-"
        print(f"{k:44s} {r['median_ms']:10.2f} {r['p95_ms']:8.2f} {r['speedup']:8.2f}x {r['tflops']:8.2f} "
              f"{frac:>8s} {r['cosine']:9.6f} {r['max_abs']:8.4f}")
    out = args.json or Path(__file__).parent / "results" / f"gpu_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
