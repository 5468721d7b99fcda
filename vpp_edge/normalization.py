"""Action normalisation statistics, stored with every checkpoint and export artifact.

The action head works in a normalised space; these statistics map its output back to
robot units. numpy only: the runtime de-normalises without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vpp_edge.errors import CheckpointError

MODES = ("identity", "bounds", "mean_std")


@dataclass(frozen=True)
class ActionNormalizer:
    """Affine map between robot actions and the model's normalised actions.

    * ``identity``: actions are already normalised (CALVIN's relative actions in [-1, 1]).
    * ``bounds``: [low, high] (e.g. 1st/99th percentiles) maps to [-1, 1], as the
      official XHand / xbot policies do.
    * ``mean_std``: (a - mean) / std.
    """

    mode: str = "identity"
    low: tuple[float, ...] = field(default_factory=tuple)
    high: tuple[float, ...] = field(default_factory=tuple)
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CheckpointError(f"normalization mode '{self.mode}' unknown; allowed: {list(MODES)}")
        pairs = {"bounds": ("low", "high"), "mean_std": ("mean", "std")}.get(self.mode, ())
        if pairs:
            a, b = (np.asarray(getattr(self, k), dtype=np.float64) for k in pairs)
            if a.ndim != 1 or a.shape != b.shape or a.size == 0:
                raise CheckpointError(f"normalization '{self.mode}' needs equal-length {pairs[0]}/{pairs[1]} vectors")
            if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
                raise CheckpointError(f"normalization '{self.mode}' statistics contain NaN or Inf")
            spread = b - a if self.mode == "bounds" else b
            if np.any(spread <= 0):
                raise CheckpointError(f"normalization '{self.mode}': {pairs[1]} must exceed {pairs[0]} "
                                      "(bounds) or be positive (std) in every dimension")

    @property
    def dim(self) -> int | None:
        """Action dimension the statistics describe (None for identity)."""
        return {"bounds": len(self.low), "mean_std": len(self.mean)}.get(self.mode)

    def scale_offset(self, action_dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset) with ``action = normalised * scale + offset``, float32 [action_dim]."""
        if self.dim not in (None, action_dim):
            raise CheckpointError(f"normalization statistics have {self.dim} dims, the model outputs {action_dim}")
        if self.mode == "bounds":
            low, high = np.asarray(self.low), np.asarray(self.high)
            scale, offset = (high - low) / 2.0, (high + low) / 2.0
        elif self.mode == "mean_std":
            scale, offset = np.asarray(self.std), np.asarray(self.mean)
        else:
            scale, offset = np.ones(action_dim), np.zeros(action_dim)
        return scale.astype(np.float32), offset.astype(np.float32)

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        scale, offset = self.scale_offset(actions.shape[-1])
        return ((actions - offset) / scale).astype(np.float32)

    def denormalize(self, actions: np.ndarray) -> np.ndarray:
        scale, offset = self.scale_offset(actions.shape[-1])
        return (actions * scale + offset).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "low": list(self.low), "high": list(self.high),
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ActionNormalizer":
        if not data:
            return cls()
        unknown = set(data) - {"mode", "low", "high", "mean", "std"}
        if unknown:
            raise CheckpointError(f"normalization has unknown key(s) {sorted(unknown)}")
        return cls(mode=data.get("mode", "identity"),
                   **{k: tuple(float(v) for v in data.get(k, ())) for k in ("low", "high", "mean", "std")})

    @classmethod
    def fit(cls, actions: np.ndarray, mode: str = "bounds", quantile: float = 0.01) -> "ActionNormalizer":
        """Statistics from a [N, A] array of actions (bounds use the q / 1-q quantiles)."""
        actions = np.asarray(actions, dtype=np.float64).reshape(-1, np.shape(actions)[-1])
        if mode == "bounds":
            low, high = np.quantile(actions, quantile, axis=0), np.quantile(actions, 1 - quantile, axis=0)
            high = np.maximum(high, low + 1e-6)  # constant dimensions stay invertible
            return cls(mode="bounds", low=tuple(low), high=tuple(high))
        if mode == "mean_std":
            return cls(mode="mean_std", mean=tuple(actions.mean(0)), std=tuple(np.maximum(actions.std(0), 1e-6)))
        return cls()
