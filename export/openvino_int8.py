"""INT8 graphs for the OpenVINO backend: NNCF post-training quantisation of an artifact's
FP32 graphs, gated end to end like every other precision, added to the artifact as
precision ``int8_ov``.

    python -m vpp_edge.export.openvino_int8 artifacts/tiny [--preset transformer] [--threads 2]

Workstation side (NNCF, OpenVINO, ONNX; no torch). What it does:

1. the calibration and parity observations are the export's own (``parity.json`` names
   them; they are sampled again the same way and checked against those names); a policy
   that takes the robot state gets each observation's recorded state, normalised with the
   artifact's state bounds, as the export does (vpp_edge/state_feeds.py, one rule), seeded ones
   only where the data records none of the policy's width (the section's ``states`` says which);
2. calibration feeds of every graph are recorded from the FP32 graphs run by OpenVINO in
   f32 on the calibration observations (the FP32 graphs passed the export's 0.9999 gate
   against PyTorch, so their intermediate tensors are the model's), both action modes;
3. NNCF quantises every graph the ``int8`` export options list (the text encoder, run
   once per instruction, stays FP32), keeping the modules of ``int8.exclude_modules`` in
   float, with the ``default`` preset (NNCF's performance preset) or ``transformer``
   (``ModelType.TRANSFORMER``: NNCF's rules for attention, its mixed preset); the result is
   an OpenVINO IR (``int8_ov/<graph>.xml`` + ``.bin``, hashed in the manifest like the ONNX
   graphs) that OpenVINO runs with its INT8 kernels (VNNI/AMX);
4. the gate: the chained action chunk of OpenVINO on the INT8 graphs against OpenVINO f32
   on the FP32 graphs, on the held-out parity observations, with the export's INT8 gate
   (cosine and max-abs in normalised action units); per-graph figures are recorded too.
   Passed: the graphs, ``parity.json`` and the manifest are updated; failed: nothing is
   written and :class:`ParityError` says by how much;
5. defaults from data: every CPU engine/precision of the artifact that passes its gate
   (ONNX Runtime FP32 / ``int8_cpu``, OpenVINO on the FP32 graphs in its chosen inference
   precision, OpenVINO ``int8_ov``) is timed interleaved on this machine, and the fastest
   is recorded in the manifest as ``cpu_default`` and reported in one line.

``vpp export`` (and so ``make demo``'s first export) runs the same steps on the artifact it
wrote when ``int8_ov`` is among its precisions (the default) and OpenVINO is installed
(:func:`after_export`); this command adds them to an artifact exported without them.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from vpp_edge.runtime.artifact import Artifact
from vpp_edge.runtime.manifest import read_manifest, sha256_file, write_manifest
from vpp_edge.runtime.predict_step import encode_text, predict_actions

from vpp_edge import precisions
from vpp_edge.state_feeds import CALIBRATION_SEED, PARITY_SEED, state_feeds
from vpp_edge.extras import require
from vpp_edge.graph_spec import ACTION_MODE_GRAPHS, ACTION_MODES, GRAPH_NAMES
from vpp_edge.observations import Observation, sample_observations

from . import onnx_io
from .parity import ParityError, compare, passes, summary_table, worst

log = logging.getLogger(__name__)
PRECISION = next(n for n in precisions.names() if precisions.get(n).derivation == precisions.NNCF)
NNCF_PRESETS = ("default", "transformer")
Feeds = dict[str, np.ndarray]


def _noise(policy_shapes: tuple[tuple[int, ...], tuple[int, ...]], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s, dtype=np.float32) for s in policy_shapes)


def noise_shapes(artifact: Artifact) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the TVP's and the action head's noise inputs."""
    return artifact.input_spec("tvp", "noise").shape, (1, artifact.preset.action_horizon, artifact.preset.action_dim)


