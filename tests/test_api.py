"""The Python API (vpp_edge.api) and the example that embeds it (examples/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vpp_edge.api import ActionChunk, Policy
from vpp_edge.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_policy_acts_on_frames_of_any_size_with_their_stamp(exported):
    frames_small = [np.full((48, 64, 3), 90, np.uint8), np.full((48, 64, 3), 160, np.uint8)]
    frames_large = [np.full((480, 640, 3), 90, np.uint8), np.full((480, 640, 3), 160, np.uint8)]
    with Policy.load(exported[0], "onnxruntime", "fp32", seed=3, instruction="open the drawer") as policy:
        preset = policy.preset
        chunk = policy.act(frames_small, stamp=12.5)
        assert isinstance(chunk, ActionChunk) and chunk.stamp == 12.5
        assert chunk.actions.shape == (preset.action_horizon, preset.action_dim) and chunk.actions.dtype == np.float32
        assert np.all(np.isfinite(chunk.actions)) and chunk.timings_ms
        np.testing.assert_allclose(chunk.times(0.1), 12.5 + 0.1 * np.arange(preset.action_horizon))
        assert policy.act(frames_large).actions.shape == chunk.actions.shape
        with pytest.raises(ConfigError, match="takes 2 camera view"):
            policy.act(frames_small[:1])
        with pytest.raises(ConfigError, match="camera image"):
            policy.act([np.zeros((8, 8), np.uint8)] * 2)
    with Policy.load(exported[0], "onnxruntime", "fp32", seed=3, instruction="open the drawer") as again:
        np.testing.assert_array_equal(again.act(frames_small, stamp=0.0).actions, chunk.actions)  # same seed, same


def test_vpp_run_drives_the_same_policy_object(exported):
    """The runtime's builder (what `vpp run` uses) loads the same LoadedPolicy the API
    extends: same config, same seed, same frames -> the same actions."""
    from vpp_edge.runtime.build import LoadedPolicy, open_policy
    from vpp_edge.runtime.config import RuntimeConfig

    frames = [np.full((48, 64, 3), 90, np.uint8), np.full((48, 64, 3), 160, np.uint8)]
    config = RuntimeConfig(artifact=Path(exported[0]), backend="onnxruntime", precision="fp32", seed=3)
    with Policy.load(exported[0], "onnxruntime", "fp32", seed=3, instruction="open the drawer") as policy, \
            open_policy(config) as loaded:
        assert isinstance(policy, LoadedPolicy) and type(policy.runtime) is type(loaded.runtime)
        loaded.set_instruction("open the drawer")
        np.testing.assert_array_equal(loaded.runtime.infer(policy.prepare(frames)).actions,
                                      policy.act(frames).actions)


def test_policy_needs_an_instruction_and_an_artifact(exported, tmp_path):
    with Policy.load(exported[0], "onnxruntime") as policy:
        with pytest.raises(ConfigError, match="set an instruction"):
            policy.act([np.zeros((8, 8, 3), np.uint8)] * 2)
    with pytest.raises(ConfigError, match="no such artifact"):
        Policy.load(tmp_path / "missing")


def test_the_embedding_example_runs(exported):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "embed_policy.py"), str(exported[0]), "--steps", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "chunk 1: observed at" in proc.stdout
