"""Shared fixtures: tiny models built here (no downloads) and the optional sample data."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Collection, Iterator

import numpy as np
import pytest

from vpp_edge.episodes import find_samples_dir
from vpp_edge.presets import get_preset

try:
    import torch

    torch.set_num_threads(2)
except ImportError:  # the robot-side tests under Python 3.10 (make test-robot) run without torch
    torch = None


@pytest.fixture(autouse=True)
def _scheduling_policy_unchanged():
    """A test that leaves pytest's main thread real-time (SCHED_FIFO) starves every later
    test's threads on a 2-core machine: fail the test that did it, and put it back."""
    before = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
    yield
    after = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
    if after != before:
        os.sched_setscheduler(0, before[0], os.sched_param(before[1]))
        pytest.fail(f"the test left the main thread's scheduling policy at {after}, was {before}")


@pytest.fixture(scope="session")
def tiny_preset():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_policy(tiny_preset):
    """A seeded random tiny policy and its tokenizer (treat as read-only)."""
    from vpp_edge.training.models import build_policy

    return build_policy(tiny_preset, seed=0)


@pytest.fixture(scope="session")
def exported(request, tmp_path_factory):
    """The tiny policy exported once (FP32/FP16/INT8) for every test that needs an artifact.
    Without torch (the robot-side tests under Python 3.10): the artifact that
    `make test-robot` exported with the workstation's Python (VPP_TEST_ARTIFACT, FP32)."""
    if torch is None:
        from vpp_edge.runtime.manifest import read_manifest

        prebuilt = os.environ.get("VPP_TEST_ARTIFACT")
        if not prebuilt:
            pytest.skip("no torch here to export the test artifact: set VPP_TEST_ARTIFACT (make test-robot does)")
        return Path(prebuilt), read_manifest(prebuilt)
    from vpp_edge.export.options import load_options

    policy, tok = request.getfixturevalue("tiny_policy")
    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    options = load_options(parity_samples=1, calibration_samples=2)
    return out, export_pooled(policy, tok, out, options)


# The session's exported graphs, pooled: the graph cache keys a graph on what it computes
# (export/graph_cache.py), and the tiny variants (xArm + XHand actions, a state-taking or
# state-relative head, ...) share the tiny policy's TVP, text encoder and Former, so those
# are exported once a session instead of once a variant (the TVP's export is most of an
# FP32 export's time). Each export still writes its own artifact from its own cache and
# gates it against its own PyTorch policy. A list, filled by the session fixture below, so
# that export_fp32 (a plain function other test modules import) finds it.
_GRAPH_POOL: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _graph_pool(tmp_path_factory):
    _GRAPH_POOL[:] = [tmp_path_factory.mktemp("graph-pool")]
    yield
    _GRAPH_POOL.clear()


def _link_missing(src: Path, dst: Path, skip: Collection[str] = ()) -> None:
    """Hard-link every file under ``src`` that ``dst`` lacks into ``dst`` (same layout), except
    anything hidden (a temporary folder) and the entries ``<precision>/<graph>-<key>/`` of the
    graphs named in ``skip``. Cache entries are written whole and never changed in place (an
    export replaces or removes them, and one whose files changed is made again), so linking
    them is as good as copying."""
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if len(rel.parts) > 2 and rel.parts[1].rsplit("-", 1)[0] in skip:
            continue
        target = dst / rel
        if f.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)


def seed_from_pool(cache: Path, skip: Collection[str] = ()) -> Path:
    """``cache`` (a graph cache folder: an export's, ``export_cache(out)``, or `vpp calibrate`'s,
    ``<out>/cache/graphs``) holding the graphs the session exported so far, as links, but
    those named in ``skip``; returns ``cache``. For a test about what is built from the
    graphs, not about exporting them (tests/test_export*.py are)."""
    if _GRAPH_POOL:
        _link_missing(_GRAPH_POOL[0], cache, skip)
    return cache


@contextlib.contextmanager
def pooled(cache: Path, skip: Collection[str] = ()) -> Iterator[Path]:
    """``cache`` seeded from the session's pool (:func:`seed_from_pool`: the graphs in ``skip``
    are not taken, so they are exported fresh); when the block ends without an exception,
    what the cache holds then is added to the pool (``skip``'s graphs excepted)."""
    seed_from_pool(cache, skip)
    yield cache
    if _GRAPH_POOL and cache.is_dir():
        _link_missing(cache, _GRAPH_POOL[0], skip)


def export_pooled(policy, tokenizer, out: Path, options: dict) -> dict:
    """export_artifact into ``out`` with its graph cache (beside it) :func:`pooled`; returns
    the manifest."""
    from vpp_edge.export.artifact import export_artifact
    from vpp_edge.export.graph_cache import export_cache

    with pooled(export_cache(out)):
        return export_artifact(policy, tokenizer, out, options, source="test", progress=False)


