"""Dataset sources: what a training config names under ``data.sources``.

Each source is one dataset folder in one format with a sampling weight (the mixture
ratios of the paper's TVP data table). :func:`episode_refs` lists its episodes as
lazy references; opening a reference reads and checks one episode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

from vpp_edge.episodes import find_samples_dir
from vpp_edge.errors import DataError

from .episode import TrainEpisode

FORMATS = ("official", "lerobot", "calvin")
SAMPLES_PREFIX = "samples:"


@dataclass(frozen=True)
class SourceConfig:
    """One dataset of a mixture.

    * ``format``: ``official`` (annotation JSON + videos), ``lerobot`` (v2.x or v3.0
      folder), ``calvin`` (a CALVIN split folder with ``episode_XXXXXXX.npz`` files).
    * ``path``: the dataset folder; ``samples:NAME`` means ``NAME`` inside
      ``../shared/vpp_samples`` (or ``$VPP_SAMPLES``).
    * ``weight``: relative sampling ratio within the mixture.
    * ``views``: which cameras, in the preset's order: indices (official format: order
      of the annotation's videos) or camera names (LeRobot feature keys such as
      ``observation.images.top``; CALVIN ``rgb_static``/``rgb_gripper``). Default: the
      first ``num_views`` of the dataset.
    * ``split``: official format: the ``annotation/<split>`` folder; CALVIN: a sub-folder
      (``training``/``validation``) or empty when ``path`` is the split folder itself.
    * ``action_key`` / ``state_key``: LeRobot columns or CALVIN arrays (defaults
      ``action``/``observation.state`` and ``rel_actions``/``robot_obs``).
    * ``instruction``: used where a dataset has none (or to override all of them).
    * ``extra_views``: official format: append unlisted videos of the episode folder.
    * ``max_episodes``: read at most this many episodes (quick experiments).
    """

    format: str
    path: str
    weight: float = 1.0
    name: str = ""
    views: tuple[Any, ...] | None = None
    split: str = "val"
    action_key: str | None = None
    state_key: str | None = None
    instruction: str | None = None
    extra_views: bool = False
    max_episodes: int | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataError(f"data source format '{self.format}' unknown; allowed: {list(FORMATS)}")
        if not self.weight > 0:
            raise DataError(f"data source '{self.path}': weight must be positive, got {self.weight}")

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name or self.path

    def root(self) -> Path:
        """The dataset folder, with ``samples:`` resolved."""
        if self.path.startswith(SAMPLES_PREFIX):
            samples = find_samples_dir()
            if samples is None:
                raise DataError(f"data source '{self.path}' needs shared/vpp_samples (not found; set VPP_SAMPLES)")
            root = samples / self.path[len(SAMPLES_PREFIX):]
        else:
            root = Path(self.path).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: dataset folder not found")
        return root


def source_from_dict(data: dict[str, Any]) -> SourceConfig:
    """A :class:`SourceConfig` from plain data; unknown keys are an error that lists the allowed ones."""
    if not isinstance(data, dict):
        raise DataError(f"a data source must be a mapping, got {type(data).__name__}")
    allowed = {f.name for f in dataclasses.fields(SourceConfig)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise DataError(f"data source: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted({"format", "path"} - set(data))
    if missing:
        raise DataError(f"data source: missing key(s) {missing}")
    kwargs = dict(data)
    if kwargs.get("views") is not None:
        kwargs["views"] = tuple(kwargs["views"])
    kwargs["path"] = str(kwargs["path"])
    return SourceConfig(**kwargs)


class EpisodeRef(NamedTuple):
    """An episode not read yet: ``name`` for messages, ``load`` reads and returns it."""

    name: str
    load: Callable[[], TrainEpisode]


def episode_refs(source: SourceConfig) -> list[EpisodeRef]:
    """The episodes of ``source`` as lazy references (files are opened by ``load``)."""
    if source.format == "official":
        from .official import official_refs

        refs = official_refs(source)
    elif source.format == "lerobot":
        from .lerobot import lerobot_refs

        refs = lerobot_refs(source)
    else:
        from .calvin import calvin_refs

        refs = calvin_refs(source)
    return refs[: source.max_episodes] if source.max_episodes else refs


def select_views(available: list[str], wanted: tuple[Any, ...] | None, name: str) -> list[int]:
    """Indices of the wanted views among ``available`` camera names (or indices)."""
    if wanted is None:
        return list(range(len(available)))
    out = []
    for w in wanted:
        if isinstance(w, int) and not isinstance(w, bool):
            if not 0 <= w < len(available):
                raise DataError(f"{name}: view {w} out of range ({len(available)} camera(s): {available})")
            out.append(w)
        elif str(w) in available:
            out.append(available.index(str(w)))
        else:
            raise DataError(f"{name}: camera '{w}' not found; available: {available}")
    return out
