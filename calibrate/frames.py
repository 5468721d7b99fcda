"""Observations (all camera views of one time step + the instruction) sampled from real
episodes, for INT8 calibration and for held-out parity checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpp_edge.episodes import Episode, find_samples_dir, list_episodes, load_episode
from vpp_edge.errors import DataError
from vpp_edge.preprocess import prepare_frame


@dataclass(frozen=True)
class Observation:
    frames: np.ndarray  # uint8 [V, S, S, 3], prepared for the model
    instruction: str
    source: str  # "<annotation>#<frame>"


def _episodes_with_views(roots: list[Path], views: int) -> list[Episode]:
    found = []
    for root in roots:
        for dataset in sorted(p for p in root.iterdir() if (p / "annotation").is_dir()) if root.is_dir() else []:
            for annotation in list_episodes(dataset):
                episode = load_episode(annotation)
                if episode.num_views >= views:
                    found.append(episode)
    return found


def sample_observations(num_views: int, size: int, count: int, offset: int = 0,
                        roots: list[Path] | None = None) -> list[Observation]:
    """``count`` observations spread over every episode with enough views and over time.

    ``offset`` shifts the time steps so calibration and held-out sets differ. Without
    real episodes (no ``shared/vpp_samples``) the synthetic demo episode is used.
    """
    if count <= 0:
        return []
    if roots is None:
        samples = find_samples_dir()
        roots = [samples] if samples is not None else []
    episodes = _episodes_with_views(roots, num_views)
    if not episodes:
        if roots:
            raise DataError(f"no episode in {', '.join(map(str, roots))} has {num_views} camera views")
        from vpp_edge.demo_data import default_episode

        episodes = [load_episode(default_episode())]
    out = []
    for k in range(count):
        episode = episodes[k % len(episodes)]
        videos = [episode.frames(v) for v in range(num_views)]
        length = min(len(v) for v in videos)
        # Golden-ratio stride: well spread time steps that differ between passes and offsets.
        t = int(((k // len(episodes) + offset) * 0.6180339887 % 1.0) * length)
        frames = np.stack([prepare_frame(v[t], size) for v in videos])
        out.append(Observation(frames, episode.instruction, f"{episode.annotation}#{t}"))
    return out