@pytest.fixture(scope="session")
def exported_xhand(tiny_preset, tmp_path_factory):
    """The tiny architecture with the xArm + XHand action space (18), FP32 only, its action
    normaliser spanning the robot config's action bounds."""
    from vpp_edge.normalization import ActionNormalizer
    from vpp_edge.runtime.robot_config import load_robot_config
    from vpp_edge.training.models import build_policy

    robot = load_robot_config("xarm_xhand")
    preset = dataclasses.replace(tiny_preset, name="tiny_xhand", action_dim=robot.action_dim)
    norm = ActionNormalizer(mode="bounds", low=tuple(robot.action_low), high=tuple(robot.action_high))
    return export_fp32(build_policy(preset, seed=0, normalizer=norm), tmp_path_factory.mktemp("artifacts") / "tiny_xhand")


def export_fp32(policy_and_tokenizer, out: Path) -> Path:
    """``out``: the policy exported in FP32 only, gated on one observation (the quickest
    artifact; graphs the session exported already are reused: :func:`export_pooled`);
    returns ``out``."""
    from vpp_edge.export.options import load_options

    policy, tok = policy_and_tokenizer
    export_pooled(policy, tok, out, load_options(precisions=["fp32"], parity_samples=1))
    return out


def closed_loop(artifact_dir: Path, robot: str, bridge, episode: Path, ctx, tmp_path: Path, *,
                engine_cls=None, duration_s: float = 3.0, loop_camera: bool = True, fps: float = 20.0,
                smoothing: str = "crossfade", control_hz: float | None = None):
    """The runtime as `vpp run` builds it (replay cameras, ONNX Runtime FP32, the robot's
    config, a BridgeLink over real sockets) pointed at ``bridge``: (Runtime, Metrics, BridgeLink).
    ``control_hz`` overrides the robot config's control rate."""
    from vpp_edge.episodes import load_episode
    from vpp_edge.runtime.artifact import Artifact
    from vpp_edge.runtime.cameras import ReplayCameras
    from vpp_edge.runtime.engines.onnxruntime import OrtEngine
    from vpp_edge.runtime.build import build_runtime
    from vpp_edge.runtime.config import RuntimeConfig, SmoothingConfig
    from vpp_edge.runtime.link import BridgeLink
    from vpp_edge.runtime.metrics import Metrics
    from vpp_edge.runtime.policy import RuntimePolicy
    from vpp_edge.runtime.robot_config import load_robot_config

    ends = bridge.bound()
    link = BridgeLink(ends.action, ends.state, ends.events, ends.command, context=ctx)
    artifact = Artifact.open(artifact_dir)
    engine = (engine_cls or OrtEngine)(artifact, "fp32").load()
    policy = RuntimePolicy(artifact, engine, seed=0)
    cams = [ReplayCameras(load_episode(episode), artifact.preset.num_views, artifact.preset.image_size,
                          fps=fps, loop=loop_camera)]
    metrics = Metrics(tmp_path / "run.jsonl")
    robot_cfg = load_robot_config(robot)
    if control_hz is not None:
        robot_cfg = dataclasses.replace(robot_cfg, control_hz=control_hz)
    config = RuntimeConfig(artifact_dir, "onnxruntime", "fp32", robot=str(robot), duration_s=duration_s,
                           instruction="push the red block to the green target", smoothing=SmoothingConfig(smoothing))
    built = build_runtime(config, policy=policy, cameras=cams, link=link, metrics=metrics, robot=robot_cfg)
    return built.runtime, metrics, link


def drive(bridge, artifact_dir: Path, robot: str, episode: Path, ctx, tmp_path: Path, min_accepted: int,
          **options) -> dict:
    """Run the runtime against a robot bridge for 3 s and check the link: chunks planned, at
    least ``min_accepted`` targets taken, none refused except for leaving the workspace (the
    runtime cannot know it: that is the bridge's to refuse). ``options`` go to closed_loop.
    Returns the runtime's summary."""
    runtime, metrics, link = closed_loop(artifact_dir, robot, bridge, episode, ctx, tmp_path, **options)
    try:
        summary = runtime.run()
    finally:
        metrics.close()
        link.close()
    assert summary["counts"]["chunks"] >= 3 and bridge.counts["accepted"] >= min_accepted, \
        f"runtime {sorted(summary['counts'].items())}, bridge {sorted(bridge.counts.items())}"
    refused = {k for k, n in bridge.counts.items() if k.startswith("rejected_") and n}
    # Targets travel as absolute waypoints stamped on the bridge's clock, checked per waypoint
    # interval: a plan dropped by the latest-only link no longer makes the next one a step too
    # large, so no refusal but the workspace clamp is expected of a healthy closed loop.
    assert bridge.mode != "estop" and refused <= {"rejected_out_of_limits"}, dict(bridge.counts)
    return summary


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """``shared/vpp_samples`` (real robot episodes); tests using it skip when it is absent."""
    path = find_samples_dir()
    if path is None:
        pytest.skip("shared/vpp_samples not found beside the repository (set VPP_SAMPLES to point at it)")
    return path


@pytest.fixture(scope="session")
def demo_episode(tmp_path_factory) -> Path:
    """Annotation path of the synthetic two-camera episode (always available)."""
    from vpp_edge.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


def random_frames(preset, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Model-ready frames [B, V, 3, S, S] in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, preset.num_views, 3, preset.image_size, preset.image_size, generator=gen) * 2 - 1


def tokens(tokenizer, text: str = "pick up the red block"):
    ids, mask = tokenizer([text])
    return torch.from_numpy(ids), torch.from_numpy(mask)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
