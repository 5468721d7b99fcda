"""A dataset mixture with sampling ratios, as the paper mixes its TVP training data.

Every draw first picks a source with probability proportional to its weight, then a
sample of that source uniformly. The draws are a pure function of (seed, position):
each consumes exactly two PCG64 outputs, so resuming at position ``k`` advances the
generator instead of replaying it, and every process of a distributed run sees the
same global order (accelerate then hands each process its slice of every batch).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from vpp_edge.errors import DataError

_CHUNK = 4096


class MixtureSampler(Sampler[int]):
    """``num_samples`` indices into the concatenation of sources of ``sizes``.

    ``offset`` skips that many draws (resume); the sequence from position ``offset`` on is
    identical to the one a fresh sampler yields after ``offset`` draws.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], num_samples: int, seed: int = 0,
                 offset: int = 0):
        if len(sizes) != len(weights) or not sizes:
            raise DataError(f"mixture needs one weight per source: {len(sizes)} sources, {len(weights)} weights")
        if any(s <= 0 for s in sizes):
            raise DataError(f"every mixture source needs samples, got sizes {list(sizes)}")
        w = np.asarray(weights, dtype=np.float64)
        if np.any(w <= 0) or not np.all(np.isfinite(w)):
            raise DataError(f"mixture weights must be positive, got {list(weights)}")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.cum = np.cumsum(w / w.sum())
        self.cum[-1] = 1.0
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.offset = int(offset)

    @property
    def ratios(self) -> list[float]:
        """Probability of drawing from each source."""
        return np.diff(np.concatenate([[0.0], self.cum])).tolist()

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        bits = np.random.PCG64(self.seed)
        bits.advance(2 * self.offset)
        rng = np.random.Generator(bits)
        left = self.num_samples
        while left > 0:
            n = min(left, _CHUNK)
            u = rng.random((n, 2))
            src = np.minimum(np.searchsorted(self.cum, u[:, 0], side="right"), len(self.sizes) - 1)
            within = np.minimum((u[:, 1] * self.sizes[src]).astype(np.int64), self.sizes[src] - 1)
            yield from (self.starts[src] + within).tolist()
            left -= n
