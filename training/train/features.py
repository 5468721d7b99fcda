"""Frozen TVP features for stage 2: computed on the fly, or once into an on-disk cache.

The TVP (and CLIP) do not train in stage 2, so a sample's features only depend on its
frames, its instruction and the TVP noise. The cache fixes that noise per sample
(seeded by the sample index) and stores features as a memory-mapped ``.npy`` array
[N, F, T, C] plus the goal embeddings [N, P]; training then runs the Video Former and
the action head only. The cache folder's name is a hash of everything the features
depend on (TVP and text weights, the preset's TVP side, samples, seed), so a changed input
never reads stale features and a changed head never recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..data.datasets import PolicyDataset
from ..models.policy import VPPPolicy
from .common import stream_seed

log = logging.getLogger(__name__)


def frames_to_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1] (as vpp_edge.preprocess, on any device)."""
    return (frames.float() * (2.0 / 255.0) - 1.0).movedim(-1, -3)


@torch.no_grad()
def tvp_features(policy: VPPPolicy, frames: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 tvp_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames [B, V, S, S, 3] + tokens + noise -> (Former input [B, F, T, C], goal [B, P])."""
    condition, goal = policy.encode_text(input_ids, attention_mask)
    feats = policy.predictive_features(frames_to_input(frames), condition, tvp_noise)
    return feats.float(), goal.float()


def sample_noise(policy: VPPPolicy, seed: int, index: int) -> torch.Tensor:
    """The TVP noise of cached sample ``index``: [V, F, C, h, w]."""
    shape = policy.noise_shapes(1)[0][1:]
    return torch.randn(shape, generator=torch.Generator().manual_seed(stream_seed(seed, index, "tvp-cache")))


# The preset sections a sample's features and goal depend on. The Video Former, the action
# head and the action chunk's shape are trained on top of the cache, so changing them (a
# longer horizon, a head that takes the robot state) reuses the features instead of
# recomputing every TVP forward.
FEATURE_SECTIONS = ("views", "image_size", "text", "tvp")


def _fingerprint(policy: VPPPolicy, dataset: PolicyDataset, seed: int, dtype: str) -> str:
    h = hashlib.sha256()
    preset = policy.preset.to_dict()
    h.update(json.dumps({k: preset[k] for k in FEATURE_SECTIONS}, sort_keys=True, default=str).encode())
    h.update(f"{seed}:{dtype}:{dataset.frames.size}".encode())
    for module in (policy.text_encoder, policy.tvp):
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for s in dataset.samples:
        ep = dataset.episodes[s.episode].episode
        h.update(f"{ep.name}|{s.step}|{ep.instruction}|{dataset.num_views}\n".encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """``features.npy`` [N, F, T, C] and ``goals.npy`` [N, P] in one folder, memory-mapped."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        self._features: np.ndarray | None = None
        self._goals: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.meta["count"])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._features is None:  # opened lazily: once per data-loader worker
            self._features = np.load(self.folder / "features.npy", mmap_mode="r")
            self._goals = np.load(self.folder / "goals.npy", mmap_mode="r")
        return self._features, self._goals  # type: ignore[return-value]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_features": None, "_goals": None}

    @classmethod
    def build(cls, policy: VPPPolicy, dataset: PolicyDataset, root: Path, name: str, seed: int, batch: int,
              dtype: str, accelerator: Accelerator, progress: bool = True) -> "FeatureCache":
        """Compute (or reuse) the features of every sample of ``dataset`` under ``root``.

        Every process fills the rows ``i % num_processes == rank`` of one shared file.
        """
        folder = Path(root) / f"{name}-{_fingerprint(policy, dataset, seed, dtype)}"
        if (folder / "meta.json").is_file():
            log.info("reusing TVP feature cache %s", folder)
            return cls(folder)
        n = len(dataset)
        feat_shape, goal_dim = _output_shapes(policy, dataset, accelerator)
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=dtype, shape=(n, *feat_shape))
            np.lib.format.open_memmap(folder / "goals.npy", mode="w+", dtype=np.float32, shape=(n, goal_dim))
        accelerator.wait_for_everyone()
        features = np.load(folder / "features.npy", mmap_mode="r+")
        goals = np.load(folder / "goals.npy", mmap_mode="r+")
        mine = list(range(accelerator.process_index, n, accelerator.num_processes))
        device = accelerator.device
        bar = tqdm(total=len(mine), desc=f"TVP features ({name})",
                   disable=not (progress and accelerator.is_main_process))
        for start in range(0, len(mine), batch):
            rows = mine[start:start + batch]
            items = [dataset[i] for i in rows]
            frames = torch.stack([it["frames"] for it in items]).to(device)
            ids = torch.stack([it["input_ids"] for it in items]).to(device)
            mask = torch.stack([it["attention_mask"] for it in items]).to(device)
            noise = torch.stack([sample_noise(policy, seed, i) for i in rows]).to(device)
            with accelerator.autocast():
                feats, goal = tvp_features(policy, frames, ids, mask, noise)
            features[rows] = feats.cpu().numpy().astype(dtype)
            goals[rows] = goal.cpu().numpy()
            bar.update(len(rows))
        bar.close()
        features.flush()
        goals.flush()
        del features, goals
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            meta = {"count": n, "feature_shape": list(feat_shape), "dtype": dtype, "seed": seed}
            (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        accelerator.wait_for_everyone()
        return cls(folder)


def _output_shapes(policy: VPPPolicy, dataset: PolicyDataset, accelerator: Accelerator
                   ) -> tuple[tuple[int, ...], int]:
    """Feature [F, T, C] and goal sizes, from one forward pass on the first sample."""
    item = dataset[0]
    device = accelerator.device
    with accelerator.autocast():
        feats, goal = tvp_features(policy, item["frames"][None].to(device), item["input_ids"][None].to(device),
                                   item["attention_mask"][None].to(device), sample_noise(policy, 0, 0)[None].to(device))
    return tuple(feats.shape[1:]), int(goal.shape[-1])


class CachedPolicyDataset(Dataset):
    """Stage-2 items from the cache: ``features`` [F, T, C] float32, ``goal`` [P], ``actions``,
    (``state``,) ``index``."""

    def __init__(self, dataset: PolicyDataset, cache: FeatureCache):
        if len(cache) != len(dataset):
            raise ValueError(f"feature cache has {len(cache)} samples, the dataset {len(dataset)}")
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        features, goals = self.cache.arrays()
        return {"features": torch.from_numpy(np.asarray(features[i], dtype=np.float32)),
                "goal": torch.from_numpy(np.array(goals[i])),
                "actions": torch.from_numpy(self.dataset.action_chunk(i)), **self.dataset.state_item(i),
                "index": torch.tensor(i)}
