"""Self-test of an artifact on this machine, as the robot will run it: open the artifact,
load the engines (TensorRT if engines were built here, else ONNX Runtime), run the text
graph and a few predict steps on synthetic camera frames, check the action chunk, and
report the latencies. ``vpp doctor --artifact DIR --selftest``. Imports no torch."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from vpp_edge.errors import MissingDependencyError, VPPError

INSTRUCTION = "pick up the object and place it in the bowl"


class SelfTestError(VPPError):
    """The artifact does not load or does not produce a valid action chunk here."""


def run_selftest(artifact: str | Path, backend: str = "auto", precision: str | None = None, runs: int = 3,
                 seed: int = 0) -> dict[str, Any]:
    """Load, infer ``runs`` times, and return what happened (backend, timings in ms)."""
    import vpp_edge
    from vpp_edge.extras import is_available
    from vpp_edge.runtime.artifact import Artifact
    from vpp_edge.runtime.build import open_policy
    from vpp_edge.runtime.cameras.cv2_probe import probe
    from vpp_edge.runtime.config import RuntimeConfig

    art = Artifact.open(artifact)
    engines_built = sorted(art.manifest.get("engines") or {})
    report: dict[str, Any] = {"artifact": str(artifact), "preset": art.preset.name, "requested_backend": backend,
                              "tensorrt_installed": is_available("tensorrt"), "engines_in_artifact": engines_built,
                              "code": str(Path(vpp_edge.__file__).parent),
                              "opencv": probe()}  # the cv2 the cameras decode with (GStreamer: hardware JPEG)
    start = time.perf_counter()
    try:  # the engine as vpp run opens it (runtime/build.py), from the same runtime config
        loaded = open_policy(RuntimeConfig(Path(artifact), backend, precision, seed=seed), art)
    except (VPPError, MissingDependencyError):
        raise
    except Exception as exc:  # an engine library's own error: one line, with the backend named
        raise SelfTestError(f"{artifact}: {backend} engines did not load: {type(exc).__name__}: {exc}") from None
    engine, policy = loaded.engine, loaded.runtime
    report["backend"], report["precision"] = engine.backend, engine.precision
    report["choice"] = getattr(engine, "choice", None)  # --backend auto: what it chose and why
    report["load_s"] = time.perf_counter() - start
    try:
        report["text_ms"] = policy.set_instruction(INSTRUCTION)
        frames = np.random.default_rng(seed).integers(0, 256, policy.frame_shape, dtype=np.uint8)
        latencies, chunk = [], None
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            chunk = policy.infer(frames)
            latencies.append((time.perf_counter() - t0) * 1e3)
    except VPPError as exc:
        raise SelfTestError(f"{artifact}: inference on {engine.backend}/{engine.precision} failed: {exc}") from None
    except Exception as exc:
        raise SelfTestError(f"{artifact}: inference on {engine.backend}/{engine.precision} failed: "
                            f"{type(exc).__name__}: {exc}") from None
    finally:
        engine.close()
    if not np.all(np.isfinite(chunk.actions)):  # what the robot would receive, after de-normalisation
        raise SelfTestError(f"{artifact}: the action chunk in robot units is not finite (check the artifact's "
                            "normalization statistics)")
    report.update(first_ms=latencies[0], median_ms=statistics.median(latencies[1:] or latencies),
                  runs=len(latencies), stages_ms=chunk.timings_ms, chunk_shape=list(chunk.actions.shape),
                  action_range=[float(chunk.actions.min()), float(chunk.actions.max())])
    return report


def format_report(r: dict[str, Any]) -> list[str]:
    from vpp_edge.runtime.cameras.cv2_probe import summary

    lines = [f"self-test: artifact {r['artifact']} (preset {r['preset']}), code from {r['code']}"]
    if "opencv" in r:
        lines.append(f"self-test: OpenCV: {summary(r['opencv'])}")
    if r["backend"] != "tensorrt" and r["requested_backend"] == "auto":
        why = ("TensorRT not available" if not r["tensorrt_installed"]
               else "no TensorRT engines in the artifact (run vpp build-engines here)")
        lines.append(f"self-test: {why}: ONNX Runtime fallback" if r["backend"] == "onnxruntime"
                     else f"self-test: {r.get('choice')}")  # the artifact's cpu_default (runtime/engines)
    lines.append(f"self-test: engines loaded: {r['backend']}/{r['precision']} in {r['load_s']:.2f} s")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_ms"].items())
    lines.append(f"self-test: text {r['text_ms']:.1f} ms; first inference {r['first_ms']:.1f} ms; "
                 f"median of {r['runs']} {r['median_ms']:.1f} ms ({stages} ms)")
    lines.append(f"self-test: action chunk {r['chunk_shape'][0]}x{r['chunk_shape'][1]} finite, "
                 f"range [{r['action_range'][0]:+.3f}, {r['action_range'][1]:+.3f}]: PASS")
    return lines


def verify_artifact(artifact: str | Path) -> str:
    """Check every graph (and engine) file of the artifact against its manifest; one summary line."""
    from vpp_edge.runtime.manifest import read_manifest, verify_entry

    manifest = read_manifest(artifact)
    entries = {**manifest["graphs"], **{f"engine {k}": v for k, v in (manifest.get("engines") or {}).items()}}
    size = 0
    for key, entry in entries.items():
        size += verify_entry(artifact, key, entry).stat().st_size
    return (f"artifact {artifact}: {len(manifest['graphs'])} graphs, {len(manifest.get('engines') or {})} engines, "
            f"{size / 2**20:.1f} MiB, every sha256 matches manifest.json")