def observation_states(artifact: Artifact, observations: list[Observation], first_seed: int,
                       what: str) -> tuple[list[np.ndarray | None], str]:
    """(the normalised state [1, P] of each observation, or None each for a policy without state
    input; a line saying which states, empty for the latter). The episodes' recorded states
    where they record states of the policy's width, normalised with the artifact's bounds, else
    seeded ones (``first_seed + k``): :func:`vpp_edge.state_feeds.state_feeds`, the rule
    ``vpp export`` and ``vpp calibrate`` follow, so the gate sees what the export's parity saw."""
    if artifact.state_normalizer is None or not observations:  # no state to find: no episode to read
        return [None] * len(observations), ""
    from vpp_edge.observations import recorded_states

    return state_feeds(artifact.state_normalizer, recorded_states(observations)[0], [o.source for o in observations],
                       first_seed, what)


def chain(run: Callable[[str, Feeds], Feeds], artifact: Artifact, obs: Observation, seed: int,
          state: np.ndarray | None, mode: str | None = None) -> np.ndarray:
    """The normalised action chunk [1, T, A] of one observation (noise from ``seed``; ``state``:
    the normalised robot state [1, P] of a state-taking policy, from :func:`observation_states`)."""
    ids, mask = artifact.tokenizer()([obs.instruction])
    condition, goal = encode_text(run, ids, mask)
    noise, action_noise = _noise(noise_shapes(artifact), seed)
    return predict_actions(run, condition, goal, obs.frames[None], noise, action_noise, artifact.sigmas,
                           mode or artifact.action_mode, state=state)


def record_feeds(run: Callable[[str, Feeds], Feeds], artifact: Artifact, observations: list[Observation],
                 states: list[np.ndarray | None], seed: int = CALIBRATION_SEED) -> dict[str, list[Feeds]]:
    """Every graph's feeds while ``run`` predicts on ``observations`` (with ``states``, one each)
    in every action mode."""
    feeds: dict[str, list[Feeds]] = {name: [] for name in GRAPH_NAMES}

    def recording(graph: str, inputs: Feeds) -> Feeds:
        feeds[graph].append({k: np.array(v, copy=True) for k, v in inputs.items()})
        return {k: np.array(v, copy=True) for k, v in run(graph, inputs).items()}

    for k, (obs, state) in enumerate(zip(observations, states, strict=True)):
        for mode in ACTION_MODES:
            chain(recording, artifact, obs, seed + k, state, mode)
    # The graphs before the action head ran once per mode on the same inputs: keep one copy each.
    for name in GRAPH_NAMES:
        if not any(name in graphs for graphs in ACTION_MODE_GRAPHS.values()):
            feeds[name] = feeds[name][::len(ACTION_MODES)]
    return feeds


def quantize_graph(src: Path, dst: Path, feeds: list[Feeds], preset: str, exclude_modules: list[str],
                   op_types: list[str]) -> dict[str, Any]:
    """NNCF post-training INT8 of the ONNX graph ``src``, read by OpenVINO, into the
    OpenVINO IR ``dst`` (``.xml`` + ``.bin``); returns what was kept in float and how long
    it took. (NNCF's ONNX backend asserts on this model's attention and bias nodes, 3.4.)"""
    if preset not in NNCF_PRESETS:
        raise ValueError(f"NNCF preset '{preset}' unknown; allowed: {', '.join(NNCF_PRESETS)}")
    nncf = require("nncf", "INT8 for OpenVINO")
    ov = require("openvino", "INT8 for OpenVINO")
    nncf.set_log_level(logging.WARNING)  # its INFO lists every node left unquantised: hundreds of lines per export

    model = ov.Core().read_model(str(src))
    excluded = onnx_io.nodes_matching(src, exclude_modules, op_types)
    kwargs: dict[str, Any] = {"subset_size": len(feeds)}
    if excluded:  # OpenVINO keeps the ONNX node names of the operations it reads
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=excluded, validate=False)
    if preset == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    start = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(feeds), **kwargs)
    seconds = time.perf_counter() - start
    dst.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    fq = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    return {"nncf_preset": preset, "kept_float": len(excluded), "seconds": round(seconds, 2), "fake_quantize": fq}


def ir_entry(path: Path, root: Path, fp32_entry: dict[str, Any]) -> dict[str, Any]:
    """Manifest entry of an OpenVINO IR graph: its hashes (``.bin`` as external data) and
    the IO specs of the FP32 graph it was made from (quantisation changes no IO)."""
    weights = path.with_suffix(".bin")
    return {"file": str(path.relative_to(root)), "sha256": sha256_file(path), "bytes": path.stat().st_size,
            "external_data": [{"file": str(weights.relative_to(root)), "sha256": sha256_file(weights)}],
            "precision": PRECISION, "format": "openvino-ir",
            "inputs": fp32_entry["inputs"], "outputs": fp32_entry["outputs"]}


