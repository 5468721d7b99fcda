"""Bad-data policy: check every episode once, then skip it or stop, naming the file.

Checks: the files exist and decode (the readers raise), enough camera views, all views
the same length, one action per frame (or one fewer, the last frame having none), the
expected action dimension, no NaN or Inf in actions or states.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from vpp_edge.errors import DataError

from .episode import TrainEpisode
from .sources import SourceConfig, episode_refs

log = logging.getLogger(__name__)

BAD_DATA_POLICIES = ("skip", "fatal")


@dataclass
class BadDataReport:
    """Episodes left out, each with its file name and reason."""

    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, name: str, error: str) -> None:
        self.skipped.append({"file": name, "error": error})

    def __len__(self) -> int:
        return len(self.skipped)


def check_episode(episode: TrainEpisode, num_views: int, action_dim: int | None) -> int:
    """Raise :class:`DataError` (naming the file) if ``episode`` is unusable; return its frame count."""
    name = episode.name
    frames = episode.frames
    if frames.num_views < num_views:
        raise DataError(f"{name}: {frames.num_views} camera view(s), the model needs {num_views}")
    counts = [frames.count(v) for v in range(num_views)]
    if len(set(counts)) > 1:
        detail = ", ".join(f"{frames.describe(v)}: {c}" for v, c in enumerate(counts))
        raise DataError(f"{name}: camera views have different lengths ({detail})")
    n = counts[0]
    if n < 1:
        raise DataError(f"{frames.describe(0)}: video has no frames")
    actions = episode.actions
    if actions.ndim != 2 or len(actions) not in (n, n - 1) or len(actions) == 0:
        raise DataError(f"{name}: {len(actions)} action rows for {n} video frames (expected {n} or {n - 1})")
    if action_dim is not None and actions.shape[1] != action_dim:
        raise DataError(f"{name}: actions have {actions.shape[1]} dims, the model's action_dim is {action_dim}")
    if not np.all(np.isfinite(actions)):
        row = int(np.argwhere(~np.isfinite(actions))[0][0])
        raise DataError(f"{name}: actions contain NaN or Inf (first at step {row})")
    if episode.states is not None and not np.all(np.isfinite(episode.states)):
        raise DataError(f"{name}: states contain NaN or Inf")
    return n


@dataclass(frozen=True)
class CheckedEpisode:
    """An episode that passed the checks, with its frame count and mixture source index."""

    episode: TrainEpisode
    num_frames: int
    source_index: int

    @property
    def num_steps(self) -> int:
        """Time steps with an action (the samples this episode can give)."""
        return len(self.episode.actions)


def load_sources(sources: list[SourceConfig], num_views: int, action_dim: int | None, policy: str = "skip",
                 report: BadDataReport | None = None, progress: bool = True) -> list[CheckedEpisode]:
    """Read and check every episode of every source.

    ``policy`` ``fatal`` raises the first :class:`DataError`; ``skip`` logs it (with the
    file name), records it in ``report`` and goes on. A source left without any usable
    episode is always an error.
    """
    if policy not in BAD_DATA_POLICIES:
        raise DataError(f"bad_data policy '{policy}' unknown; allowed: {list(BAD_DATA_POLICIES)}")
    report = report if report is not None else BadDataReport()
    out: list[CheckedEpisode] = []
    for index, source in enumerate(sources):
        refs = episode_refs(source)
        kept = 0
        for ref in tqdm(refs, desc=f"checking {source.label}", disable=not progress, leave=False):
            try:
                episode = ref.load()
                n = check_episode(episode, num_views, action_dim)
            except DataError as exc:
                if policy == "fatal":
                    raise
                log.warning("skipping episode: %s", exc)
                report.add(ref.name, str(exc))
                continue
            out.append(CheckedEpisode(episode, n, index))
            kept += 1
        if not kept:
            raise DataError(f"data source '{source.label}' ({source.path}): no usable episode among {len(refs)}")
    return out
