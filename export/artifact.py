"""``vpp export``: checkpoint + preset -> a self-describing artifact folder.

    <artifact>/manifest.json      graphs (and later engines) with hashes and IO specs
    <artifact>/parity.json, .md   every parity figure and gate verdict
    <artifact>/tokenizer.json     the instruction tokenizer (tokenizers library)
    <artifact>/<precision>/        a graph per vpp_edge.graph_spec.GRAPHS (.onnx), derived as export/derive.py says

The graphs come from the graph cache (:mod:`.graph_cache`, ``vpp calibrate``'s too), kept
beside the artifact: exporting the same model with the same options again makes none.

Everything is written into a temporary sibling folder and renamed into place at the
end: a failed gate, a full disk or Ctrl-C leaves no half-written artifact.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm
from vpp_edge.runtime.manifest import read_manifest
from vpp_edge.runtime.predict_step import sample_actions
from vpp_edge.training.models.policy import VPPPolicy

# Noise (and seeded-state) seeds of parity observation k (PARITY_SEED + k) and calibration
# observation k (CALIBRATION_SEED + k): one definition for export, calibrate and int8_ov.
from vpp_edge.state_feeds import CALIBRATION_SEED, PARITY_SEED, state_feeds
from vpp_edge.errors import VPPError
from vpp_edge.files import atomic_dir
from vpp_edge.graph_spec import ACTION_MODE_GRAPHS, ACTION_MODES
from vpp_edge.normalization import seeded_state
from vpp_edge.observations import Observation, observations_digest, recorded_states, sample_observations
from vpp_edge.precisions import FLOAT16, QDQ, TRACED, calibrated, exported
from vpp_edge.precisions import get as precision_spec
from vpp_edge.tokenizer import InstructionTokenizer

from . import onnx_io, parity, tempdirs
from .graph_cache import GraphCache, GraphSet, export_cache
from .graphs import GRAPHS, reference_run
from .manifest import write_artifact_manifest
from .options import load_options
from .parity import ParityError, summary_table
from .phases import Phases, gb, release_freed_memory

log = logging.getLogger(__name__)


def parity_state(policy: VPPPolicy, seed: int) -> torch.Tensor | None:
    """A seeded normalised robot state [1, P] in [-1, 1] for a policy that takes one (where the
    observations record no state of its width: :func:`observation_states`), else None."""
    if not policy.preset.action_head.use_proprio:
        return None
    return torch.from_numpy(seeded_state(policy.preset.action_head.proprio_dim, seed))


def reference(policy: VPPPolicy, tokenizer: InstructionTokenizer, obs: Observation, seed: int,
              state: torch.Tensor | None = None) -> dict:
    """The PyTorch run of one observation with noise from ``seed``; a state-taking policy gets
    ``state`` (normalised [1, P]) or, without one, the seeded :func:`parity_state`."""
    ids, mask = (torch.from_numpy(a) for a in tokenizer([obs.instruction]))
    noise = policy.make_noise(1, seed)
    frames = torch.from_numpy(obs.frames).unsqueeze(0)
    state = state if state is not None else parity_state(policy, seed)
    return reference_run(policy, ids, mask, frames, noise.tvp, noise.action, state)


def observation_states(policy: VPPPolicy, observations: list[Observation], first_seed: int,
                       what: str) -> tuple[list[torch.Tensor | None], str, str]:
    """(the normalised state [1, P] of each observation, or None each for a policy without state
    input; a line saying which states; the set's digest). The states are the episodes' recorded
    ones where they record states of the policy's width, else seeded ones (``first_seed + k``),
    as ``vpp calibrate`` decides (:func:`vpp_edge.state_feeds.state_feeds`, one rule); the
    digest covers the recorded states too, so a calibration record names what the quantizer saw."""
    if not observations:
        return [], "", observations_digest(observations)
    recorded, _ = recorded_states(observations)
    feeds, note = state_feeds(policy.state_normalizer, recorded, [o.source for o in observations], first_seed, what)
    return [None if f is None else torch.from_numpy(f) for f in feeds], note, observations_digest(observations, recorded)


def runner(sessions: dict[str, Any]) -> Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def run(name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = sessions[name]
        outs = sess.run(None, feeds)
        return {o.name: v for o, v in zip(sess.get_outputs(), outs)}

    return run


def _numpy(ref: dict) -> dict[str, np.ndarray]:
    """A reference run's tensors as numpy arrays (shared memory, no copy)."""
    return {k: v.numpy() for k, v in ref.items()}


def _feeds(graph: str, ref: dict) -> dict[str, np.ndarray]:
    return parity.feeds(graph, _numpy(ref))


def _state(ref: dict) -> np.ndarray | None:
    return parity.state(_numpy(ref))


def _time_action_modes(sessions: dict, ref: dict, sigmas: list[float], repeats: int = 5) -> dict[str, float]:
    """Median ms of the action head per mode: unrolled sampler graph vs. step-graph loop."""
    run = runner(sessions)
    tokens, goal, noise = (ref[k].numpy() for k in ("tokens", "goal", "action_noise"))
    timings = {}
    for mode in ACTION_MODES:
        samples = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            sample_actions(run, tokens, goal, noise, sigmas, mode, state=_state(ref))
            samples.append((time.perf_counter() - start) * 1e3)
        timings[mode] = statistics.median(samples[1:])
    return timings


def export_artifact(policy: VPPPolicy, tokenizer: InstructionTokenizer, out: str | Path,
                    options: dict[str, Any] | None = None, observations: list[Observation] | None = None,
                    source: str = "", progress: bool = True, release_policy: bool = False,
                    graph_cache: str | Path | None = None) -> dict[str, Any]:
    """Export, convert, gate and package; returns the manifest. Raises :class:`ParityError`
    (after saving the report next to ``out``, and dropping the failed precisions' graphs
    from the cache) when a gate fails.

    ``release_policy``: free the policy's weights once the FP32 graphs are written (the
    policy is unusable afterwards), so that no later phase holds them beside the graphs'
    (``vpp export`` does; at paper scale they are 6 GB). Temporary folders that an export
    killed by SIGKILL or the kernel left next to ``out`` are removed first (see
    :mod:`.tempdirs`); SIGTERM unwinds like Ctrl-C and leaves nothing but finished graphs in
    the cache. ``graph_cache``: where the graphs are cached (default: beside ``out``,
    :func:`.graph_cache.export_cache`); after a successful export it keeps this artifact's
    graphs only."""
    opts = options or load_options()
    out = Path(out)
    precisions = [p for p in exported() if p in opts["precisions"]]
    n_parity = int(opts["parity_samples"])
    int8 = [p for p in precisions if p in calibrated()]
    n_calib = int(opts["calibration_samples"]) if int8 else 0
    if n_parity < 1:
        raise VPPError("parity_samples must be at least 1")
    if int8 and n_calib < 1:
        raise VPPError("INT8 needs calibration_samples >= 1 (an empty calibration set cannot set scales)")
    policy = policy.eval()
    threads = torch.get_num_threads()
    steps = len(GRAPHS) * len(precisions) + 3  # reference, graphs per precision, action timing, parity
    bar = tqdm(total=steps, desc="export", unit="step", disable=not progress)

    def advance(what: str) -> None:
        bar.set_description(what)
        bar.update(1)

    tempdirs.sweep(out)
    cache = GraphCache(graph_cache or export_cache(out), opts)
    try:
        with tempdirs.terminate_as_interrupt(), atomic_dir(out) as tmp:
            tempdirs.claim(tmp)
            graphs = _export_into(tmp, policy, tokenizer, out, opts, precisions, n_parity, n_calib, observations,
                                  source, threads, bar, advance, release_policy, cache)
            tempdirs.raise_if_interrupted()  # never commit an export a signal ended
            tempdirs.release(tmp)
    finally:
        bar.close()
        cache.tidy()  # an export stopped before its first graph leaves no cache
    cache.prune(graphs)
    return read_manifest(out)


def _export_into(tmp: Path, policy: VPPPolicy, tokenizer: InstructionTokenizer, out: Path, opts: dict[str, Any],
                 precisions: list[str], n_parity: int, n_calib: int, observations: list[Observation] | None,
                 source: str, threads: int, bar: tqdm, advance: Callable[[str], None],
                 release_policy: bool, cache: GraphCache) -> GraphSet:
    preset = policy.preset
    phase = Phases(bar)
    weights = gb(sum(p.numel() * p.element_size() for p in policy.parameters()))
    obs = observations or sample_observations(preset.num_views, preset.image_size, n_parity + n_calib)
    if len(obs) < n_parity + n_calib:
        raise VPPError(f"need {n_parity + n_calib} observations, got {len(obs)}")
    # A state-taking policy's states: recorded where the episodes have them (the robot's), else seeded.
    parity_states, parity_note, _ = observation_states(policy, obs[:n_parity], PARITY_SEED, "parity observations")
    calib_states, calib_note, calib_digest = observation_states(policy, obs[n_parity:], CALIBRATION_SEED,
                                                                "calibration observations")
    phase.start("reference run", holds=f"the PyTorch model ({weights})")
    refs = [reference(policy, tokenizer, o, PARITY_SEED + k, s)
            for k, (o, s) in enumerate(zip(obs[:n_parity], parity_states))]
    calib_refs = [reference(policy, tokenizer, o, CALIBRATION_SEED + k, s)
                  for k, (o, s) in enumerate(zip(obs[n_parity:], calib_states))]
    advance("reference run")
    sigmas = list(policy.action_head.sigmas)
    scale, offset = (torch.stack([policy.action_scale, policy.action_offset]).numpy())

    method = opts["int8"]["calibration"]
    mode_ms: dict[str, float] = {}

    model_held = True  # until after_fp32: a derived graph made then is quantised in PyTorch (modelopt)

    @contextlib.contextmanager
    def stage(key: str) -> Iterator[None]:  # one graph: a phase on the progress bar
        precision = key.split("/")[0]
        holds = _holds(precision, weights) if precision == precisions[0] or not model_held else \
            f"the PyTorch model ({weights}) with modelopt's quantizers, then its Q/DQ graph"
        phase.start(f"export {key}" if precision == precisions[0] else key, holds=holds)
        yield
        advance(f"exported {key}" if precision == precisions[0] else key)

    def after_fp32(graphs: GraphSet) -> None:
        nonlocal model_held
        model_held = False
        if release_policy:  # every later phase works on the graphs
            phase.start("release the PyTorch model")
            _release_weights(policy)
        phase.start("action head timing", holds="sessions of the FP32 action graphs")
        mode_ms.update(_time_action_modes({n: onnx_io.session(graphs.file(f"{precisions[0]}/{n}"), threads)
                                           for n in _ACTION_GRAPHS}, refs[0], sigmas))
        advance(f"action head: {min(mode_ms, key=mode_ms.get)} wins")

    graphs = cache.build(policy, refs[0], precisions, lambda name: [_feeds(name, r) for r in calib_refs], method,
                         stage=stage, after_fp32=after_fp32)
    action_mode = min(mode_ms, key=mode_ms.get)
    entries = graphs.link(tmp)
    paths = {p: {n: tmp / entries[f"{p}/{n}"]["file"] for n in GRAPHS} for p in precisions}
    calibration = graphs.calibration(tmp, opts, opts["int8"], method, [o.source for o in obs[n_parity:]],
                                     calib_digest)  # + scales
    quant_info = {p: {n: graphs.derivation(f"{p}/{n}") for n in GRAPHS} for p in precisions if p in calibrated()}

    report: dict[str, Any] = {
        "preset": preset.name,
        "observations": [o.source for o in obs[:n_parity]],
        "calibration_observations": [o.source for o in obs[n_parity:]],
        # Which robot states a state-taking policy was checked and calibrated with (absent otherwise).
        **({"states": {"parity": parity_note, "calibration": calib_note or None}} if parity_note else {}),
        "action_mode": action_mode,
        "action_mode_ms": mode_ms,
        "gates": opts["gates"],
        "precisions": {},
    }
    release_freed_memory()  # the workers' sessions should not sit beside memory this process no longer uses
    parity_refs = [_numpy(r) for r in refs]
    for precision in precisions:  # a worker process per graph, one at a time: a TVP session holds 9-12 GB
        phase.start(f"parity {precision}", holds=f"a worker process with one {precision} graph's session")
        report["precisions"][precision] = parity.evaluate_precision(
            precision, paths[precision], parity_refs, sigmas, action_mode, scale, offset, opts["gates"], threads)
    for precision, info in quant_info.items():  # the graphs it quantised (not the ones kept in float)
        report["precisions"][precision]["quantization"] = {n: i for n, i in info.items() if not i.get("kept")}
    advance("parity checked")
    phase.finish()
    report["phases"] = phase.records
    bar.close()

    table = summary_table(report)
    failed = [p for p, s in report["precisions"].items() if not s["passed"]]
    (tmp / "parity.json").write_text(_dumps(report))
    notes = "".join(f"\n{note}\n" for note in report.get("states", {}).values() if note)
    (tmp / "parity.md").write_text(f"# Parity: {preset.name}\n\n{table}\n{notes}")
    if failed:
        failed_report = out.parent / f"{out.name}.parity-failed.md"
        shutil.copy2(tmp / "parity.md", failed_report)
        cache.drop(graphs, failed)
        raise ParityError(f"parity gate failed for {', '.join(failed)} (report: {failed_report})\n{table}")

    tokenizer.save(tmp)
    write_artifact_manifest(
        tmp, preset=preset, normalization=policy.normalizer.to_dict(), sigmas=sigmas, action_mode=action_mode,
        graphs=entries,
        source=source, action_mode_ms=mode_ms, parity="parity.json", calibration=calibration,
        # Policies that take the robot state: its bounds, which the runtime normalises and checks with.
        state_normalization=policy.state_normalizer.to_dict() if policy.state_normalizer else None)
    return graphs


# What making a graph holds in memory, by how its precision is derived (the progress bar says it).
_HOLDS = {TRACED: "the PyTorch model ({weights}) and the graph",
          FLOAT16: "the graph; weights stream one tensor at a time",
          QDQ: "the graph with its weights, calibration activations"}


def _holds(precision: str, weights: str) -> str:
    return _HOLDS[precision_spec(precision).derivation].format(weights=weights)


# The graphs that time the action head's two modes.
_ACTION_GRAPHS = tuple(g for graphs in ACTION_MODE_GRAPHS.values() for g in graphs)


def _release_weights(policy: VPPPolicy) -> None:
    """Free every parameter's storage (each becomes an empty tensor): the caller's policy
    object stays, unusable, but its weights no longer count against the export's memory."""
    with torch.no_grad():
        for param in policy.parameters():
            param.data = torch.empty(0, dtype=param.dtype)
    release_freed_memory()


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
