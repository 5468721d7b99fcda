"""Training loops: stage 2 (policy) and stage 1 (TVP) on tiny models, resume, bad data,
a 2-process accelerate run against one process, and the trained checkpoint through
``vpp export`` and ``vpp predict``."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vpp_edge.errors import DataError, VPPError
from vpp_edge.normalization import ActionNormalizer
from vpp_edge.training.checkpoints import load_checkpoint, load_official
from vpp_edge.training.models import build_policy
from vpp_edge.training.predict import TorchPredictor
from vpp_edge.training.train import train_policy, train_tvp
from vpp_edge.training.train.config import config_from_dict, save_config
from vpp_edge.training.train.state import LAST, STATE_DIR, checkpoint_dir

from .test_training_fakedata import make_frames, write_official


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Four good episodes (16 steps, two 32 px cameras, 7-dim actions) and one with NaN actions."""
    root = tmp_path_factory.mktemp("episodes")
    paths = write_official(root, episodes=5, steps=16)
    ann = json.loads(paths[2].read_text())
    ann["actions"][5][0] = float("nan")
    paths[2].write_text(json.dumps(ann))
    return root


def _merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in changes.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def policy_config(root: Path, **changes):
    # One thread: these tiny models are overhead-bound, and a second thread only waits on busy cores.
    base = {"stage": "policy", "preset": "tiny", "preset_overrides": {"image_size": 64}, "seed": 0, "steps": 100,
            "batch_size": 8, "log_every": 20, "val_every": 50, "checkpoint_every": 50, "threads": 1,
            "data": {"sources": [{"format": "official", "path": str(root)}], "val_fraction": 0.25},
            "optim": {"lr": 1e-3, "warmup_steps": 5}, "policy": {"val_samples": 8}}
    return config_from_dict(_merge(base, changes))