def _same_observations(artifact: Artifact, parity: dict[str, Any],
                       roots: list[Path] | None = None) -> tuple[list[Observation], list[Observation]]:
    """The export's parity and calibration observations, sampled again (from ``roots``: the
    export's ``--data``, else the samples) and checked by name."""
    n_parity, n_calib = len(parity["observations"]), len(parity["calibration_observations"])
    obs = sample_observations(artifact.preset.num_views, artifact.preset.image_size, n_parity + n_calib, roots=roots)
    if [o.source for o in obs] != parity["observations"] + parity["calibration_observations"]:
        raise ParityError(f"{artifact.root}: the export's observations cannot be sampled again here (exported "
                          "with other --data, or another shared/vpp_samples)")
    return obs[:n_parity], obs[n_parity:]


def evaluate(reference: Any, candidate: Any, artifact: Artifact, parity_obs: list[Observation],
             parity_states: list[np.ndarray | None], gates: dict[str, float]) -> dict[str, Any]:
    """Per-graph figures (each graph fed the reference's inputs) and the chained chunk of
    ``candidate`` against ``reference`` (engines), with the export's INT8 gate, on the parity
    observations with their states (:func:`observation_states`)."""
    feeds = record_feeds(reference.run, artifact, parity_obs, parity_states, seed=PARITY_SEED)
    graphs = {}
    for name, graph_feeds in feeds.items():
        stats: dict[str, list[dict[str, float]]] = {}
        for f in graph_feeds:
            want, got = reference.run(name, f), candidate.run(name, f)
            for out in want:
                stats.setdefault(out, []).append(compare(want[out], got[out]))
        graphs[name] = {out: worst(s) for out, s in stats.items()}
    actions = worst([compare(chain(reference.run, artifact, o, PARITY_SEED + k, s),
                             chain(candidate.run, artifact, o, PARITY_SEED + k, s))
                     for k, (o, s) in enumerate(zip(parity_obs, parity_states, strict=True))])
    gate = f"cosine >= {gates['int8_action_cosine']}, max-abs <= {gates['int8_action_max_abs']}"
    ok = passes(actions, gates["int8_action_cosine"], gates["int8_action_max_abs"])
    return {"graphs": graphs, "actions": actions, "gate": gate, "passed": bool(ok),
            "reference": "OpenVINO f32 on the fp32 graphs"}


def fastest_cpu_engine(artifact: Artifact, parity: dict[str, Any], obs: Observation, state: np.ndarray | None,
                       threads: int = 0, rounds: int = 10) -> dict[str, Any]:
    """The predict step of every CPU engine/precision of ``artifact`` whose gate passed
    (``parity``'s precisions on ONNX Runtime; OpenVINO on the fp32 graphs in its chosen
    inference precision, gated with the FP16 gate against OpenVINO f32 when that is not
    f32; ``int8_ov``), timed interleaved on ``obs`` (and ``state``, for a state-taking
    policy; median ms of ``rounds``), and the fastest: what the artifact's manifest records
    as ``cpu_default``."""
    from vpp_edge.runtime.engines import create_engine
    from vpp_edge.runtime.engines.openvino import OvEngine

    from vpp_edge.extras import is_available

    passed = [p for p, s in parity["precisions"].items() if s["passed"] and p in artifact.precisions()]
    cpu = [b for b in ("onnxruntime", "openvino") if b == "openvino" or is_available(b)]  # openvino: required here
    candidates = {f"{b}/{p}": (b, p) for b in cpu for p in passed if b in precisions.get(p).engines}
    engines = {label: create_engine(artifact, b, p, threads=threads, **({"cache_dir": ""} if b == "openvino" else {}))
               .load() for label, (b, p) in candidates.items()}
    notes: dict[str, str] = {}
    ov = engines.get("openvino/fp32")
    if isinstance(ov, OvEngine) and ov.inference_precision != "f32":
        reference = OvEngine(artifact, "fp32", threads=threads, inference_precision="f32", cache_dir="").load()
        gate = parity["gates"]["fp16_action_cosine"]
        worst_case = worst([compare(chain(reference.run, artifact, obs, PARITY_SEED, state),
                                    chain(ov.run, artifact, obs, PARITY_SEED, state))])
        notes["openvino/fp32"] = f"{ov.inference_precision}, action cosine {worst_case['cosine']:.6f} (gate {gate})"
        if not passes(worst_case, gate):
            del engines["openvino/fp32"]
    times: dict[str, list[float]] = {label: [] for label in engines}
    for i in range(rounds + 1):  # the first round warms up
        for label, engine in engines.items():
            start = time.perf_counter()
            chain(engine.run, artifact, obs, i, state)
            if i:
                times[label].append((time.perf_counter() - start) * 1e3)
    medians = {label: float(np.median(v)) for label, v in times.items()}
    best = min(medians, key=medians.get)
    backend, precision = candidates[best]
    return {"backend": backend, "precision": precision, "threads": threads, "median_ms": medians, "notes": notes,
            "measured_on": platform.processor() or platform.machine()}


