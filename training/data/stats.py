"""Normalisation statistics, computed once from the training episodes.

Actions use :class:`vpp_edge.normalization.ActionNormalizer` (the checkpoint and export
artifact store it; the runtime de-normalises with it). State statistics (``low`` / ``high``:
the 1st / 99th percentiles, the official ``state_01`` / ``state_99``) become the
:class:`~vpp_edge.normalization.StateNormalizer` of a policy that takes the state
(``action_head.use_proprio``). For actions relative to the state (``action_base`` 'state',
the official XBot) the action statistics are those of the relative chunks the policy is
trained on, ``command[t + k s] - state[t][:A]``, as the official ``action_01`` / ``action_99``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vpp_edge.errors import DataError
from vpp_edge.files import read_json
from vpp_edge.normalization import MODES, ActionNormalizer, StateNormalizer, from_commands

from .checks import CheckedEpisode

STATS_FILE = "normalization.json"


def chunk_rows(step: int, horizon: int, stride: int, length: int) -> np.ndarray:
    """Rows of the action chunk at ``step``: step, step + s, ..., step + (H - 1) s, clamped to
    the last action (as the official loaders clamp)."""
    return np.minimum(step + np.arange(horizon) * stride, length - 1)


def relative_chunks(episode: CheckedEpisode, rule: str, horizon: int, stride: int) -> np.ndarray:
    """Every action chunk of ``episode`` relative to the state at its step by ``rule`` (the
    preset's ``action_base``), float32 [steps, H, A]: what the policy is trained to predict."""
    ep = episode.episode
    if rule != "none" and (ep.states is None or len(ep.states) < episode.num_steps):
        raise DataError(f"{ep.name}: actions relative to the robot state (action_base '{rule}') need a recorded "
                        f"state at every step; the episode has {0 if ep.states is None else len(ep.states)} for "
                        f"{episode.num_steps} actions")
    return np.stack([from_commands(ep.actions[chunk_rows(t, horizon, stride, episode.num_steps)], rule,
                                   None if ep.states is None else ep.states[t])
                     for t in range(episode.num_steps)])


def fit_statistics(episodes: list[CheckedEpisode], mode: str = "bounds", quantile: float = 0.01,
                   action_base: str = "none", horizon: int = 1, action_stride: int = 1) -> dict[str, Any]:
    """``{"actions": ActionNormalizer dict, "states": {...} | None, "num_actions": N}``; with
    ``action_base`` other than 'none' the action statistics are over the chunks relative to the
    state (``horizon``, ``action_stride``: the dataset's chunks)."""
    if mode not in MODES:
        raise DataError(f"normalization '{mode}' unknown; allowed: {list(MODES)}")
    if not episodes:
        raise DataError("no training episodes to compute normalisation statistics from")
    if action_base == "none":
        actions = np.concatenate([e.episode.actions for e in episodes]).astype(np.float64)
    else:
        actions = np.concatenate([relative_chunks(e, action_base, horizon, action_stride).reshape(
            -1, e.episode.action_dim) for e in episodes]).astype(np.float64)
    normalizer = ActionNormalizer.fit(actions, mode=mode, quantile=quantile)
    states = [e.episode.states for e in episodes if e.episode.states is not None]
    state_stats = None
    if states and len({s.shape[1] for s in states}) == 1:
        s = np.concatenate(states).astype(np.float64)
        state_stats = {"mean": s.mean(0).tolist(), "std": s.std(0).tolist(),
                       "low": np.quantile(s, quantile, axis=0).tolist(),
                       "high": np.quantile(s, 1 - quantile, axis=0).tolist()}
    return {"actions": normalizer.to_dict(), "states": state_stats, "num_actions": int(len(actions)),
            "quantile": quantile, "action_base": action_base}


def state_normalizer(stats: dict[str, Any], proprio_dim: int, preset: str) -> StateNormalizer:
    """The state bounds of a policy that takes a ``proprio_dim``-value state, from the training
    statistics; :class:`DataError` when the episodes recorded none (or of another width)."""
    states = stats.get("states")
    if not states:
        raise DataError(f"preset '{preset}' takes the robot state ({proprio_dim} values, action_head.use_proprio) "
                        "but the training episodes record no states (or of different widths)")
    if len(states["low"]) != proprio_dim:
        raise DataError(f"preset '{preset}' takes a robot state of {proprio_dim} values; the training episodes "
                        f"record {len(states['low'])}")
    return StateNormalizer(low=tuple(states["low"]), high=tuple(states["high"]))


def save_statistics(stats: dict[str, Any], folder: Path) -> Path:
    path = Path(folder) / STATS_FILE
    path.write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return path


def load_statistics(folder: Path) -> dict[str, Any]:
    stats = read_json(Path(folder) / STATS_FILE, DataError, "statistics are written when training starts")
    ActionNormalizer.from_dict(stats.get("actions"))  # validates
    return stats
