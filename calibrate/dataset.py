"""Calibration and held-out sets as files: numpy ``.npz`` archives, never pickle.

An :class:`ObservationSet` holds camera frames of every view (uint8, prepared for the
model) plus the instruction and the source (``<annotation>#<frame>``) of each observation,
and the robot state the episode recorded at that frame where every observation has one of
the same width (official-format episodes carry ``state``/``states``): what a policy that
takes the state is calibrated and checked with (:mod:`vpp_edge.state_feeds`).
The quantizer's feeds are computed from it (the graph cache keys INT8 graphs by their digest,
:func:`vpp_edge.export.graph_cache.feeds_digest`), never stored.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from vpp_edge.episodes import Episode
from vpp_edge.errors import DataError

from vpp_edge.observations import (Observation, find_episodes, observations_digest, recorded_states,
                                   sample_observations)

OBSERVATIONS_FORMAT = "vpp-edge-observations/1"


class EmptyCalibrationSetError(DataError):
    """A calibration (or held-out) set without a single observation."""


def _load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle anything else
        raise DataError(f"{path}: not a readable .npz {what} (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz {what} ({exc})") from None
    except ValueError as exc:  # object arrays would need pickle: refused on purpose
        raise DataError(f"{path}: {what} holds Python objects, which are not loaded (no pickle): {exc}") from None


@dataclass(frozen=True)
class ObservationSet:
    """Observations stacked for storage: frames uint8 [N, V, S, S, 3], N instructions and, where
    the episodes recorded them, the raw robot states [N, D] (float64; None otherwise)."""

    frames: np.ndarray
    instructions: tuple[str, ...]
    sources: tuple[str, ...]
    states: np.ndarray | None = None

    def __post_init__(self) -> None:
        f = self.frames
        if f.ndim != 5 or f.shape[-1] != 3 or f.dtype != np.uint8:
            raise DataError(f"observation frames must be uint8 [N, V, S, S, 3], got {f.dtype} {list(f.shape)}")
        if not len(self.instructions) == len(self.sources) == len(f):
            raise DataError(f"{len(f)} observations but {len(self.instructions)} instructions and "
                            f"{len(self.sources)} sources")
        s = self.states
        if s is not None and (s.ndim != 2 or len(s) != len(f) or not np.all(np.isfinite(s))):
            raise DataError(f"recorded states must be finite [N={len(f)}, D], got {list(s.shape)}")

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def num_views(self) -> int:
        return int(self.frames.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.frames.shape[2])

    @classmethod
    def from_observations(cls, observations: Sequence[Observation]) -> "ObservationSet":
        if not observations:
            raise EmptyCalibrationSetError("empty observation set: no observation was sampled")
        return cls(np.stack([o.frames for o in observations]), tuple(o.instruction for o in observations),
                   tuple(o.source for o in observations), recorded_states(observations)[0])

    def observations(self) -> list[Observation]:
        return [Observation(f, i, s) for f, i, s in zip(self.frames, self.instructions, self.sources)]

    def digest(self) -> str:
        """sha256 of the frames and instructions (and the recorded states, where there are
        some): what a cached result was computed from."""
        return observations_digest(self.observations(), self.states)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(tmp, format=np.array(OBSERVATIONS_FORMAT), frames=self.frames,
                            instructions=np.array(self.instructions, dtype=str),
                            sources=np.array(self.sources, dtype=str),
                            **({"states": self.states} if self.states is not None else {}))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, what: str = "calibration set") -> "ObservationSet":
        """Read and check a set written by :meth:`save`; an empty set is an error."""
        path = Path(path)
        data = _load_npz(path, what)
        if str(data.get("format", "")) != OBSERVATIONS_FORMAT:
            raise DataError(f"{path}: not a {what} (expected format '{OBSERVATIONS_FORMAT}', written by "
                            "'vpp calibrate dataset')")
        missing = [k for k in ("frames", "instructions", "sources") if k not in data]
        if missing:
            raise DataError(f"{path}: {what} lacks {missing}")
        if len(data["frames"]) == 0:
            raise EmptyCalibrationSetError(f"{path}: empty {what} (0 observations)")
        try:
            return cls(data["frames"], tuple(str(s) for s in data["instructions"]),
                       tuple(str(s) for s in data["sources"]),
                       np.asarray(data["states"], np.float64) if "states" in data else None)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None


def build_observation_set(num_views: int, image_size: int, count: int, episodes: list[Episode] | None = None,
                          offset: int = 0, what: str = "calibration set") -> ObservationSet:
    """``count`` observations of ``num_views`` cameras sampled across ``episodes``."""
    if count < 1:
        raise EmptyCalibrationSetError(f"empty {what}: asked for {count} observations (need at least 1)")
    return ObservationSet.from_observations(sample_observations(num_views, image_size, count, offset,
                                                                episodes=episodes))


@dataclass(frozen=True)
class DataSplit:
    calibration: ObservationSet
    heldout: ObservationSet
    note: str  # how the held-out set was kept apart


def build_split(num_views: int, image_size: int, calibration_samples: int, heldout_samples: int,
                heldout_episodes: int = 1, roots: list[Path] | None = None) -> DataSplit:
    """A calibration set and a held-out set from different episodes.

    The last ``heldout_episodes`` episodes (in dataset order) are held out. With a single
    episode (e.g. only the synthetic demo episode) both sets come from it, at different
    time steps, and ``note`` says so.
    """
    if calibration_samples < 1:
        raise EmptyCalibrationSetError(f"empty calibration set: calibration_samples is {calibration_samples}")
    if heldout_samples < 1:
        raise EmptyCalibrationSetError(f"empty held-out set: heldout_samples is {heldout_samples}")
    episodes = find_episodes(num_views, roots)
    k = max(1, int(heldout_episodes))
    if len(episodes) > k:
        calib_eps, held_eps = episodes[:-k], episodes[-k:]
        note = (f"held-out: {len(held_eps)} episode(s) never used for calibration "
                f"({', '.join(e.annotation.parent.parent.parent.name + '/' + e.episode_id for e in held_eps)})")
    else:
        calib_eps = held_eps = episodes
        note = (f"only {len(episodes)} episode(s) with {num_views} views: held-out observations are other time "
                "steps of the calibration episodes")
    calibration = build_observation_set(num_views, image_size, calibration_samples, calib_eps, offset=0)
    # Offset past the calibration draws: other time steps even when the episodes are shared.
    heldout = build_observation_set(num_views, image_size, heldout_samples, held_eps, offset=calibration_samples,
                                    what="held-out set")
    return DataSplit(calibration, heldout, note)
