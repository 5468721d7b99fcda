"""The resumable latency/accuracy sweep.

Output folder (``vpp calibrate sweep --out DIR``)::

    sweep.json            the sweep's context (model, data, INT8 and measuring settings) and its runs
    points.jsonl          one line per finished point, appended as each one finishes
    data/                 calibration.npz, heldout.npz (observations), reference.npz (FP32 PyTorch outputs)
    cache/                graphs, quantizer feeds, artifacts per model configuration (calibrate.builder)
    report.{csv,json,md}, pareto.png, stages.png, recommended.yaml, recommended/   (calibrate.report)

Running the same command again skips every point already in ``points.jsonl`` (failed
points are retried) and measures only what is missing; Ctrl-C loses at most the point
in progress. Results made under another context (other weights, data, INT8 or measuring
settings) are never mixed in: the command refuses, and ``--fresh`` starts over.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from vpp_edge.errors import VPPError
from vpp_edge.precisions import calibrated
from vpp_edge.files import read_json
from vpp_edge.presets import Preset, get_preset, preset_from_dict

from . import knobs as K
from .grid import Point, SweepSpec, expand

log = logging.getLogger(__name__)
POINTS_FILE = "points.jsonl"
STATE_FILE = "sweep.json"
FINAL = ("ok", "skipped")  # statuses a resumed sweep does not redo


class SweepStateError(VPPError):
    """The output folder holds results of a different sweep context."""


@dataclass
class SweepOutcome:
    out: Path
    rows: list[dict[str, Any]]
    measured_now: int
    wall_s: float
    report: dict[str, Any] = field(default_factory=dict)


# ---- points.jsonl ------------------------------------------------------------------------
def read_rows(out: str | Path) -> list[dict[str, Any]]:
    """Finished points, last entry per id wins; a torn last line (killed while writing) is ignored."""
    path = Path(out) / POINTS_FILE
    if not path.is_file():
        return []
    rows: dict[str, dict[str, Any]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                log.warning("%s: ignoring a torn last line (interrupted while writing)", path)
                continue
            raise SweepStateError(f"{path}:{n + 1}: not valid JSON; fix or delete the line (or use --fresh)") from None
        rows[row["id"]] = row
    return list(rows.values())


def append_row(out: str | Path, row: dict[str, Any]) -> None:
    """Append one finished point and push it to disk before the next point starts."""
    path = Path(out) / POINTS_FILE
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):  # a torn last line (killed while writing): drop it
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=_plain) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _plain(o: Any) -> Any:
    return o.item() if hasattr(o, "item") else str(o)


def _check_state(out: Path, context: dict[str, Any], fresh: bool) -> dict[str, Any]:
    state_path = out / STATE_FILE
    if fresh:
        for name in (POINTS_FILE, STATE_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "data", ignore_errors=True)
    if state_path.is_file():
        state = read_json(state_path, SweepStateError, "sweep state")
        if state.get("context") != json.loads(json.dumps(context, default=str)):
            raise SweepStateError(
                f"{out} holds results of a sweep with other model/data/INT8/measure settings "
                f"({_first_difference(state.get('context'), context)}); use --fresh to discard them, or another --out")
        return state
    out.mkdir(parents=True, exist_ok=True)
    state = {"context": json.loads(json.dumps(context, default=str)), "runs": []}
    _write_state(out, state)
    return state


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    b = json.loads(json.dumps(b, default=str))
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    return f"{path or 'context'}: {a!r} -> {b!r}"


def _write_state(out: Path, state: dict[str, Any]) -> None:
    tmp = out / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, default=str), encoding="utf-8")
    tmp.replace(out / STATE_FILE)


# ---- metrics -----------------------------------------------------------------------------
def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))


def accuracy(ref_actions: np.ndarray, ref_tokens: np.ndarray, actions: np.ndarray, tokens: np.ndarray
             ) -> dict[str, float]:
    """Action-chunk error (normalised action units) and Video Former token cosine against
    the reference, over held-out observations [N, ...]. With fewer frames, tokens are
    compared over the frames both have (tokens are frame-major)."""
    if actions.shape != ref_actions.shape:
        raise VPPError(f"action chunks {list(actions.shape)} do not match the reference {list(ref_actions.shape)}")
    err = actions.astype(np.float64) - ref_actions.astype(np.float64)
    q = min(tokens.shape[1], ref_tokens.shape[1])
    feat = [_cosine(t[:q], r[:q]) for t, r in zip(tokens, ref_tokens)]
    return {"action_mse": float(np.mean(err**2)), "action_max_abs": float(np.max(np.abs(err))),
            "action_cosine_min": min(_cosine(a, r) for a, r in zip(actions, ref_actions)),
            "feature_cosine_min": float(min(feat)), "feature_cosine_mean": float(np.mean(feat))}


def flatten_result(result: dict[str, Any]) -> dict[str, Any]:
    """Latency and memory of a measuring run as flat columns (CSV-friendly)."""
    row: dict[str, Any] = {}
    for stage, stats in result["latency_ms"].items():
        row[f"{stage}_p50_ms"] = stats["p50"]
        row[f"{stage}_p99_ms"] = stats["p99"]
    row["latency_repeats"] = result["latency_ms"]["total"]["n"]
    row.update({k: v for k, v in result["memory"].items()})
    row["load_s"] = result["load_s"]
    row["load_avg"] = result.get("load_avg")
    return row


# ---- the pipeline behind one point --------------------------------------------------------
class PointRunner:
    """Builds a point's artifact (cached) and measures it against the FP32 reference."""

    def __init__(self, spec: SweepSpec, out: Path, base_preset: Preset, checkpoint: Path | None,
                 calibration_set: Path | None, heldout_set: Path | None, status: Callable[[str], None]):
        import torch

        from vpp_edge.export.options import load_options
        from vpp_edge.export.graphs import reference_run

        from .builder import ArtifactBuilder
        from .dataset import ObservationSet, build_split
        from vpp_edge.state_feeds import PARITY_SEED, state_feeds

        self.spec, self.out, self.status = spec, out, status
        torch.set_num_threads(max(1, spec["measure"]["threads"] or torch.get_num_threads()))
        status("loading the model")
        self.policy, self.tokenizer, source = _load_base(spec, checkpoint, base_preset)
        data = out / "data"
        cal_path, held_path = data / "calibration.npz", data / "heldout.npz"
        if not (cal_path.is_file() and held_path.is_file()):
            status("sampling calibration and held-out frames")
            d = spec["data"]
            roots = [Path(r) for r in d["roots"]] if d["roots"] else None
            p = base_preset
            if calibration_set is None or heldout_set is None:
                split = build_split(p.num_views, p.image_size, d["calibration_samples"], d["heldout_samples"],
                                    d["heldout_episodes"], roots)
                (data / "split.txt").parent.mkdir(parents=True, exist_ok=True)
                (data / "split.txt").write_text(split.note + "\n")
            cal = ObservationSet.load(calibration_set) if calibration_set else split.calibration
            held = ObservationSet.load(heldout_set, "held-out set") if heldout_set else split.heldout
            for s, what in ((cal, "calibration set"), (held, "held-out set")):
                if s.num_views < p.num_views or s.image_size != p.image_size:
                    raise VPPError(f"{what} has {s.num_views} views of {s.image_size} px; preset '{p.name}' needs "
                                   f"{p.num_views} of {p.image_size} px")
            cal.save(cal_path)
            held.save(held_path)
        self.calibration = ObservationSet.load(cal_path)
        self.heldout = ObservationSet.load(held_path, "held-out set")
        ref_path = data / "reference.npz"
        self.noise = [self.policy.make_noise(1, k) for k in range(len(self.heldout))]
        # A state-taking policy (action_head.use_proprio): each held-out observation's recorded
        # state where the data has them, else the export's seeded states; the same in the
        # reference and the measured run (vpp_edge/state_feeds.py).
        self.states, note = state_feeds(self.policy.state_normalizer, self.heldout.states, self.heldout.sources,
                                        PARITY_SEED, "held-out set")
        if note:
            status(note)
        if not ref_path.is_file():
            if note:  # beside how the held-out set was kept apart, once per reference
                with (data / "split.txt").open("a") as f:
                    f.write(note + "\n")
            status("FP32 reference")
            actions, tokens = [], []
            for obs, noise, state in zip(self.heldout.observations(), self.noise, self.states):
                ids, mask = (torch.from_numpy(a) for a in self.tokenizer([obs.instruction]))
                frames = torch.from_numpy(np.ascontiguousarray(obs.frames[: base_preset.num_views])).unsqueeze(0)
                ref = reference_run(self.policy, ids, mask, frames, noise.tvp, noise.action,
                                    None if state is None else torch.from_numpy(state))
                actions.append(ref["actions"][0].numpy())
                tokens.append(ref["tokens"][0].numpy())
            np.savez(ref_path, actions=np.stack(actions), tokens=np.stack(tokens))
        with np.load(ref_path, allow_pickle=False) as ref:
            self.ref_actions, self.ref_tokens = ref["actions"], ref["tokens"]
        options = load_options()
        int8 = {k: (v if v is not None else options["int8"].get(k)) for k, v in spec["int8"].items()}
        self.builder = ArtifactBuilder(out / "cache", self.policy, self.tokenizer, self.calibration, options, int8,
                                       source, checkpoint, status)

    def inputs_for(self, preset: Preset) -> Path:
        """Held-out frames and noise cut to the configuration, as the measuring process reads them."""
        from vpp_edge.state_feeds import stacked
        from .variants import variant_noise

        pairs = [variant_noise(n, preset) for n in self.noise]
        frames = self.heldout.frames[:, : preset.num_views]
        states = stacked(self.states)
        # The normalised states depend on the policy's bounds as well as the data: in the key.
        tag = "" if states is None else "s" + hashlib.sha256(states.tobytes()).hexdigest()[:8]
        key = f"{preset.num_views}v{preset.tvp.num_frames}f{tag}-{self.heldout.digest()[:12]}"
        path = self.out / "cache" / "inputs" / f"{key}.npz"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp.npz")
            np.savez(tmp, frames=np.ascontiguousarray(frames), instructions=np.array(self.heldout.instructions, str),
                     tvp_noise=np.stack([t.numpy() for t, _ in pairs]),
                     action_noise=np.stack([a.numpy() for _, a in pairs]),
                     **({"states": states} if states is not None else {}))
            tmp.replace(path)
        return path

    def __call__(self, point: Point, precisions: list[str]) -> dict[str, Any]:
        from .measure import measure

        v = point.values
        preset = K.model_preset(self.policy.preset, v)
        method = v["calibration"] if v["precision"] in calibrated() else "minmax"
        built = self.builder.build(preset, precisions, v["action_mode"], method, point.label)
        m = self.spec["measure"]
        job = {"artifact": str(built.artifact), "backend": v["backend"], "precision": v["precision"],
               "threads": m["threads"], "inputs": str(self.inputs_for(preset)), "warmup": m["warmup"],
               "repeats": m["repeats"]}
        if v["backend"] == "torch":
            job["checkpoint"] = str(self.builder.checkpoint_for(preset))
        self.status("measuring")
        start = time.perf_counter()
        result, outputs = measure(job, m["timeout_s"])
        row = {"config": built.key, "artifact": str(built.artifact), "built": built.built,
               "build_s": built.seconds, "measure_s": time.perf_counter() - start,
               "graph_keys": built.graph_keys, "action_mode": result["action_mode"]}
        row.update(flatten_result(result))
        row.update(accuracy(self.ref_actions, self.ref_tokens, outputs["actions"], outputs["tokens"]))
        return row


