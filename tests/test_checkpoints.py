"""Loading and saving: both official formats and ours, and clear errors for bad files."""

import json
import os
import pickle
import shutil

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from safetensors.torch import load_file, save_file

from vpp_edge.errors import CheckpointError
from vpp_edge.normalization import ActionNormalizer
from vpp_edge.training import checkpoints as ckpt
from vpp_edge.training.models import build_policy

from .conftest import random_frames, tokens


def predict(policy, tokenizer, preset, seed=0):
    ids, mask = tokens(tokenizer)
    noise = policy.make_noise(1, seed)
    with torch.inference_mode():
        return policy(random_frames(preset), ids, mask, noise.tvp, noise.action)


@pytest.fixture(scope="module")
def trained_like(tiny_preset):
    """A tiny policy with non-trivial normalisation, as training would produce."""
    norm = ActionNormalizer(mode="mean_std", mean=tuple(float(i) for i in range(7)), std=(0.5,) * 7)
    return build_policy(tiny_preset, seed=7, normalizer=norm)


@pytest.fixture(scope="module")
def saved(trained_like, tmp_path_factory):
    policy, tok = trained_like
    return ckpt.save_checkpoint(policy, tok, tmp_path_factory.mktemp("ckpt") / "tiny-run")


def write_official(policy, tok, root, extra_keys=None):
    """The official release layout: SVD pipeline folder, CLIP folder, dp-*.pt action model."""
    video = root / "svd-robot"
    policy.tvp.unet.save_pretrained(video / "unet")
    policy.tvp.vae.save_pretrained(video / "vae")
    EulerDiscreteScheduler.from_config(policy.tvp.scheduler_config).save_pretrained(video / "scheduler")
    clip = root / "clip-vit-base-patch32"
    policy.text_encoder.clip.save_pretrained(clip)
    tok.save(clip)
    state = ckpt.to_official_state_dict(policy)
    assert any(k.startswith("Video_Former.layers.0.0.to_q") for k in state)
    assert "model.inner_model.decoder.blocks.0.adaLN_zero.modulation.1.weight" in state
    state.update(extra_keys or {})
    action = root / "dp-calvin.pt"
    torch.save({"model": state, "global_step": 1000}, action)
    return video, clip, action


def test_our_format_round_trip_is_bitwise(trained_like, saved, tiny_preset):
    assert sorted(os.listdir(saved)) == ["model.safetensors", "tokenizer.json", "vpp_config.json"]
    config = json.loads((saved / "vpp_config.json").read_text())
    assert config["preset"]["name"] == "tiny" and config["normalization"]["mode"] == "mean_std"
    loaded, tok = ckpt.load_checkpoint(saved)
    assert loaded.normalizer == trained_like[0].normalizer
    assert torch.equal(predict(*trained_like, tiny_preset), predict(loaded, tok, tiny_preset))
    assert torch.equal(tokens(tok)[0], tokens(trained_like[1])[0])


def test_official_format_round_trip_is_bitwise(trained_like, tiny_preset, tmp_path):
    policy, tok = trained_like
    # The official file also carries frozen copies of the video model and CLIP: ignored.
    video, clip, action = write_official(policy, tok, tmp_path, {"TVP_encoder.pipeline.unet.conv_in.weight": torch.zeros(2),
                                                                 "language_goal.clip_rn50.x": torch.zeros(1)})
    loaded, tok2 = ckpt.load_official(tiny_preset, video, clip, action, normalizer=policy.normalizer)
    assert torch.equal(predict(policy, tok, tiny_preset), predict(loaded, tok2, tiny_preset))


def test_convert_official_to_ours(trained_like, tiny_preset, tmp_path):
    policy, tok = trained_like
    loaded, tok2 = ckpt.load_official(tiny_preset, *write_official(policy, tok, tmp_path), policy.normalizer)
    out = ckpt.save_checkpoint(loaded, tok2, tmp_path / "converted")
    again, tok3 = ckpt.load_checkpoint(out, tiny_preset)
    assert torch.equal(predict(policy, tok, tiny_preset), predict(again, tok3, tiny_preset))


