"""Observations (all camera views of one time step + the instruction) sampled from real
episodes, for INT8 calibration and for held-out parity checks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence
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


def observations_digest(observations: Sequence[Observation], states: np.ndarray | None = None) -> str:
    """sha256 of the frames and instructions (and the recorded robot states, where there are
    some): what a cached or recorded result was computed from."""
    h = hashlib.sha256()
    for o in observations:
        h.update(np.ascontiguousarray(o.frames).tobytes())
    h.update("\n".join(o.instruction for o in observations).encode())
    if states is None:
        return h.hexdigest()
    return hashlib.sha256(h.hexdigest().encode() + np.ascontiguousarray(states, np.float64).tobytes()).hexdigest()


def recorded_states(observations: Sequence[Observation]) -> tuple[np.ndarray | None, str]:
    """(raw robot states [N, D] float64, note): the state each observation's episode recorded at
    its frame (the source ``<annotation>#<frame>``), or None and why not (an episode without
    states, a frame past them, widths that differ between episodes)."""
    episodes: dict[str, Episode] = {}
    states = []
    for obs in observations:
        annotation, _, frame = obs.source.rpartition("#")
        if not annotation or not frame.isdigit():
            return None, f"{obs.source}: not an episode frame ('<annotation>#<frame>')"
        if annotation not in episodes:
            try:
                episodes[annotation] = load_episode(annotation)
            except DataError as exc:
                return None, f"{annotation}: {exc}"
        recorded = episodes[annotation].states
        if recorded is None or int(frame) >= len(recorded):
            return None, f"{annotation} records no state at frame {frame}"
        states.append(np.asarray(recorded[int(frame)], np.float64).reshape(-1))
    widths = sorted({len(s) for s in states})
    if len(widths) != 1:
        return None, f"the episodes record states of different widths {widths}"
    return np.stack(states), f"recorded {widths[0]}-value states"


def _episodes_with_views(roots: list[Path], views: int) -> list[Episode]:
    """Episodes of every split of every dataset in ``roots`` (a root is a dataset folder
    itself or a folder of datasets) that have at least ``views`` cameras."""
    found = []
    for root in roots:
        if (root / "annotation").is_dir():
            datasets = [root]
        else:
            datasets = sorted(p for p in root.iterdir() if (p / "annotation").is_dir()) if root.is_dir() else []
        for dataset in datasets:
            for split in sorted(p.name for p in (dataset / "annotation").iterdir() if p.is_dir()):
                for annotation in list_episodes(dataset, split):
                    episode = load_episode(annotation)
                    if episode.num_views >= views:
                        found.append(episode)
    return found


def find_episodes(num_views: int, roots: list[Path] | None = None) -> list[Episode]:
    """Every episode with at least ``num_views`` cameras under ``roots`` (folders of datasets
    in the official sample format; default ``shared/vpp_samples``). Without real episodes
    (no roots at all) the synthetic demo episode is returned."""
    if roots is None:
        samples = find_samples_dir()
        roots = [samples] if samples is not None else []
    episodes = _episodes_with_views(roots, num_views)
    if not episodes:
        if roots:
            raise DataError(f"no episode in {', '.join(map(str, roots))} has {num_views} camera views")
        from vpp_edge.demo_data import default_episode

        episodes = [load_episode(default_episode())]
    return episodes


def sample_observations(num_views: int, size: int, count: int, offset: int = 0,
                        roots: list[Path] | None = None,
                        episodes: list[Episode] | None = None) -> list[Observation]:
    """``count`` observations spread over every episode with enough views and over time.

    ``offset`` shifts the time steps so calibration and held-out sets differ. Without
    real episodes (no ``shared/vpp_samples``) the synthetic demo episode is used.
    ``episodes`` (from :func:`find_episodes`) restricts sampling to those episodes.
    """
    if count <= 0:
        return []
    if episodes is None:
        episodes = find_episodes(num_views, roots)
    if not episodes:
        raise DataError("no episodes to sample observations from")
    short = [str(e.annotation) for e in episodes if e.num_views < num_views]
    if short:
        raise DataError(f"{short[0]}: fewer than {num_views} camera views")
    out = []
    for k in range(count):
        # Episodes evenly spread over the list (datasets are listed task by task), ...
        episode = episodes[k * len(episodes) // count] if count < len(episodes) else episodes[k % len(episodes)]
        videos = [episode.frames(v) for v in range(num_views)]
        length = min(len(v) for v in videos)
        # ... and golden-ratio time steps: well spread, different for every k and offset.
        t = int(((k + offset) * 0.6180339887 % 1.0) * length)
        frames = np.stack([prepare_frame(v[t], size) for v in videos])
        out.append(Observation(frames, episode.instruction, f"{episode.annotation}#{t}"))
    return out