def add_openvino_int8(root: str | Path, preset: str = "transformer", threads: int = 0,
                      options: dict[str, Any] | None = None, rounds: int = 10,
                      roots: list[Path] | None = None) -> dict[str, Any]:
    """Quantise ``root``'s FP32 graphs with NNCF, gate them and add them as ``int8_ov``;
    returns the precision's parity section. Raises :class:`ParityError` on a failed gate.
    Then every CPU engine that passes its gate is timed here (``rounds``; 0: not timed) and
    the fastest recorded in the manifest as ``cpu_default`` (:func:`record_cpu_default`).
    ``roots``: the episodes the export sampled its observations from (its ``--data``)."""
    from vpp_edge.runtime.engines.openvino import OvEngine

    root = Path(root)
    artifact = Artifact.open(root)
    parity = json.loads((root / "parity.json").read_text())
    defaults = yaml.safe_load(Path(__file__).with_name("defaults.yaml").read_text())
    gates, int8 = parity["gates"], (options or defaults)["int8"]
    parity_obs, calib_obs = _same_observations(artifact, parity, roots)
    # A state-taking policy's states: recorded where the episodes have them (the robot's), else seeded.
    parity_states, parity_note = observation_states(artifact, parity_obs, PARITY_SEED, "parity observations")
    calib_states, calib_note = observation_states(artifact, calib_obs, CALIBRATION_SEED, "calibration observations")
    reference = OvEngine(artifact, "fp32", threads=threads, inference_precision="f32", cache_dir="").load()
    feeds = record_feeds(reference.run, artifact, calib_obs, calib_states)
    folder = root / PRECISION
    with tempfile.TemporaryDirectory(prefix="vpp-int8-ov-", dir=root) as tmp:
        out, info = Path(tmp) / PRECISION, {}
        entries = {}
        for name in GRAPH_NAMES:
            src, _, _ = artifact.graph("fp32", name)
            if name in int8["graphs"]:
                dst = out / f"{name}.xml"
                info[name] = quantize_graph(src, dst, feeds[name], preset, int8["exclude_modules"], int8["op_types"])
                entries[f"{PRECISION}/{name}"] = ir_entry(dst, Path(tmp), artifact.manifest["graphs"][f"fp32/{name}"])
            else:
                onnx_io.keep_float(src, out / src.name, "int8")  # a copy of the ONNX graph
                entries[f"{PRECISION}/{name}"] = onnx_io.graph_entry(out / src.name, Path(tmp), PRECISION)
        # Gate on the files where they are: the in-memory manifest points at the temporary folder.
        staged = Artifact(Path(tmp), {**artifact.manifest, "graphs": entries}, artifact.preset, artifact.normalizer,
                          artifact.state_normalizer)
        candidate = OvEngine(staged, PRECISION, threads=threads, cache_dir="").load()
        section = {**evaluate(reference, candidate, artifact, parity_obs, parity_states, gates), "quantization": info,
                   # Which robot states a state-taking policy was calibrated and gated with (absent otherwise).
                   **({"states": {"parity": parity_note, "calibration": calib_note or None}} if parity_note else {})}
        candidate.close()
        if not section["passed"]:
            table = summary_table({"precisions": {PRECISION: section}})
            raise ParityError(f"OpenVINO INT8 (NNCF {preset}) fails the gate:\n{table}")
        if folder.exists():
            shutil.rmtree(folder)
        shutil.move(str(out), folder)
    manifest = read_manifest(root)
    manifest["graphs"] = {k: v for k, v in manifest["graphs"].items() if not k.startswith(f"{PRECISION}/")}
    manifest["graphs"].update(entries)
    parity["precisions"][PRECISION] = section
    (root / "parity.json").write_text(json.dumps(parity, indent=2, default=float))
    write_manifest(root, manifest)
    if rounds:
        log.info("%s", describe_choice(record_cpu_default(root, threads, rounds, roots)))
    return section


