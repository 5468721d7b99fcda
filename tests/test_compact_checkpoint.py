"""`vpp compact`: an FP16 copy of a checkpoint (how the trained MetaWorld policy ships)."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vpp_edge.cli import main
from vpp_edge.presets import get_preset
from vpp_edge.training.checkpoints import WEIGHTS_FILE, load_checkpoint, save_checkpoint
from vpp_edge.training.models import build_policy


def test_compact_copy_stores_fp16_and_loads_as_the_rounded_fp32_model(tmp_path, capsys):
    policy, tokenizer = build_policy(get_preset("tiny"), seed=0)
    source = save_checkpoint(policy, tokenizer, tmp_path / "full")
    (source / "training_state").mkdir()  # a run's resume state (optimizer, EMA): not shipped
    (source / "training_state" / "optimizer.safetensors").write_bytes(b"x" * 1000)
    assert main(["compact", str(source), "--out", str(tmp_path / "small")]) == 0
    assert "FP16 weights" in capsys.readouterr().out
    small = tmp_path / "small"
    with safe_open(str(small / WEIGHTS_FILE), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    assert (small / WEIGHTS_FILE).stat().st_size < 0.55 * (source / WEIGHTS_FILE).stat().st_size
    assert sorted(p.name for p in small.iterdir()) == sorted(p.name for p in source.iterdir() if p.is_file())

    loaded, _ = load_checkpoint(small)
    original = policy.state_dict()
    for name, value in loaded.state_dict().items():
        assert value.dtype == original[name].dtype, name  # cast back to the model's dtype
        expected = original[name].half().to(value.dtype) if value.is_floating_point() else original[name]
        assert torch.equal(value, expected), name


def test_compact_of_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["compact", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint" in capsys.readouterr().err and not (tmp_path / "x").exists()


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "metaworld-tiny"


@pytest.mark.skipif(not (SHIPPED / "vpp_config.json").is_file(), reason="no shipped MetaWorld policy in models/")
def test_the_shipped_metaworld_policy_is_a_compact_loadable_checkpoint():
    """What `make demo` exports on a fresh clone: FP16 weights, at most 10 MB, loading into
    the metaworld_tiny architecture with the action bounds it was trained on."""
    assert (SHIPPED / "model.safetensors").stat().st_size <= 10 * 2**20
    with safe_open(str(SHIPPED / "model.safetensors"), "np") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
    policy, tokenizer = load_checkpoint(SHIPPED)
    assert policy.preset.name == "metaworld_tiny" and policy.preset == get_preset("metaworld_tiny")
    assert policy.normalizer.mode == "bounds" and len(policy.normalizer.low) == policy.preset.action_dim
    assert tokenizer(["drawer close"])[0].shape[-1] == policy.preset.text.goal_length  # the 77-token pass
