"""Episodes, video decoding, frame preprocessing, tokenizer and action statistics."""

import json

import numpy as np
import pytest

from vpp_edge.demo_data import INSTRUCTION
from vpp_edge.episodes import decode_video, list_episodes, load_episode
from vpp_edge.errors import CheckpointError, DataError
from vpp_edge.normalization import ActionNormalizer
from vpp_edge.preprocess import center_crop_square, prepare_frame, to_model_input
from vpp_edge.tokenizer import byte_level_tokenizer, load_tokenizer


def test_real_sample_episodes(samples_dir):
    xhand = load_episode(list_episodes(samples_dir / "xhand")[0])
    assert xhand.num_views == 3, "two annotated views plus the third camera in the folder"
    assert xhand.instruction == "Move the mango to the basket."
    frames = xhand.frames(0)
    assert frames.shape == (136, 256, 256, 3) and frames.dtype == np.uint8
    assert xhand.states.shape == (136, 19) and xhand.actions.shape == (136, 19)
    assert xhand.fps() == pytest.approx(10.0)
    bridge = load_episode(list_episodes(samples_dir / "bridge")[0])
    assert bridge.num_views == 1 and bridge.frames(0, [0, -1]).shape == (2, 480, 640, 3)
    assert bridge.states.shape[1] == 7 and len(bridge.actions) == len(bridge.states) - 1
    # views of one time step differ (they are different cameras)
    assert not np.array_equal(xhand.frames(0, [0]), xhand.frames(1, [0]))


def test_listing_is_in_numeric_order(samples_dir):
    assert [p.stem for p in list_episodes(samples_dir / "bridge")] == ["2", "8", "10", "14"]


def test_synthetic_episode_round_trip(demo_episode):
    ep = load_episode(demo_episode)
    assert ep.instruction == INSTRUCTION and ep.num_views == 2
    video = ep.frames(0)
    assert video.shape == (20, 256, 256, 3)
    # The red block moves right: its mean column grows over the episode.
    red = [(np.argwhere((f[..., 0] > 150) & (f[..., 1] < 90))[:, 1]).mean() for f in video[[0, -1]]]
    assert red[1] > red[0] + 50


def test_bad_episodes_name_the_file(tmp_path, demo_episode):
    with pytest.raises(DataError, match="annotation file not found"):
        load_episode(tmp_path / "none.json")
    bad = tmp_path / "annotation" / "val" / "1.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{oops")
    with pytest.raises(DataError, match="1.json: not valid JSON"):
        load_episode(bad)
    meta = json.loads(demo_episode.read_text())
    meta["videos"].append({"video_path": "videos/val/0/missing.mp4"})
    broken = demo_episode.parent / "2.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="missing.mp4 not found"):
        load_episode(broken)
    meta["videos"].pop()
    meta["actions"][3][1] = float("nan")
    broken.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="'actions' contains NaN"):
        load_episode(broken)
    broken.unlink()
    not_video = tmp_path / "fake.mp4"
    not_video.write_bytes(b"definitely not a video")
    with pytest.raises(DataError, match="fake.mp4: cannot decode"):
        decode_video(not_video)
    with pytest.raises(DataError, match="frame index 99 out of range"):
        load_episode(demo_episode).frames(0, [99])
    with pytest.raises(DataError, match="no 'annotation/val' folder"):
        list_episodes(tmp_path / "nothing")


def test_preprocess_matches_the_official_pipeline():
    img = np.zeros((480, 640, 3), np.uint8)
    img[:, 80:560] = 255  # the centred 480 x 480 square is white, the margins black
    crop = center_crop_square(img)
    assert crop.shape == (480, 480, 3) and crop.min() == 255
    out = prepare_frame(img, 256)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8 and out.min() == 255
    tall = prepare_frame(np.zeros((300, 200, 3), np.uint8), 256)
    assert tall.shape == (256, 256, 3)
    x = to_model_input(np.array([[[0, 255, 128]]], np.uint8))
    assert x.shape == (3, 1, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x.ravel(), [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)
    with pytest.raises(ValueError, match="RGB image"):
        prepare_frame(np.zeros((10, 10), np.uint8), 8)
    with pytest.raises(ValueError, match="uint8"):
        prepare_frame(np.zeros((10, 10, 3), np.float32), 8)


def test_tokenizer_pads_truncates_and_round_trips(tmp_path):
    tok = byte_level_tokenizer(20)
    ids, mask = tok(["Move the mango.", "x" * 100])
    assert ids.shape == mask.shape == (2, 20) and ids.dtype == np.int64
    assert ids[0, 0] == tok.vocab_size - 2 and ids[1, -1] == tok.eos_id, "BOS first, EOS kept on truncation"
    n = int(mask[0].sum())
    assert n == len("move the mango.") + 2 and (ids[0, n:] == tok.eos_id).all()
    assert tok(["MOVE"])[0].tolist() == tok(["move"])[0].tolist(), "CLIP lower-cases"
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path, 20)
    assert (again(["Move the mango."])[0] == ids[:1]).all()
    with pytest.raises(CheckpointError, match="tokenizer file missing"):
        load_tokenizer(tmp_path / "none", 20)
    with pytest.raises(ValueError, match="non-empty list"):
        tok([])


def test_action_normalizer_round_trip_and_errors(rng):
    actions = rng.normal(size=(500, 4)) * [1, 2, 3, 4] + [0, 1, 2, 3]
    for mode in ("bounds", "mean_std"):
        norm = ActionNormalizer.fit(actions, mode)
        z = norm.normalize(actions)
        np.testing.assert_allclose(norm.denormalize(z), actions, rtol=1e-4, atol=1e-4)
        assert ActionNormalizer.from_dict(json.loads(json.dumps(norm.to_dict()))) == norm
    bounds = ActionNormalizer.fit(actions, "bounds")
    assert np.mean(np.abs(bounds.normalize(actions)) <= 1) > 0.95  # 1st..99th percentile -> [-1, 1]
    with pytest.raises(CheckpointError, match="mode 'minmax' unknown"):
        ActionNormalizer(mode="minmax")
    with pytest.raises(CheckpointError, match="must exceed"):
        ActionNormalizer(mode="bounds", low=(1.0,), high=(0.0,))
    with pytest.raises(CheckpointError, match="NaN"):
        ActionNormalizer(mode="mean_std", mean=(float("nan"),), std=(1.0,))
    with pytest.raises(CheckpointError, match="have 4 dims, the model outputs 7"):
        bounds.scale_offset(7)
