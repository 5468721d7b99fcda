"""Training data: readers (official sample format, LeRobot v2/v3, CALVIN), bad-data
checks, normalisation statistics, the weighted mixture, and torch datasets."""

from .checks import BadDataReport, CheckedEpisode, check_episode, load_sources
from .datasets import ClipDataset, PolicyDataset, split_episodes
from .episode import TrainEpisode
from .mixture import MixtureSampler
from .sources import SourceConfig, episode_refs, source_from_dict
from .stats import fit_statistics, load_statistics, save_statistics

__all__ = ["BadDataReport", "CheckedEpisode", "ClipDataset", "MixtureSampler", "PolicyDataset", "SourceConfig",
           "TrainEpisode", "check_episode", "episode_refs", "fit_statistics", "load_sources", "load_statistics",
           "save_statistics", "source_from_dict", "split_episodes"]