def _load_base(spec: SweepSpec, checkpoint: Path | None, preset: Preset):
    if checkpoint is not None:
        from vpp_edge.training.checkpoints import load_checkpoint

        policy, tokenizer = load_checkpoint(checkpoint)
        return policy, tokenizer, f"checkpoint {checkpoint}"
    from vpp_edge.training.models import build_policy

    seed = int(spec["model"]["seed"])
    policy, tokenizer = build_policy(preset, seed=seed)
    return policy, tokenizer, f"untrained '{preset.name}' model (random weights, seed {seed})"


def base_preset(spec: SweepSpec, checkpoint: Path | None) -> Preset:
    """The trained model's preset (from the checkpoint when there is one), without torch."""
    if checkpoint is not None:
        config = read_json(Path(checkpoint) / "vpp_config.json", VPPError, "is it a vpp-edge checkpoint?")
        return preset_from_dict(config["preset"], source=str(Path(checkpoint) / "vpp_config.json"))
    return get_preset(spec["model"]["preset"])


def _precisions_by_artifact(points: list[Point]) -> dict[str, list[str]]:
    """Precisions each artifact must hold: points of one model configuration, action mode
    and INT8 calibration share an artifact."""
    groups: dict[str, set[str]] = {}
    for p in points:
        groups.setdefault(_artifact_group(p), set()).add(p.values["precision"])
    return {k: sorted(v) for k, v in groups.items()}


