"""Paper-scale predict step on a GPU: the eager FP32 path that mirrors the official code
against BF16/FP16 eager and the optimised step (training/models/fast_step.py: channels-last,
SDPA, torch.compile, the whole step in one CUDA graph), plus per-stage times, a profile,
one training step of each stage and an estimate for a Jetson AGX Orin.

    python bench/gpu_bench.py                      # CALVIN preset, random weights, CUDA
    python bench/gpu_bench.py --device cpu --preset tiny --repeats 3 --skip-train   # smoke run

Runs on the torch it finds (2.11 or newer) and needs diffusers and transformers. Phases run
in order of importance and each is skipped, with the reason recorded, when ``--budget-s``
would not leave it enough time; the JSON is rewritten after every phase, so a run that is
cut short still leaves everything it measured. Every variant of the whole step is timed
interleaved with the others (median / p95 over ``--repeats`` after warm-up, CUDA events),
FLOPs are counted per stage with torch's FlopCounterMode, and the achieved TFLOP/s is
given as a fraction of this GPU's dense matmul peak measured in the same run. Writes
``bench/results/gpu_<device>.json`` (``--json``) and, with ``--profile-out``, the
profiler's kernel table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vpp_edge.presets import get_preset
from vpp_edge.training.models import build_policy
from vpp_edge.training.models.fast_step import STAGES, FastPredictStep, FastStepOptions, predict_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INSTRUCTION = "pick up the red block and place it in the drawer"

# Jetson AGX Orin 64 GB at MAXN, its GPU only (NVIDIA's module datasheet: 275 TOPS sparse
# INT8 for GPU + DLAs; the GPU's dense tensor-core rates are these). Memory 204.8 GB/s.
ORIN = {"name": "Jetson AGX Orin 64 GB (GPU, MAXN)", "fp16_tflops": 42.5, "int8_tops": 85.0, "mem_gbs": 204.8}


class Budget:
    """Wall-clock budget of the whole run; phases ask before they start."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Report:
    """The results so far, rewritten to disk after every phase."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"phases": {}}

    def phase(self, name: str, budget: Budget, need_s: float, fn: Callable[[], dict | None]) -> dict | None:
        """Run ``fn`` if ``need_s`` seconds are left; record its result, or why it did not run."""
        if budget.left() < need_s:
            self.data["phases"][name] = {"skipped": f"{budget.left():.0f} s left of the budget, needs ~{need_s:.0f} s"}
            print(f"[{name}] skipped: {self.data['phases'][name]['skipped']}", flush=True)
            self.save()
            return None
        start = time.monotonic()
        print(f"[{name}] ...", flush=True)
        try:
            out = fn()
            self.data["phases"][name] = {"seconds": round(time.monotonic() - start, 1)}
            if out is not None:
                self.data[name] = out
        except Exception as exc:  # a benchmark records what broke and goes on with the next phase
            self.data["phases"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                         "traceback": traceback.format_exc(limit=8)}
            print(f"[{name}] failed: {type(exc).__name__}: {exc}", flush=True)
            out = None
        print(f"[{name}] done in {time.monotonic() - start:.1f} s", flush=True)
        self.save()
        return out

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2))


def step_inputs(policy, tokenizer, preset, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    s = preset.image_size
    frames = torch.rand(1, preset.num_views, 3, s, s, generator=gen) * 2 - 1
    ids, mask = (torch.from_numpy(a) for a in tokenizer([INSTRUCTION]))
    tvp_shape, action_shape = policy.noise_shapes(1)
    return tuple(t.to(device) for t in (frames, ids, mask, torch.randn(tvp_shape, generator=gen),
                                         torch.randn(action_shape, generator=gen)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Per-stage wall time of one call: CUDA events recorded in-stream (no sync inside the
    step) on a GPU, the host clock on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[tuple[str, object]] = []

    def _now(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [("start", self._now())]

    def mark(self, name: str) -> None:
        self.marks.append((name, self._now()))

    def stages_ms(self) -> dict[str, float]:
        sync(self.device)
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) if self.device.type == "cuda" else (b - a) * 1e3
        return out

    def time(self, fn: Callable[[], object]) -> float:
        """Whole-call time of ``fn()`` in ms."""
        self.start()
        fn()
        self.mark("total")
        return self.stages_ms()["total"]


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)],
            "min": ordered[0], "n": len(ordered)}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float | None:
    """Measured dense matmul throughput in TFLOP/s (the yardstick for the step's utilisation)."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    timer = StageTimer(device)
    ms = statistics.median(timer.time(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def action_error(out: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    out, reference = out.float().flatten(), reference.float().flatten()
    return {"max_abs": float((out - reference).abs().max()),
            "cosine": float(torch.nn.functional.cosine_similarity(out, reference, dim=0)),
            "finite": bool(torch.isfinite(out).all())}


def count_stage_flops(policy, x) -> dict[str, float]:
    """FLOPs of each stage (multiply-add = 2), counted by torch on the FP32 step."""
    counter = FlopCounterMode(display=False)
    totals: dict[str, float] = {}
    with torch.inference_mode(), counter:
        predict_step(policy, torch.float32, *x, mark=lambda s: totals.__setitem__(s, float(counter.get_total_flops())))
    flops, before = {}, 0.0
    for stage in STAGES:
        flops[stage], before = totals[stage] - before, totals[stage]
    flops["total"] = totals[STAGES[-1]]
    return flops


@dataclass
class Variant:
    """One way of running the step: a callable plus the policy copy it runs."""

    dtype: torch.dtype
    fn: Callable[..., torch.Tensor]
    policy: torch.nn.Module
    fast: FastPredictStep | None = None

    @property
    def sampler_dtype(self) -> torch.dtype:
        return self.fast.options.sampler_dtype if self.fast else torch.float32

    @property
    def staged(self) -> bool:
        """Whether stages can be timed apart (not inside one CUDA graph or compiled region)."""
        return self.fast is None or (not self.fast.options.compile and not self.fast.uses_cuda_graph)


def make_variants(base, device: torch.device, names: list[str], compile_mode: str) -> dict[str, Variant]:
    """The step variants asked for; each low-precision one owns a converted copy of the weights.

    A name is KIND-PRECISION, with ``+head`` when the action sampler runs in that precision too."""
    out: dict[str, Variant] = {}
    for name in names:
        kind, prec = name.removesuffix("+head").split("-")
        dtype = DTYPES[prec]
        sampler = dtype if name.endswith("+head") else torch.float32
        if kind == "eager" and prec == "fp32":
            out[name] = Variant(dtype, lambda *a: base(*a), base)
            continue
        options = {
            "eager": FastStepOptions(dtype, sampler, channels_last=False, compile=False, cuda_graph=False,
                                     cudnn_benchmark=False),
            "graph": FastStepOptions(dtype, sampler, compile=False),
            "compiled": FastStepOptions(dtype, sampler, compile=True, compile_mode=compile_mode),
        }[kind]
        fast = FastPredictStep(copy.deepcopy(base), options)
        out[name] = Variant(dtype, fast, fast.policy, fast)
    return out


def estimate_orin(flops: dict[str, float], best_fraction: float, step_ms: float) -> dict:
    """Orin step time from per-stage FLOPs, assuming TensorRT there reaches the fraction of
    its dense FP16 (INT8) tensor peak that the best low-precision step reaches of the H200's
    matmul peak measured here. An estimate, not a measurement."""
    fp16_ms = {s: flops[s] / (best_fraction * ORIN["fp16_tflops"] * 1e12) * 1e3 for s in STAGES}
    # INT8 engines quantise the TVP's convolutions and GEMMs (99 % of its FLOPs); the rest stays FP16.
    int8_ms = dict(fp16_ms, tvp=flops["tvp"] / (best_fraction * ORIN["int8_tops"] * 1e12) * 1e3)
    out = {"assumption": "TensorRT on the Orin reaches the same fraction of its dense tensor peak as the best "
                         "low-precision step here reaches of the H200's measured matmul peak",
           "h200_fraction_of_peak": best_fraction, "h200_step_ms": step_ms, "orin": ORIN}
    for label, ms in (("fp16", fp16_ms), ("int8", int8_ms)):
        total = sum(ms.values())
        # A 10-action chunk must outlast the step it waits for, with 50 % margin for jitter.
        out[label] = {"stages_ms": ms, "step_ms": total, "max_control_hz_10_actions": 10 / (1.5 * total / 1e3),
                      "min_chunk_at_10hz": math.ceil(1.5 * total / 100.0)}
    return out


def train_steps(preset_name: str, device: torch.device, seed: int, repeats: int = 3) -> dict:
    """One stage-2 and one stage-1 step (AdamW, BF16 autocast, gradient checkpointing on the
    UNet) at the preset's scale: median time and peak memory."""
    from vpp_edge.training.train.stage1 import TVPDenoiser
    from vpp_edge.training.train.stage2 import PolicyHead, training_sigmas

    preset = get_preset(preset_name)
    policy, tokenizer = build_policy(preset, seed=seed, device=device)
    gen = torch.Generator().manual_seed(seed)
    results = {}
    with torch.inference_mode():  # the shape of what the feature cache holds for stage 2
        frames, ids, mask, tvp_noise, _ = step_inputs(policy, tokenizer, preset, device, seed)
        feat_shape = policy.predictive_features(frames, policy.encode_text(ids, mask)[0], tvp_noise).shape[1:]

    def measure(name: str, module: torch.nn.Module, make_batch: Callable[[], dict], batch: int) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        times = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats + 1):
            inputs = make_batch()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = module(**inputs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            times.append((time.perf_counter() - start) * 1e3)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        results[name] = {"batch": batch, "step_ms": summary(times[1:]), "first_step_ms": times[0],
                         "peak_gib": peak, "trainable_params": sum(p.numel() for p in params),
                         "loss": float(loss.detach())}
        del opt

    # Stage 2: Former + action head on frozen TVP features (what the feature cache feeds).
    policy.requires_grad_(False)
    head = PolicyHead(policy).requires_grad_(True).train()
    b2 = 8

    def stage2_batch() -> dict:
        return {"features": torch.randn(b2, *feat_shape, generator=gen).to(device),
                "goal": torch.randn(b2, policy.text_encoder.goal_dim, generator=gen).to(device),
                "actions": torch.randn(b2, preset.action_horizon, preset.action_dim, generator=gen).to(device),
                "noise": torch.randn(b2, preset.action_horizon, preset.action_dim, generator=gen).to(device),
                "sigma": training_sigmas(policy, b2, gen).to(device)}

    measure("stage2", head, stage2_batch, b2)
    head.eval().requires_grad_(False)

    # Stage 1: the UNet with the official EDM objective, gradient checkpointing on.
    unet = policy.tvp.unet
    unet.enable_gradient_checkpointing()
    denoiser = TVPDenoiser(unet).requires_grad_(True).train()
    b1 = 1
    lat = preset.image_size // 8
    c = policy.tvp.latent_channels
    cond_shape = (b1, preset.text.max_length, 2 * policy.text_encoder.hidden_size)

    def stage1_batch() -> dict:
        return {"latents": torch.randn(b1, preset.tvp.num_frames, c, lat, lat, generator=gen).to(device),
                "image_latent": torch.randn(b1, c, lat, lat, generator=gen).to(device),
                "condition": torch.randn(cond_shape, generator=gen).to(device),
                "added_time_ids": torch.tensor([[preset.tvp.fps, preset.tvp.motion_bucket_id, 0.02]] * b1).to(device),
                "noise": torch.randn(b1, preset.tvp.num_frames, c, lat, lat, generator=gen).to(device),
                "sigma": (torch.randn(b1, generator=gen) * 1.6 + 0.7).exp().to(device)}

    measure("stage1_grad_checkpointing", denoiser, stage1_batch, b1)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="calvin")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default="eager-fp32,eager-bf16,eager-fp16,graph-bf16,graph-fp16,graph-fp16+head,"
                                           "compiled-bf16,compiled-fp16,compiled-fp16+head",
                    help="comma-separated KIND-PRECISION[+head], KIND in eager | graph (channels-last + one CUDA graph) "
                         "| compiled (graph + torch.compile); +head: the action sampler in that precision too; "
                         "eager-fp32 is the baseline and always runs")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled variants")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=900, help="wall-clock budget; later phases are skipped")
    ap.add_argument("--skip-train", action="store_true", help="no training-step phase")
    ap.add_argument("--profile-out", type=Path, help="write the profiler's kernel table here")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or --device cpu for a smoke run", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    report = Report(args.json or Path(__file__).parent / "results" / f"gpu_{device.type}.json")
    # The baseline is true FP32 (no TF32 in matmuls or convolutions): the reference for errors.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    names = ["eager-fp32"] + [n for n in args.variants.split(",") if n and n != "eager-fp32"]
    preset = get_preset(args.preset)

    def environment() -> dict:
        env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
               "python": platform.python_version(), "preset": args.preset, "compile_mode": args.compile_mode}
        if device.type == "cuda":
            import subprocess

            props = torch.cuda.get_device_properties(device)
            env.update(sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                       capability=f"{props.major}.{props.minor}")
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                                 capture_output=True, text=True)
            env["driver_and_max_sm_clock"] = smi.stdout.strip()
        env["matmul_peak_tflops"] = {p: matmul_peak(device, DTYPES[p]) for p in ("bf16", "fp16")}
        return env

    env = report.phase("environment", budget, 0, environment)
    state: dict = {}

    def build() -> dict:
        start = time.perf_counter()
        base, tokenizer = build_policy(preset, seed=0, device=device)
        sync(device)
        state["base"], state["x"] = base, step_inputs(base, tokenizer, preset, device, seed=1)
        return {"build_s": time.perf_counter() - start, "parameters": sum(p.numel() for p in base.parameters()),
                "weights_gib_fp32": weight_bytes(base) / 2**30}

    if report.phase("model", budget, 30, build) is None:
        return 1
    base, x = state["base"], state["x"]
    flops = report.phase("flops", budget, 20, lambda: count_stage_flops(base, x))

    def reference() -> dict:
        with torch.inference_mode():
            state["reference"] = base(*x).float()
        return {"actions_shape": list(state["reference"].shape)}

    report.phase("reference", budget, 10, reference)
    variants: dict[str, Variant] = {}

    def warm_up(v: Variant) -> dict:
        """First call (compilation, autotuning, graph capture), its error and memory."""
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        start = time.perf_counter()
        with torch.inference_mode():
            out = v.fn(*x).float()
            out2 = v.fn(*x).float()
        sync(device)
        row = {"first_calls_s": time.perf_counter() - start, **action_error(out, state["reference"]),
               "repeatable": bool(torch.equal(out, out2)), "weights_gib": weight_bytes(v.policy) / 2**30}
        if device.type == "cuda":
            row["step_peak_gib_above_resident"] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
        return row

    warm: dict[str, dict] = {}

    def prepare(name: str) -> dict:
        variants.update(make_variants(base, device, [name], args.compile_mode))
        try:
            warm[name] = warm_up(variants[name])
        except Exception:
            variants.pop(name)  # a variant that cannot run is reported and left out of the timing
            raise
        return warm[name]

    def whole_step() -> dict:
        timer = StageTimer(device)
        times: dict[str, list[float]] = {n: [] for n in variants}
        with torch.inference_mode():
            for _ in range(args.repeats):
                for n, v in variants.items():
                    times[n].append(timer.time(lambda v=v: v.fn(*x)))
        baseline = statistics.median(times["eager-fp32"])
        total = flops["total"] if flops else float("nan")
        peaks = env["matmul_peak_tflops"] if env else {}
        rows = {}
        for n, t in times.items():
            s = summary(t)
            achieved = total / (s["median"] * 1e-3) / 1e12
            peak = peaks.get("bf16" if variants[n].dtype == torch.float32 else n.removesuffix("+head").split("-")[1])
            rows[n] = {**s, "speedup": baseline / s["median"], "tflops": achieved,
                       "of_matmul_peak": achieved / peak if peak else None, **warm[n]}
        return rows

    def per_stage() -> dict:
        timer = StageTimer(device)
        rows = {}
        with torch.inference_mode():
            for n, v in variants.items():
                if not v.staged:
                    continue
                samples: dict[str, list[float]] = {s: [] for s in STAGES}
                for _ in range(max(3, args.repeats // 3)):
                    timer.start()
                    predict_step(v.policy, v.dtype, *x, mark=timer.mark, sampler_dtype=v.sampler_dtype)
                    for s, ms in timer.stages_ms().items():
                        samples[s].append(ms)
                rows[n] = {s: {**summary(t), "tflops": flops[s] / (statistics.median(t) * 1e-3) / 1e12 if flops else None}
                           for s, t in samples.items()}
        return rows

    # Round 1 takes seconds: eager and CUDA-graph variants, timed and split by stage. Round 2
    # adds the compiled ones (minutes of compilation at paper scale) and times everything
    # again, so a run whose budget ends during compilation still has round 1's figures.
    plain = [n for n in names if not n.startswith("compiled")]
    steps = None
    for round_names in (plain, [n for n in names if n not in plain]):
        timed = set(variants)
        for name in round_names:
            need = 240 if name.startswith("compiled") and device.type == "cuda" else 15
            report.phase(f"prepare {name}", budget, need, lambda name=name: prepare(name))
        if set(variants) != timed:
            steps = report.phase("whole_step", budget, 10 + 0.5 * args.repeats, whole_step) or steps
        if "per_stage" not in report.data["phases"]:
            report.phase("per_stage", budget, 20, per_stage)

    def profile() -> dict:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        best = min((n for n in variants if variants[n].fast is not None), key=lambda n: steps[n]["median"]) \
            if steps else None
        if best is None:
            return {"skipped": "no optimised variant ran"}
        v = variants[best]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(2):
                v.fast.run_uncaptured(*x)
            sync(device)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90)
        if args.profile_out:
            args.profile_out.parent.mkdir(parents=True, exist_ok=True)
            args.profile_out.write_text(f"variant {best}, 2 uncaptured calls\n{table}\n")
        # Device time by kind of kernel (names of cuDNN/cuBLAS/flash/inductor kernels).
        kinds = {"convolution": ("conv", "implicit", "sm90_xmma_fprop", "cudnn"), "gemm": ("gemm", "cutlass", "sm90_xmma", "nvjet"),
                 "attention": ("flash", "fmha", "attention", "efficient"), "triton (fused)": ("triton",),
                 "norm": ("norm",), "copy / layout": ("copy", "transpose", "cat", "elementwise_kernel")}
        by_kind: dict[str, float] = {}
        total_us = 0.0
        for e in prof.key_averages():
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
            if not us or e.key.startswith("aten::") or e.key.startswith("cuda"):
                continue
            total_us += us
            key = e.key.lower()
            kind = next((k for k, words in kinds.items() if any(w in key for w in words)), "other")
            by_kind[kind] = by_kind.get(kind, 0.0) + us
        return {"variant": best, "kernel_ms_per_step": total_us / 2e3,
                "by_kind_ms_per_step": {k: v_ / 2e3 for k, v_ in sorted(by_kind.items(), key=lambda kv: -kv[1])}}

    report.phase("profile", budget, 40, profile)

    def orin() -> dict:
        # FP16 is what an Orin runs; BF16's fraction of its own peak stands in if FP16 overflowed.
        low = [n for n in steps if "fp32" not in n and steps[n]["finite"]
               and steps[n]["of_matmul_peak"]] if steps else []
        if not (low and flops):
            return {"skipped": "needs a finite low-precision step, FLOPs and the measured matmul peaks"}
        best = min(low, key=lambda n: ("fp16" not in n, steps[n]["median"]))
        return {"from_variant": best, **estimate_orin(flops, steps[best]["of_matmul_peak"], steps[best]["median"])}

    report.phase("orin_estimate", budget, 0, orin)
    if not args.skip_train:
        variants.clear()
        state.clear()
        del base, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report.phase("training", budget, 90 if device.type == "cuda" else 10,
                     lambda: train_steps(args.preset, device, seed=0))
    print_table(report.data)
    print(f"wrote {report.path}")
    return 0


def print_table(data: dict) -> None:
    env, flops, steps = data.get("environment", {}), data.get("flops"), data.get("whole_step")
    peaks = env.get("matmul_peak_tflops") or {}
    print(f"{env.get('device')} | torch {env.get('torch')} CUDA {env.get('cuda')} | {env.get('preset')}"
          + (f": {flops['total'] / 1e12:.3f} TFLOP per step" if flops else "")
          + (f" | matmul peak BF16 {peaks['bf16']:.0f} / FP16 {peaks['fp16']:.0f} TFLOP/s" if peaks.get("bf16") else ""))
    if flops:
        print("FLOPs per stage: " + ", ".join(f"{s} {flops[s] / 1e9:.1f} G" for s in STAGES))
    if steps:
        print(f"{'variant':16s} {'median ms':>10s} {'p95 ms':>8s} {'speed-up':>9s} {'TFLOP/s':>8s} {'of peak':>8s} "
              f"{'cosine':>9s} {'max abs':>8s} {'peak GiB':>9s}")
        for k, r in steps.items():
            frac = f"{r['of_matmul_peak']:.1%}" if r.get("of_matmul_peak") is not None else "-"
            mem = f"{r['step_peak_gib_above_resident']:.2f}" if "step_peak_gib_above_resident" in r else "-"
            print(f"{k:16s} {r['median']:10.2f} {r['p95']:8.2f} {r['speedup']:8.2f}x {r['tflops']:8.2f} {frac:>8s} "
                  f"{r['cosine']:9.6f} {r['max_abs']:8.4f} {mem:>9s}")
    for name, info in data.get("phases", {}).items():
        if "error" in info or "skipped" in info:
            print(f"  {name}: {info.get('error') or info.get('skipped')}")


if __name__ == "__main__":
    sys.exit(main())
