"""Torch datasets over checked episodes: policy samples (one observation + an action
chunk) for stage 2, and video clips (one camera, ``num_frames`` frames) for stage 1.

Frames are prepared exactly as at run time (:func:`vpp_edge.preprocess.prepare_frame`:
centre crop, resize), decoded once per episode view and kept in a small LRU.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vpp_edge.errors import DataError
from vpp_edge.normalization import ActionNormalizer, StateNormalizer
from vpp_edge.preprocess import prepare_frame
from vpp_edge.tokenizer import InstructionTokenizer, InstructionTruncatedWarning

from .checks import CheckedEpisode
from .stats import chunk_rows, relative_chunks


def split_episodes(episodes: Sequence[CheckedEpisode], val_fraction: float
                   ) -> tuple[list[CheckedEpisode], list[CheckedEpisode]]:
    """(train, val): the last ``ceil(val_fraction * n)`` episodes of each source are held
    out (never all of them: a source with one episode stays in training)."""
    train: list[CheckedEpisode] = []
    val: list[CheckedEpisode] = []
    for src in sorted({e.source_index for e in episodes}):
        eps = [e for e in episodes if e.source_index == src]
        n_val = min(math.ceil(val_fraction * len(eps)), len(eps) - 1) if val_fraction > 0 else 0
        train += eps[: len(eps) - n_val]
        val += eps[len(eps) - n_val:]
    return train, val


def _source_sizes(episodes: Sequence[CheckedEpisode], samples: Sequence) -> list[int]:
    """Samples per mixture source, in source order (for the mixture's sampling weights)."""
    counts = Counter(episodes[s.episode].source_index for s in samples)
    return [counts[k] for k in sorted(counts)]


class FrameStore:
    """Prepared frames (uint8 [T, S, S, 3]) per (episode, view), least recently used dropped."""

    def __init__(self, episodes: Sequence[CheckedEpisode], size: int, capacity: int = 8):
        self.episodes = episodes
        self.size = size
        self.capacity = max(1, capacity)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": OrderedDict()}  # data-loader workers decode their own

    def view(self, episode: int, view: int) -> np.ndarray:
        key = (episode, view)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        ep = self.episodes[episode].episode
        raw = ep.frames.read(view)
        expected = self.episodes[episode].num_frames
        if len(raw) < expected:
            raise DataError(f"{ep.frames.describe(view)}: decoded {len(raw)} frames, the header said {expected}")
        frames = np.stack([prepare_frame(f, self.size) for f in raw[:expected]])
        self._cache[key] = frames
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return frames


class _Tokens:
    """Token ids per instruction, computed once."""

    def __init__(self, tokenizer: InstructionTokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        if text not in self._cache:
            # Training truncates the video condition as the official code does; one warning
            # per long instruction of a dataset would drown the log (predict/run/export warn).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InstructionTruncatedWarning)
                ids, mask = self.tokenizer([text])
            self._cache[text] = (torch.from_numpy(ids[0]), torch.from_numpy(mask[0]))
        return self._cache[text]


@dataclass(frozen=True)
class PolicySample:
    episode: int  # index into the dataset's episodes
    step: int  # time step of the observation


class PolicyDataset(Dataset):
    """Stage-2 samples: frames of all views at step t, the instruction's tokens, and the
    normalised action chunk a[t], a[t + s], ..., a[t + (H - 1) s] (s = ``action_stride``;
    steps past the end repeat the last action, as the official loaders clamp).

    For a policy that takes the robot state (``state_normalizer``), items also hold ``state``
    float32 [P]: the recorded state at step t, bound-normalised and clipped as the official
    dataset does; with ``action_base`` 'state' the chunk is relative to that raw state
    (``command - state[t][:A]``, the official XBot) before normalisation.

    Samples are ordered source by source (``source_sizes``), as the mixture sampler indexes them.
    Items: ``frames`` uint8 [V, S, S, 3], ``input_ids``/``attention_mask`` int64 [L],
    ``actions`` float32 [H, A], (``state`` float32 [P],) ``index`` int64.
    """

    def __init__(self, episodes: Sequence[CheckedEpisode], num_views: int, image_size: int, horizon: int,
                 normalizer: ActionNormalizer, tokenizer: InstructionTokenizer, sample_stride: int = 1,
                 action_stride: int = 1, cache_episodes: int = 8, state_normalizer: StateNormalizer | None = None,
                 action_base: str = "none"):
        if sample_stride < 1 or action_stride < 1:
            raise DataError(f"sample_stride and action_stride must be >= 1, got {sample_stride}, {action_stride}")
        order = sorted(range(len(episodes)), key=lambda i: episodes[i].source_index)
        self.episodes = [episodes[i] for i in order]
        self.num_views = num_views
        self.horizon = horizon
        self.action_stride = action_stride
        self.normalizer = normalizer
        self.tokens = _Tokens(tokenizer)
        self.frames = FrameStore(self.episodes, image_size, cache_episodes)
        self.samples = [PolicySample(e, t) for e, ep in enumerate(self.episodes)
                        for t in range(0, ep.num_steps, sample_stride)]
        if action_base == "none":
            self._normalized = [normalizer.normalize(ep.episode.actions) for ep in self.episodes]
        else:  # chunks relative to the state at their step: one per step, computed once
            self._normalized = [normalizer.normalize(relative_chunks(ep, action_base, horizon, action_stride))
                                for ep in self.episodes]
        self.relative = action_base != "none"
        self._states = None if state_normalizer is None else [self._episode_states(ep, state_normalizer)
                                                              for ep in self.episodes]

    @staticmethod
    def _episode_states(ep: CheckedEpisode, normalizer: StateNormalizer) -> np.ndarray:
        states = ep.episode.states
        if states is None or states.shape[1] != normalizer.dim or len(states) < ep.num_steps:
            got = "none" if states is None else f"{list(states.shape)}"
            raise DataError(f"{ep.episode.name}: the policy takes a {normalizer.dim}-value robot state at each of "
                            f"the {ep.num_steps} steps; the episode records {got}")
        return normalizer.scale(states[: ep.num_steps])

    @property
    def source_sizes(self) -> list[int]:
        return _source_sizes(self.episodes, self.samples)

    @property
    def source_indices(self) -> list[int]:
        """Mixture source of each entry of :attr:`source_sizes`."""
        return sorted({self.episodes[s.episode].source_index for s in self.samples})

    def __len__(self) -> int:
        return len(self.samples)

    def action_chunk(self, i: int) -> np.ndarray:
        s = self.samples[i]
        actions = self._normalized[s.episode]
        if self.relative:
            return actions[s.step]
        return actions[chunk_rows(s.step, self.horizon, self.action_stride, len(actions))]

    def state_item(self, i: int) -> dict[str, torch.Tensor]:
        """``{"state": normalised state [P]}`` for a policy that takes the state, else ``{}``."""
        if self._states is None:
            return {}
        s = self.samples[i]
        return {"state": torch.from_numpy(self._states[s.episode][s.step])}

    def observation(self, i: int) -> np.ndarray:
        s = self.samples[i]
        return np.stack([self.frames.view(s.episode, v)[s.step] for v in range(self.num_views)])

    def instruction(self, i: int) -> str:
        return self.episodes[self.samples[i].episode].episode.instruction

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids, mask = self.tokens(self.instruction(i))
        return {"frames": torch.from_numpy(self.observation(i)), "input_ids": ids, "attention_mask": mask,
                "actions": torch.from_numpy(self.action_chunk(i)), **self.state_item(i), "index": torch.tensor(i)}


@dataclass(frozen=True)
class ClipSample:
    episode: int
    view: int
    frame_ids: tuple[int, ...]


def clip_frame_ids(num_frames: int, clip_len: int, stride: int, start_stride: int, mode: str) -> list[list[int]]:
    """Frame ids of the clips of an episode.

    ``linspace``: one clip spread over the whole episode (the official loader does this
    for short internet-style videos: Bridge, RT-1, SSv2); ``stride``: a clip every
    ``start_stride`` frames, ``stride`` frames apart, clamped at the last frame (the
    official robot-data loader).
    """
    if mode == "linspace":
        return [np.linspace(0, num_frames - 1, clip_len).astype(int).tolist()]
    if mode != "stride":
        raise DataError(f"clip mode '{mode}' unknown; allowed: ['linspace', 'stride']")
    base = np.arange(clip_len) * stride
    return [np.minimum(base + s, num_frames - 1).tolist() for s in range(0, num_frames, start_stride)]


class ClipDataset(Dataset):
    """Stage-1 samples: ``clip_len`` frames of one camera and the instruction's tokens.

    Items: ``frames`` uint8 [F, S, S, 3], ``input_ids``/``attention_mask`` [L], ``index``.
    """

    def __init__(self, episodes: Sequence[CheckedEpisode], num_views: int, image_size: int, clip_len: int,
                 tokenizer: InstructionTokenizer, stride: int = 2, start_stride: int = 2, mode: str = "stride",
                 cache_episodes: int = 8):
        order = sorted(range(len(episodes)), key=lambda i: episodes[i].source_index)
        self.episodes = [episodes[i] for i in order]
        self.tokens = _Tokens(tokenizer)
        self.frames = FrameStore(self.episodes, image_size, cache_episodes)
        self.samples = [ClipSample(e, v, tuple(ids)) for e, ep in enumerate(self.episodes)
                        for v in range(num_views)
                        for ids in clip_frame_ids(ep.num_frames, clip_len, stride, start_stride, mode)]

    @property
    def source_sizes(self) -> list[int]:
        return _source_sizes(self.episodes, self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def clip(self, i: int) -> np.ndarray:
        s = self.samples[i]
        return self.frames.view(s.episode, s.view)[list(s.frame_ids)]

    def instruction(self, i: int) -> str:
        return self.episodes[self.samples[i].episode].episode.instruction

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids, mask = self.tokens(self.instruction(i))
        return {"frames": torch.from_numpy(self.clip(i)), "input_ids": ids, "attention_mask": mask,
                "index": torch.tensor(i)}