def _artifact_group(p: Point) -> str:
    v = p.values
    return json.dumps([{k: v[k] for k in K.MODEL_KNOBS}, v["action_mode"], v["calibration"]], sort_keys=True)


def run_sweep(spec: SweepSpec, out: str | Path, checkpoint: Path | None = None, fresh: bool = False,
              progress: bool = True, calibration_set: Path | None = None, heldout_set: Path | None = None,
              runner: Callable[[Point, list[str]], dict[str, Any]] | None = None,
              available_backends: list[str] | None = None) -> SweepOutcome:
    """Measure every point of ``spec`` not yet in ``out``; returns all rows.

    ``runner`` replaces the build-and-measure pipeline (tests); it gets the point and the
    precisions of its artifact and returns the measured columns.
    """
    out = Path(out).resolve()  # rows name artifact folders: absolute, valid from anywhere
    checkpoint = checkpoint or (Path(spec["model"]["checkpoint"]) if spec["model"]["checkpoint"] else None)
    preset = base_preset(spec, checkpoint)
    if available_backends is None:
        from vpp_edge.runtime.engines import available_backends as backends

        available_backends = backends()
    points, skipped = expand(spec, preset, available_backends)
    context = {**spec.context(), "checkpoint": _checkpoint_identity(checkpoint),
               "calibration_set": str(calibration_set) if calibration_set else None,
               "heldout_set": str(heldout_set) if heldout_set else None}
    with _exclusive(out):
        return _run_locked(spec, out, checkpoint, fresh, progress, calibration_set, heldout_set, runner, preset,
                           points, skipped, context)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One sweep per output folder at a time (two would interleave points.jsonl)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepStateError(f"another sweep is running in {out}") from None
        yield