def describe_choice(choice: dict[str, Any]) -> str:
    """The one-line report of a ``cpu_default``: the choice and every candidate's median."""
    times = ", ".join(f"{k} {v:.1f}" for k, v in sorted(choice["median_ms"].items(), key=lambda kv: kv[1]))
    return f"fastest CPU engine here that passes its gate: {choice['backend']}/{choice['precision']} (median ms: {times})"


def record_cpu_default(root: str | Path, threads: int = 0, rounds: int = 10,
                       roots: list[Path] | None = None) -> dict[str, Any]:
    """Time every CPU engine/precision of the artifact at ``root`` that passes its gate
    (:func:`fastest_cpu_engine`, on the first parity observation) and record the fastest in its
    manifest as ``cpu_default`` (what ``--backend auto`` runs); :func:`describe_choice` says it."""
    root = Path(root)
    artifact = Artifact.open(root)
    parity = json.loads((root / "parity.json").read_text())
    parity_obs, _ = _same_observations(artifact, parity, roots)
    states, _ = observation_states(artifact, parity_obs[:1], PARITY_SEED, "timing observation")
    choice = fastest_cpu_engine(artifact, parity, parity_obs[0], states[0], threads, rounds)
    manifest = read_manifest(root)
    manifest["cpu_default"] = choice
    write_manifest(root, manifest)
    return choice


def after_export(root: str | Path, requested: list[str], threads: int = 0, options: dict[str, Any] | None = None,
                 roots: list[Path] | None = None) -> list[str]:
    """What ``vpp export`` adds to the artifact it committed when ``int8_ov`` is among the
    ``requested`` precisions (the defaults; not a large model's): with OpenVINO and NNCF
    installed the gated ``int8_ov`` graphs, and with OpenVINO the ``cpu_default`` (the fastest
    gated CPU engine here). Returns the lines to print. Optional extras never fail the export:
    without OpenVINO, or with ``int8_ov`` failing its gate, the artifact is kept as exported
    (``--backend auto`` then runs ONNX Runtime FP32, or the fastest of the rest)."""
    from vpp_edge.extras import is_available

    if PRECISION not in requested:
        return []
    if not is_available("openvino"):
        return [f"{PRECISION} and cpu_default skipped: OpenVINO is not installed (pip install "
                "'vpp-edge[openvino-export]'); --backend auto runs ONNX Runtime FP32"]
    notes = []
    if not is_available("nncf"):
        notes.append(f"{PRECISION} skipped: NNCF is not installed (pip install 'vpp-edge[openvino-export]')")
    else:
        try:
            add_openvino_int8(root, threads=threads, options=options, rounds=0, roots=roots)
            notes.append(f"{PRECISION}: OpenVINO INT8 (NNCF) passes its gate, added to {root}")
        except ParityError as e:
            notes.append(f"{PRECISION} not added: {e}")
    try:
        notes.append(describe_choice(record_cpu_default(root, threads, roots=roots)))
    except ParityError as e:  # the export's observations cannot be sampled again here
        notes.append(f"cpu_default not recorded: {e}")
    return notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--preset", choices=NNCF_PRESETS, default="transformer")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=10,
                    help="interleaved predict steps per CPU engine to find the fastest (0: skip)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    section = add_openvino_int8(args.artifact, args.preset, args.threads, rounds=args.rounds)
    print(summary_table({"precisions": {PRECISION: section}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
