"""Training data: readers (official, LeRobot v2/v3, CALVIN), bad-data policy, mixture,
statistics, configs and the learning-rate schedule. No model is built here."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from vpp_edge.errors import DataError
from vpp_edge.normalization import ActionNormalizer
from vpp_edge.training.data import (BadDataReport, MixtureSampler, PolicyDataset, episode_refs, fit_statistics,
                                    load_sources, source_from_dict, split_episodes)
from vpp_edge.training.data.calvin import load_object_npy
from vpp_edge.training.data.datasets import clip_frame_ids
from vpp_edge.training.train.common import lr_scale
from vpp_edge.training.train.config import ConfigError, OptimConfig, available_configs, load_config
from vpp_edge.tokenizer import byte_level_tokenizer

from .test_training_fakedata import (frame_value, make_actions, write_calvin, write_lerobot_v2, write_lerobot_v3,
                                     write_official)


def _red(frames: np.ndarray) -> np.ndarray:
    return frames[..., 0].reshape(len(frames), -1).mean(1)


# ---- readers ---------------------------------------------------------------------------
def test_official_reader_reads_frames_actions_and_views(tmp_path):
    write_official(tmp_path, episodes=2, steps=10)
    eps = load_sources([source_from_dict({"format": "official", "path": str(tmp_path), "views": [1, 0]})],
                       num_views=2, action_dim=7, progress=False)
    assert [e.num_frames for e in eps] == [10, 10]
    ep = eps[1].episode
    np.testing.assert_allclose(ep.actions, make_actions(1, 10), atol=1e-6)
    assert ep.instruction == "push block 1"
    view0 = ep.frames.read(0)  # the annotation's second video (views: [1, 0])
    assert abs(view0[..., 1].mean() - 140) < 8
    np.testing.assert_allclose(_red(view0), [frame_value(1, t) for t in range(10)], atol=6)


def test_official_reader_on_the_shared_samples(samples_dir):
    eps = load_sources([source_from_dict({"format": "official", "path": str(samples_dir / "rt1"), "views": [0, 0]})],
                       num_views=2, action_dim=7, progress=False)
    assert len(eps) == 4
    for e in eps:  # RT-1: one action fewer than frames (the last frame has none)
        assert e.num_steps == e.num_frames - 1


@pytest.mark.parametrize("writer, version", [(write_lerobot_v2, "v2.1"), (write_lerobot_v3, "v3.0")])
def test_lerobot_reader(tmp_path, writer, version):
    root = writer(tmp_path / "ds", lengths=(8, 11))
    assert json.loads((root / "meta" / "info.json").read_text())["codebase_version"] == version
    refs = episode_refs(source_from_dict({"format": "lerobot", "path": str(root)}))
    assert len(refs) == 2
    ep = refs[1].load()
    assert ep.instruction == "close the drawer"
    np.testing.assert_allclose(ep.actions, make_actions(1, 11), atol=1e-6)
    np.testing.assert_allclose(ep.states, make_actions(11, 11, 3), atol=1e-6)
    assert ep.frames.num_views == 2 and ep.frames.count(0) == 11
    frames = ep.frames.read(1)
    assert frames.shape == (11, 32, 32, 3)
    # The right segment of the shared v3 video: the second episode's own colours.
    np.testing.assert_allclose(_red(frames), [frame_value(1, t) for t in range(11)], atol=6)
    assert abs(frames[..., 1].mean() - 140) < 8  # wrist camera


def test_lerobot_camera_selection_and_unknown_camera(tmp_path):
    root = write_lerobot_v2(tmp_path / "ds", lengths=(6,))
    ep = episode_refs(source_from_dict({"format": "lerobot", "path": str(root),
                                        "views": ["observation.images.wrist"]}))[0].load()
    assert ep.frames.num_views == 1 and abs(ep.frames.read(0)[..., 1].mean() - 140) < 8
    with pytest.raises(DataError, match="camera 'observation.images.side' not found"):
        episode_refs(source_from_dict({"format": "lerobot", "path": str(root), "views": ["observation.images.side"]}))


def test_calvin_reader(tmp_path):
    root = write_calvin(tmp_path / "training")
    refs = episode_refs(source_from_dict({"format": "calvin", "path": str(tmp_path), "split": "training"}))
    assert [r.load().instruction for r in refs] == ["open the drawer", "push the button"]
    ep = refs[1].load()  # frames 4..11
    np.testing.assert_allclose(ep.actions, make_actions(0, 12)[4:12], atol=1e-6)
    np.testing.assert_allclose(ep.states[:, 0], np.arange(4, 12))
    assert ep.frames.count(0) == 8
    static, gripper = ep.frames.read(0), ep.frames.read(1)
    assert static.shape == (8, 20, 20, 3) and gripper.shape == (8, 8, 8, 3)
    np.testing.assert_array_equal(static[:, 0, 0, 0], [frame_value(0, t) for t in range(4, 12)])
    os.remove(root / "episode_0000007.npz")
    with pytest.raises(DataError, match="episode_0000007.npz"):
        refs[1].load()


def test_calvin_annotations_refuse_code_in_pickles(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    path = tmp_path / "auto_lang_ann.npy"
    np.save(path, np.array({"x": Payload()}, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="refusing to load"):
        load_object_npy(path)
    np.save(path, {"language": {"ann": ["a"]}, "info": {"indx": [(0, 1)]}}, allow_pickle=True)
    assert load_object_npy(path)["info"]["indx"] == [(0, 1)]
    assert pickle  # the stdlib unpickler is only used through the restricted subclass


# ---- bad data --------------------------------------------------------------------------
def _broken_dataset(root):
    paths = write_official(root, episodes=4, steps=8)
    os.remove(root / "videos" / "val" / "1" / "0.mp4")  # missing video
    ann = json.loads(paths[2].read_text())
    ann["actions"] = ann["actions"][:5]  # mismatched lengths
    paths[2].write_text(json.dumps(ann))
    ann = json.loads(paths[3].read_text())
    ann["actions"][3][2] = float("nan")  # NaN in actions
    paths[3].write_text(json.dumps(ann))
    return paths


def test_bad_data_skip_reports_each_file(tmp_path):
    paths = _broken_dataset(tmp_path)
    report = BadDataReport()
    eps = load_sources([source_from_dict({"format": "official", "path": str(tmp_path)})], 2, 7, "skip", report,
                       progress=False)
    assert [e.episode.name for e in eps] == [str(paths[0])]
    by_file = {s["file"]: s["error"] for s in report.skipped}
    assert set(by_file) == {str(p) for p in paths[1:]}
    assert "not found" in by_file[str(paths[1])]
    assert "5 action rows for 8 video frames" in by_file[str(paths[2])]
    assert "NaN" in by_file[str(paths[3])]


@pytest.mark.parametrize("broken, message", [(1, "not found"), (2, "action rows"), (3, "NaN")])
def test_bad_data_fatal_names_the_file(tmp_path, broken, message):
    paths = _broken_dataset(tmp_path)
    for i in {1, 2, 3} - {broken}:  # leave only one problem in the dataset
        paths[i].unlink()
    with pytest.raises(DataError, match=message) as err:
        load_sources([source_from_dict({"format": "official", "path": str(tmp_path)})], 2, 7, "fatal",
                     progress=False)
    assert str(paths[broken]) in str(err.value)


def test_wrong_action_dim_and_too_few_views(tmp_path):
    write_official(tmp_path, episodes=1, steps=6, dim=4, views=1)
    src = [source_from_dict({"format": "official", "path": str(tmp_path)})]
    with pytest.raises(DataError, match="actions have 4 dims, the model's action_dim is 7"):
        load_sources(src, 1, 7, "fatal", progress=False)
    with pytest.raises(DataError, match="1 camera view"):
        load_sources(src, 2, 4, "fatal", progress=False)
    with pytest.raises(DataError, match="no usable episode"):
        load_sources(src, 2, 4, "skip", progress=False)


# ---- mixture, datasets, statistics -----------------------------------------------------
def test_mixture_follows_the_ratios_and_resumes_exactly():
    sampler = MixtureSampler([10, 1000, 50], [0.2, 0.5, 0.3], num_samples=20000, seed=3)
    idx = np.array(list(sampler))
    share = [np.mean(idx < 10), np.mean((idx >= 10) & (idx < 1010)), np.mean(idx >= 1010)]
    np.testing.assert_allclose(share, [0.2, 0.5, 0.3], atol=0.015)
    assert idx.max() < 1060 and len(np.unique(idx[idx < 10])) == 10
    tail = list(MixtureSampler([10, 1000, 50], [0.2, 0.5, 0.3], num_samples=5000, seed=3, offset=15000))
    assert tail == idx[15000:].tolist()
    other = list(MixtureSampler([10, 1000, 50], [0.2, 0.5, 0.3], num_samples=100, seed=4))
    assert other != idx[:100].tolist()


def test_policy_dataset_chunks_and_statistics(tmp_path):
    write_official(tmp_path, episodes=3, steps=10)
    eps = load_sources([source_from_dict({"format": "official", "path": str(tmp_path)})], 2, 7, progress=False)
    train, val = split_episodes(eps, 0.3)
    assert len(train) == 2 and len(val) == 1
    stats = fit_statistics(train, "bounds", quantile=0.0)
    norm = ActionNormalizer.from_dict(stats["actions"])
    raw = np.concatenate([make_actions(0, 10), make_actions(1, 10)])
    np.testing.assert_allclose(norm.low, raw.min(0), atol=1e-5)
    np.testing.assert_allclose(norm.high, raw.max(0), atol=1e-5)
    ds = PolicyDataset(train, num_views=2, image_size=64, horizon=4, normalizer=norm,
                       tokenizer=byte_level_tokenizer(20), sample_stride=2, action_stride=3)
    assert len(ds) == 10 and ds.source_sizes == [10]
    item = ds[4]  # episode 0, step 8: actions 8, 9 (clamped), 9, 9
    assert item["frames"].shape == (2, 64, 64, 3)
    expected = norm.normalize(make_actions(0, 10)[[8, 9, 9, 9]])
    np.testing.assert_allclose(item["actions"].numpy(), expected, atol=1e-5)
    assert float(item["actions"].abs().max()) <= 1.0 + 1e-5


def test_clip_frame_ids():
    assert clip_frame_ids(10, 4, 2, 4, "stride") == [[0, 2, 4, 6], [4, 6, 8, 9], [8, 9, 9, 9]]
    assert clip_frame_ids(10, 4, 2, 4, "linspace") == [[0, 3, 6, 9]]


# ---- configs and schedule --------------------------------------------------------------
def test_configs_load_and_reject_unknown_keys(tmp_path):
    cfg = load_config("policy_tiny", ["optim.lr=0.001", "steps=7", "data.sample_stride=3"])
    assert (cfg.stage, cfg.steps, cfg.optim.lr, cfg.data.sample_stride) == ("policy", 7, 0.001, 3)
    assert cfg.resolve_preset().action_dim == 19
    for name in available_configs():  # every shipped config parses, and its preset resolves
        assert load_config(name).resolve_preset().num_views >= 1
    assert load_config("tvp_tiny").stage == "tvp"
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_config("policy_tiny", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="stage 'tvp' config"):
        load_config("tvp_tiny", stage="policy")
    with pytest.raises(ConfigError, match="did you mean 'policy_tiny'"):
        load_config("policy_tine")


def test_lr_schedule_warmup_then_cosine():
    opt = OptimConfig(lr=1.0, warmup_steps=10, warmup_start_scale=0.1, min_lr_scale=0.01)
    assert lr_scale(0, 110, opt) == pytest.approx(0.1)
    assert lr_scale(5, 110, opt) == pytest.approx(0.55)
    assert lr_scale(10, 110, opt) == pytest.approx(1.0)
    assert lr_scale(60, 110, opt) == pytest.approx(0.505)
    assert lr_scale(110, 110, opt) == pytest.approx(0.01)
