"""Normalisation statistics, computed once from the training episodes.

Actions use :class:`vpp_edge.normalization.ActionNormalizer` (the checkpoint and export
artifact store it; the runtime de-normalises with it). State statistics are kept
alongside for reference; the VPP policy does not read states.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vpp_edge.errors import DataError
from vpp_edge.files import read_json
from vpp_edge.normalization import MODES, ActionNormalizer

from .checks import CheckedEpisode

STATS_FILE = "normalization.json"


def fit_statistics(episodes: list[CheckedEpisode], mode: str = "bounds", quantile: float = 0.01) -> dict[str, Any]:
    """``{"actions": ActionNormalizer dict, "states": {...} | None, "num_actions": N}``."""
    if mode not in MODES:
        raise DataError(f"normalization '{mode}' unknown; allowed: {list(MODES)}")
    if not episodes:
        raise DataError("no training episodes to compute normalisation statistics from")
    actions = np.concatenate([e.episode.actions for e in episodes]).astype(np.float64)
    normalizer = ActionNormalizer.fit(actions, mode=mode, quantile=quantile)
    states = [e.episode.states for e in episodes if e.episode.states is not None]
    state_stats = None
    if states and len({s.shape[1] for s in states}) == 1:
        s = np.concatenate(states).astype(np.float64)
        state_stats = {"mean": s.mean(0).tolist(), "std": s.std(0).tolist(),
                       "low": np.quantile(s, quantile, axis=0).tolist(),
                       "high": np.quantile(s, 1 - quantile, axis=0).tolist()}
    return {"actions": normalizer.to_dict(), "states": state_stats, "num_actions": int(len(actions)),
            "quantile": quantile}


def save_statistics(stats: dict[str, Any], folder: Path) -> Path:
    path = Path(folder) / STATS_FILE
    path.write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return path


def load_statistics(folder: Path) -> dict[str, Any]:
    stats = read_json(Path(folder) / STATS_FILE, DataError, "statistics are written when training starts")
    ActionNormalizer.from_dict(stats.get("actions"))  # validates
    return stats