def _metrics(run: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for line in (run / "metrics.csv").read_text().splitlines()[1:]:
        _, name, value = line.split(",")
        out.setdefault(name, []).append(float(value))
    return out


def test_policy_training_loss_falls_and_checkpoint_loads(dataset, tmp_path):
    run = tmp_path / "run"
    summary = train_policy(policy_config(dataset), run, progress=False)
    # The episode with NaN actions was skipped and reported with its file.
    assert [s["file"] for s in summary["skipped_episodes"]] == [str(dataset / "annotation" / "val" / "2.json")]
    assert summary["loss_last"] < 0.75 * summary["loss_first"], summary
    metrics = _metrics(run)
    # Validation before training and every 50 steps (three episodes do not generalise to a fourth:
    # the held-out error is reported, not asserted to fall).
    assert len(metrics["train/loss"]) == 5 and len(metrics["val/action_mse"]) == 3
    assert np.isfinite(metrics["val/action_mae"]).all()
    assert (run / "metrics.png").is_file() and any((run / "tensorboard").iterdir())

    policy, tokenizer = load_checkpoint(run / LAST)
    stats = json.loads((run / "normalization.json").read_text())
    assert policy.normalizer == ActionNormalizer.from_dict(stats["actions"])
    assert policy.normalizer.mode == "bounds" and policy.preset.image_size == 64
    # Saved weights are the EMA; the raw weights live in training_state/ and differ from both it and init.
    ema = load_file(str(run / LAST / "model.safetensors"))
    raw = load_file(str(run / LAST / STATE_DIR / "weights.safetensors"))
    init = build_policy(policy.preset, seed=0)[0].state_dict()
    key = "action_head.inner_model.action_pred.weight"
    assert not torch.equal(ema[key], raw[key]) and not torch.equal(raw[key], init[key])
    assert torch.equal(ema["tvp.unet.conv_in.weight"], init["tvp.unet.conv_in.weight"])  # the TVP stays frozen
    frames = np.stack([make_frames(0, 1, 64, v)[0] for v in range(2)])
    actions = TorchPredictor(policy, tokenizer).predict(frames, "push block 0").actions
    assert actions.shape == (10, 7) and np.isfinite(actions).all()


def test_policy_resume_continues_exactly(dataset, tmp_path):
    cfg = policy_config(dataset, steps=6, checkpoint_every=3, keep_checkpoints=2, val_every=100, log_every=1)
    straight = tmp_path / "straight"
    train_policy(cfg, straight, progress=False)
    with pytest.raises(VPPError, match="--resume"):
        train_policy(cfg, straight, progress=False)
    # An interrupted run: only the step-3 checkpoint made it to disk.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, symlinks=True)
    shutil.rmtree(checkpoint_dir(resumed, 6))
    (resumed / LAST).unlink()
    os.symlink(os.path.relpath(checkpoint_dir(resumed, 3), resumed), resumed / LAST)
    summary = train_policy(cfg, resumed, resume=True, progress=False)
    assert summary["start_step"] == 3 and summary["steps"] == 6
    for name in (f"{STATE_DIR}/weights.safetensors", f"{STATE_DIR}/ema.safetensors", "model.safetensors"):
        a, b = load_file(str(checkpoint_dir(straight, 6) / name)), load_file(str(checkpoint_dir(resumed, 6) / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7, msg=f"{name}: {k}")
    state = json.loads((checkpoint_dir(resumed, 6) / STATE_DIR / "state.json").read_text())
    assert state["step"] == 6 and state["optimizer"]["state"]


def test_feature_cache_is_keyed_by_what_the_features_depend_on(dataset, tmp_path):
    """Another chunk length or action head trains on the cached TVP features; another TVP
    computes its own (the cache's folder name hashes the TVP-side preset, weights and samples)."""
    def run(name: str, seed_cache: Path | None = None, **overrides) -> set[str]:
        out = tmp_path / name
        if seed_cache is not None:
            shutil.copytree(seed_cache, out / "cache")
        cfg = policy_config(dataset, steps=2, val_every=100, checkpoint_every=100, log_every=1,
                            preset_overrides={"image_size": 64, **overrides})
        train_policy(cfg, out, progress=False)
        return {p.name for p in (out / "cache").iterdir()}

    built = run("first")
    assert len(built) == 2, "a train and a val cache"
    assert run("head", tmp_path / "first" / "cache", action_horizon=4, action_head={"n_dec_layers": 1}) == built
    assert run("tvp", tmp_path / "first" / "cache", tvp={"timesteps": 7}) > built


def test_policy_bad_data_fatal(dataset, tmp_path):
    cfg = policy_config(dataset, steps=2, data={"bad_data": "fatal"})
    with pytest.raises(DataError, match="2.json.*NaN"):
        train_policy(cfg, tmp_path / "run", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_accelerate_run_matches_one_process(dataset, tmp_path):
    """Same seed, same global batch: `accelerate launch` with 2 CPU processes (gloo DDP,
    TVP features computed on the fly) trains the same weights as one process."""
    no_dropout = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "mlp_pdrop": 0.0}
    cfg = policy_config(dataset, steps=4, batch_size=4, checkpoint_every=4, val_every=100, log_every=1,
                        preset_overrides={"action_head": no_dropout}, data={"val_fraction": 0.0},
                        ema={"enabled": False}, policy={"feature_cache": False}, optim={"warmup_steps": 0})
    config_file = tmp_path / "cfg.yaml"
    save_config(cfg, config_file)
    one = train_policy(cfg, tmp_path / "one", progress=False)
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "vpp_edge.cli", "train", "policy", "--config", str(config_file), "--out", str(tmp_path / "two"),
           "--quiet", "--json", str(tmp_path / "two.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["loss_first"] == pytest.approx(one["loss_first"], rel=1e-4)

    init = build_policy(cfg.resolve_preset(), seed=0)[0].state_dict()
    w1 = load_file(str(tmp_path / "one" / LAST / STATE_DIR / "weights.safetensors"))
    w2 = load_file(str(tmp_path / "two" / LAST / STATE_DIR / "weights.safetensors"))
    keys = [k for k in w1 if not torch.equal(w1[k], init[k])]
    assert len(keys) > 20  # the Former and the action head trained
    d1 = torch.cat([(w1[k] - init[k]).flatten() for k in keys])
    d2 = torch.cat([(w2[k] - init[k]).flatten() for k in keys])
    assert float((d2 - d1).norm() / d1.norm()) < 1e-3  # measured ~1e-5: float summation order only


def tvp_config(root: Path, **changes):
    base = {"stage": "tvp", "preset": "tiny", "preset_overrides": {"image_size": 64}, "seed": 0, "steps": 40,
            "batch_size": 4, "log_every": 10, "val_every": 40, "checkpoint_every": 40, "threads": 1,
            "data": {"sources": [{"format": "official", "path": str(root)}], "val_fraction": 0.25,
                     "clip_stride": 2, "clip_start_stride": 4},
            "optim": {"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "warmup_steps": 5},
            "tvp": {"latent_cache": True, "sample_count": 2, "sample_steps": 4}}
    return config_from_dict(_merge(base, changes))


@pytest.mark.slow
def test_tvp_training_loss_falls_and_writes_a_loadable_video_model(dataset, tmp_path):
    run = tmp_path / "tvp"
    cfg = tvp_config(dataset)
    summary = train_tvp(cfg, run, progress=False)
    # Held-out clips, the same noise at every evaluation: before training vs after.
    assert summary["val/loss"] < 0.7 * summary["val/loss@0"], summary
    gif = run / "samples" / "step-0000040.gif"
    from PIL import Image

    with Image.open(gif) as im:  # two clips side by side, truth above prediction
        assert im.n_frames == 4 and im.size == (2 * 64, 2 * 64)
    preset = cfg.resolve_preset()
    policy, _ = load_official(preset, run / LAST, run / LAST / "clip", None)
    init = build_policy(preset, seed=0)[0]
    assert not torch.equal(policy.tvp.unet.conv_in.weight, init.tvp.unet.conv_in.weight)
    torch.testing.assert_close(policy.tvp.vae.encoder.conv_in.weight, init.tvp.vae.encoder.conv_in.weight)
    # Stage 2 starts from the stage-1 output.
    s2 = train_policy(policy_config(dataset, steps=2, val_every=100, init={"tvp": str(run / LAST)}),
                      tmp_path / "policy", progress=False)
    assert "video model" in s2["init"]


@pytest.mark.slow
def test_tiny_policy_on_the_samples_goes_through_export_and_predict(samples_dir, tmp_path):
    """The acceptance path: the shipped tiny config on the XHand samples, then the CLI."""
    from vpp_edge.cli import main
    from vpp_edge.export.graph_cache import export_cache
    from vpp_edge.training.train import load_config

    from .conftest import seed_from_pool

    cfg = load_config("policy_tiny", ["steps=80", "data.sample_stride=16", "policy.val_samples=8",
                                      "val_every=40", "checkpoint_every=40", "threads=1"])
    run = tmp_path / "run"
    summary = train_policy(cfg, run, progress=False)
    assert summary["loss_last"] < 0.8 * summary["loss_first"], summary
    art = tmp_path / "artifact"
    # Stage 2 keeps the TVP and the text encoder frozen at the tiny policy's: their graphs, which
    # the session exported already, are linked into this export's cache (the parity gate still
    # checks every graph against the trained policy; exporting graphs: tests/test_export*.py).
    seed_from_pool(export_cache(art))
    assert main(["export", "--checkpoint", str(run / LAST), "--out", str(art), "--precisions", "fp32",
                 "--parity-samples", "1", "--quiet"]) == 0
    assert (art / "manifest.json").is_file()
    out = tmp_path / "predict.json"
    assert main(["predict", "--checkpoint", str(run / LAST), "--repeat", "1", "--json", str(out)]) == 0
    actions = np.array(json.loads(out.read_text())["actions"])
    assert actions.shape == (10, 19) and np.isfinite(actions).all()