def test_missing_files_name_the_path(saved, tiny_preset, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        ckpt.load_checkpoint(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: weights file missing"):
        ckpt.load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="video model folder not found"):
        ckpt.load_official(tiny_preset, tmp_path / "svd", tmp_path / "clip", None)
    with pytest.raises(CheckpointError, match="action model file not found"):
        ckpt.read_torch_weights(tmp_path / "dp.pt")


def test_corrupt_files_are_reported(saved, tmp_path):
    broken = tmp_path / "corrupt"
    shutil.copytree(saved, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or unreadable safetensors"):
        ckpt.load_checkpoint(broken)
    (broken / "vpp_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="vpp_config.json: not valid JSON"):
        ckpt.load_checkpoint(broken)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable weights-only torch file"):
        ckpt.read_torch_weights(junk)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


def test_pickles_that_run_code_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": _Exploit()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="weights-only"):
        ckpt.read_torch_weights(evil)
    assert not (tmp_path / "exploited").exists()


def test_wrong_shapes_and_keys_name_the_key(saved, trained_like, tiny_preset, tmp_path):
    broken = tmp_path / "shapes"
    shutil.copytree(saved, broken)
    state = load_file(str(broken / "model.safetensors"))
    state["former.latents"] = torch.zeros(3, 3, 3)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'former.latents' has shape \[3, 3, 3\]"):
        ckpt.load_checkpoint(broken)
    state.pop("former.latents")
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing key.*former.latents"):
        ckpt.load_checkpoint(broken)
    policy, tok = trained_like
    with pytest.raises(CheckpointError, match="unexpected key.*something_else"):
        ckpt.load_official(tiny_preset, *write_official(policy, tok, tmp_path, {"something_else.w": torch.zeros(1)}))


def test_checkpoint_preset_mismatch(saved, tiny_preset, trained_like, tmp_path):
    other = tiny_preset.replace(action_horizon=5)
    with pytest.raises(CheckpointError, match="differs from the requested.*action_horizon"):
        ckpt.load_checkpoint(saved, other)
    # Official action weights for another action shape do not fit the preset: one line
    # naming the field and the preset they fit; without a preset, that one is used.
    policy, tok = trained_like
    files = write_official(policy, tok, tmp_path)
    with pytest.raises(CheckpointError, match=r"^[^\n]*: action_dim \(.*\) is 7 in the checkpoint but 4 in preset "
                                              r"'tiny'; use --preset tiny$"):
        ckpt.load_official(tiny_preset.replace(action_dim=4), *files)
    with pytest.raises(CheckpointError, match=r"former.depth .* is 1 in the checkpoint but 2 .*use --preset tiny"):
        ckpt.load_official(tiny_preset.replace(former={"depth": 2}), *files)
    loaded, _ = ckpt.load_official(None, *files, policy.normalizer)
    assert loaded.preset == tiny_preset
    assert torch.equal(predict(loaded, tok, tiny_preset), predict(policy, tok, tiny_preset))
    with pytest.raises(CheckpointError, match="name one with --preset"):
        ckpt.load_official(None, *files[:2], None)


@pytest.mark.parametrize("name, fits", [("calvin", ["calvin", "panda"]), ("xhand", ["xhand"]), ("xbot", ["xbot"])])
def test_official_shapes_give_the_preset(name, fits):
    """Paper-scale official action models (meta tensors): every shape-visible field is read
    back, the fitting presets are named, and a preset that differs is refused in one line."""
    from vpp_edge.presets import get_preset
    from vpp_edge.training.models import build_policy
    from vpp_edge.training.official_shapes import (check_official_preset, fitting_presets, official_shapes,
                                                   preset_for_official, preset_shapes)

    preset = get_preset(name)
    policy, _ = build_policy(preset, device="meta")
    shapes = official_shapes(ckpt.to_official_state_dict(policy), "dp.pt")
    assert shapes == preset_shapes(preset) and fitting_presets(shapes) == fits
    if len(fits) == 1:
        assert preset_for_official(shapes, "dp.pt") == preset
    else:
        with pytest.raises(CheckpointError, match="fits presets calvin, panda .* choose one with --preset"):
            preset_for_official(shapes, "dp.pt")
    check_official_preset(preset, shapes, "dp.pt")
    advice = "use --preset " + " or --preset ".join(fits)
    single_layer = preset.replace(tvp={"use_all_layer": not preset.tvp.use_all_layer})
    with pytest.raises(CheckpointError, match=rf"feature_channels .* is {shapes['feature_channels']} in the "
                                              rf"checkpoint but \d+ in preset '{name}'; {advice}$"):
        check_official_preset(single_layer, shapes, "dp.pt")
    with pytest.raises(CheckpointError, match=rf"action_horizon .* is {preset.action_horizon} .*; {advice}$"):
        check_official_preset(preset.replace(action_horizon=5), shapes, "dp.pt")
    with pytest.raises(CheckpointError, match=rf"no shipped preset fits .*closest '{fits[0]}' differs at action_dim: 9"):
        preset_for_official({**shapes, "action_dim": 9}, "dp.pt")


def test_interrupted_save_leaves_nothing_behind(trained_like, tmp_path, monkeypatch):
    policy, tok = trained_like
    target = tmp_path / "out"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(policy, tok, target)
    assert list(tmp_path.iterdir()) == []


def test_resave_replaces_atomically(trained_like, tmp_path):
    policy, tok = trained_like
    target = ckpt.save_checkpoint(policy, tok, tmp_path / "out")
    ckpt.save_checkpoint(policy, tok, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
