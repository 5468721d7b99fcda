"""Shared fixtures: tiny models built here (no downloads) and the optional sample data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vpp_edge.episodes import find_samples_dir
from vpp_edge.presets import get_preset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_preset():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_policy(tiny_preset):
    """A seeded random tiny policy and its tokenizer (treat as read-only)."""
    from vpp_edge.training.models import build_policy

    return build_policy(tiny_preset, seed=0)


@pytest.fixture(scope="session")
def exported(tiny_policy, tmp_path_factory):
    """The tiny policy exported once (FP32/FP16/INT8) for every test that needs an artifact."""
    from vpp_edge.export import artifact as art

    policy, tok = tiny_policy
    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    options = art.load_options(parity_samples=1, calibration_samples=2)
    manifest = art.export_artifact(policy, tok, out, options, source="test", progress=False)
    return out, manifest


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
