"""Reader for the official VPP sample format (annotation JSON + videos + states/actions).

Parsing is :func:`vpp_edge.episodes.load_episode` (shared with ``vpp predict`` and the
runtime's replay camera); this module only adapts its episodes for training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vpp_edge.episodes import list_episodes, load_episode
from vpp_edge.errors import DataError

from .episode import TrainEpisode, VideoFiles
from .sources import EpisodeRef, SourceConfig, select_views


def load_official_episode(annotation: Path, source: SourceConfig) -> TrainEpisode:
    """One episode of the official format; every error names the annotation file."""
    episode = load_episode(annotation, extra_views=source.extra_views)
    if episode.actions is None:
        raise DataError(f"{annotation}: no 'actions' (or 'action') in the annotation")
    views = select_views([str(i) for i in range(episode.num_views)], source.views, str(annotation))
    states = None if episode.states is None else episode.states.astype(np.float32)
    return TrainEpisode(
        name=str(annotation),
        instruction=source.instruction or episode.instruction,
        actions=episode.actions.astype(np.float32),
        frames=VideoFiles([episode.video_paths[v] for v in views]),
        states=states,
        source=source.label,
    )


def official_refs(source: SourceConfig) -> list[EpisodeRef]:
    """Every annotation of ``<path>/annotation/<split>`` as a lazy episode."""
    return [EpisodeRef(str(p), lambda p=p: load_official_episode(p, source))
            for p in list_episodes(source.root(), source.split)]