def _run_locked(spec: SweepSpec, out: Path, checkpoint: Path | None, fresh: bool, progress: bool,
                calibration_set: Path | None, heldout_set: Path | None,
                runner: Callable[[Point, list[str]], dict[str, Any]] | None, preset: Preset, points: list[Point],
                skipped: list[tuple[Point, str]], context: dict[str, Any]) -> SweepOutcome:
    from tqdm.auto import tqdm

    state = _check_state(out, context, fresh)
    done = {r["id"]: r for r in read_rows(out) if r.get("status") in FINAL}
    for point, why in skipped:
        if point.id not in done:
            append_row(out, _row(point, "skipped", spec, {"error": why}))
    pending = [p for p in points if p.id not in done]
    precisions = _precisions_by_artifact(points)
    started = time.perf_counter()
    measured = 0
    bar = tqdm(total=len(points), initial=len(points) - len(pending), desc=f"sweep {spec.name}", unit="point",
               disable=not progress)
    current = {"label": ""}

    def status(what: str) -> None:
        bar.set_postfix_str(f"{current['label']}: {what}"[:70], refresh=True)

    try:
        if pending and runner is None:
            runner = PointRunner(spec, out, preset, checkpoint, calibration_set, heldout_set, status)
        for point in pending:
            current["label"] = point.label
            status("building")
            try:
                columns = runner(point, precisions[_artifact_group(point)])
                row = _row(point, "ok", spec, columns)
            except Exception as exc:  # one broken point must not end the sweep; it is retried on resume
                log.warning("point %s (%s) failed: %s", point.id, point.label, exc,
                            exc_info=not isinstance(exc, VPPError))
                row = _row(point, "failed", spec, {"error": f"{type(exc).__name__}: {exc}"})
            append_row(out, row)
            measured += 1
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        n = len(points) - len(pending) + measured
        print(f"\ninterrupted: {n} of {len(points)} points are kept in {out / POINTS_FILE}; "
              "run the same command again to measure the rest")
        raise
    finally:
        bar.close()
        wall = time.perf_counter() - started
        state["runs"].append({"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "wall_s": round(wall, 1), "points_measured": measured})
        _write_state(out, state)
    rows = read_rows(out)
    wanted = {p.id for p in points} | {p.id for p, _ in skipped}
    return SweepOutcome(out, [r for r in rows if r["id"] in wanted], measured, wall)


def _row(point: Point, status: str, spec: SweepSpec, columns: dict[str, Any]) -> dict[str, Any]:
    row = {"id": point.id, "label": point.label, "status": status, **point.values, **columns,
           "context": spec.context_key(),
           "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def _checkpoint_identity(checkpoint: Path | None) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    weights = Path(checkpoint) / "model.safetensors"
    stat = weights.stat() if weights.is_file() else None
    return {"path": str(Path(checkpoint).resolve()), "bytes": stat.st_size if stat else None,
            "mtime": int(stat.st_mtime) if stat else None}
