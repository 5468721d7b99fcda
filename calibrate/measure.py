"""Measure one sweep point in a process of its own:

    python -m vpp_edge.calibrate.measure JOB.json

The job names an artifact, a backend and a precision, and an ``.npz`` of held-out inputs
(frames, instructions, the noise of every observation and, for a policy that takes the
robot state, its normalised state ``states`` [N, 1, P]). The worker runs the predict
step exactly as the robot does (runtime engines + ``predict_step``), keeps the action
chunks and the Video Former tokens of every observation, then times ``repeats`` predict
steps per stage. It writes ``result.json`` and ``outputs.npz`` into the job's ``out``.

A fresh process per point keeps the memory figure honest: ``peak_rss_mb`` is the peak
resident set size (``VmHWM``) of a process that loaded only this configuration
(Python, numpy and the backend included); ``engine_rss_mb`` is the part that appeared
after the imports (sessions, weights, arenas, activations). On the ONNX Runtime path
the worker imports no torch.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vpp_edge.errors import VPPError

STAGES = ("tvp", "former", "action_head")


class MeasureError(VPPError):
    """The measuring process failed; the message carries the end of its error output."""


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    return _proc_status_mb("VmRSS") or _peak_rss_mb()


def _peak_rss_mb() -> float:
    """Peak RSS of this process image. Linux: VmHWM, which starts afresh at exec (getrusage's
    ru_maxrss would include the parent's size at fork)."""
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 / p99 / mean / n of a list of milliseconds."""
    a = np.asarray(samples, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean()),
            "n": int(a.size)}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """The worker's body (also callable in-process, e.g. from a debugger)."""
    from vpp_edge.runtime.artifact import Artifact
    from vpp_edge.runtime.engines import create_engine
    from vpp_edge.runtime.predict_step import encode_text, predict_actions, timed

    backend, precision, threads = job["backend"], job["precision"], int(job.get("threads", 0))
    if backend == "onnxruntime":
        import onnxruntime  # noqa: F401  (imported before the baseline: engine memory excludes the library)
    elif backend == "openvino":
        import openvino  # noqa: F401
    elif backend == "torch":
        import torch  # noqa: F401
    rss_start = _rss_mb()
    with np.load(job["inputs"], allow_pickle=False) as data:
        frames, tvp_noise, action_noise = data["frames"], data["tvp_noise"], data["action_noise"]
        states = data["states"] if "states" in data.files else None
        instructions = [str(s) for s in data["instructions"]]
    options: dict[str, Any] = {}
    if backend in ("onnxruntime", "openvino"):
        options["threads"] = threads
    elif backend == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        options["checkpoint"] = job["checkpoint"]
    start = time.perf_counter()
    artifact = Artifact.open(job["artifact"])
    engine = create_engine(artifact, backend, precision, **options).load()
    load_s = time.perf_counter() - start
    rss_loaded = _rss_mb()
    tokenizer = artifact.tokenizer()
    sigmas, mode = artifact.sigmas, artifact.action_mode
    if (states is None) != (artifact.state_normalizer is None):  # never a silent zero (or dropped) state
        raise MeasureError(f"the artifact's policy {'takes' if artifact.state_normalizer else 'takes no'} the robot "
                           f"state but the held-out inputs {'carry' if states is not None else 'carry no'} states")

    actions, tokens = [], []
    for k, instruction in enumerate(instructions):
        ids, mask = tokenizer([instruction])
        condition, goal = encode_text(engine.run, ids, mask)
        seen: dict[str, np.ndarray] = {}

        def run(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = engine.run(graph, feeds)
            if graph == "former":
                seen["tokens"] = np.array(out["tokens"])  # engine buffers are reused: copy
            return out

        chunk = predict_actions(run, condition, goal, frames[k][None], tvp_noise[k], action_noise[k], sigmas, mode,
                                state=None if states is None else states[k])
        actions.append(np.array(chunk[0], dtype=np.float32))
        tokens.append(seen["tokens"][0].astype(np.float32))

    ids, mask = tokenizer([instructions[0]])
    load_before = os.getloadavg()[0]
    per_stage: dict[str, list[float]] = {s: [] for s in ("text", *STAGES, "total")}
    warmup, repeats = int(job.get("warmup", 1)), int(job.get("repeats", 10))
    for i in range(warmup + repeats):
        t = time.perf_counter()
        condition, goal = encode_text(engine.run, ids, mask)
        text_ms = (time.perf_counter() - t) * 1e3
        timings: dict[str, float] = {}
        t = time.perf_counter()
        predict_actions(timed(engine.run, timings), condition, goal, frames[0][None], tvp_noise[0], action_noise[0],
                        sigmas, mode, state=None if states is None else states[0])
        total_ms = (time.perf_counter() - t) * 1e3
        if i >= warmup:
            per_stage["text"].append(text_ms)
            per_stage["total"].append(total_ms)
            for s in STAGES:
                per_stage[s].append(timings.get(s, 0.0))
    engine.close()
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "outputs.npz", actions=np.stack(actions), tokens=np.stack(tokens))
    peak = _peak_rss_mb()
    result = {
        "backend": backend, "precision": precision, "action_mode": mode, "threads": threads,
        "latency_ms": {s: percentiles(v) for s, v in per_stage.items()},
        "samples_ms": per_stage,
        "load_s": load_s,
        # 1-minute load average around the timed runs: above the core count, other processes
        # competed for the CPU and the latencies are pessimistic.
        "load_avg": max(load_before, os.getloadavg()[0]),
        "memory": {"peak_rss_mb": peak, "engine_rss_mb": max(peak - rss_start, 0.0),
                   "loaded_rss_mb": rss_loaded},
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def measure(job: dict[str, Any], timeout_s: float = 600.0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Run ``job`` in a fresh Python process; its result and its outputs (actions, tokens)."""
    with tempfile.TemporaryDirectory(prefix="vpp-measure-") as tmp:
        job = {**job, "out": str(Path(tmp) / "out")}
        path = Path(tmp) / "job.json"
        path.write_text(json.dumps(job))
        env = dict(os.environ)
        if job["backend"] == "torch":  # idle OpenMP threads sleep, as the ONNX Runtime engine's do: spinning
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # threads on a shared CPU slow everything down
        try:
            proc = subprocess.run([sys.executable, "-m", "vpp_edge.calibrate.measure", str(path)],
                                  capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            raise MeasureError(f"measuring took longer than {timeout_s:.0f} s (measure.timeout_s)") from None
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            raise MeasureError(f"measuring process exited with {proc.returncode}: {tail}")
        result = json.loads((Path(job["out"]) / "result.json").read_text())
        with np.load(Path(job["out"]) / "outputs.npz", allow_pickle=False) as data:
            outputs = {k: data[k] for k in data.files}
    return result, outputs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m vpp_edge.calibrate.measure JOB.json", file=sys.stderr)
        return 2
    try:
        run_job(json.loads(Path(argv[0]).read_text()))
    except VPPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
