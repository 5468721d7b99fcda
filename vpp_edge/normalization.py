"""Action normalisation statistics, stored with every checkpoint and export artifact.

The action head works in a normalised space; these statistics map its output back to
robot units. Policies that take the robot state (``action_head.use_proprio``) carry state
statistics too (:class:`StateNormalizer`). numpy only: the runtime uses them without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vpp_edge.errors import CheckpointError, VPPError

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


class StateError(VPPError, ValueError):
    """A robot state the policy must not see: wrong shape, NaN/Inf, or far outside its bounds."""


@dataclass(frozen=True)
class StateNormalizer:
    """Proprioceptive-state statistics of a policy that takes the robot state.

    The official real-robot code (``step3_deploy_real_xbot.py`` ``normalize_bound`` with the
    config's ``state_01`` / ``state_99``) maps ``[low, high]`` to ``[-1, 1]`` as
    ``2 (s - low) / (high - low + 1e-8) - 1`` and clips to ``[-1, 1]``; this is that map.

    ``tolerance`` guards the robot: a state more than ``tolerance`` x (high - low) outside
    ``[low, high]`` in any dimension is refused rather than clipped, since it means wrong
    units or a miswired field, not a pose the policy has seen.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]
    tolerance: float = 0.5
    EPS = 1e-8  # the official normalize_bound's eps

    def __post_init__(self) -> None:
        low, high = np.asarray(self.low, np.float64), np.asarray(self.high, np.float64)
        if low.ndim != 1 or low.shape != high.shape or low.size == 0:
            raise CheckpointError("state normalization needs equal-length, non-empty low/high vectors")
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise CheckpointError("state normalization statistics contain NaN or Inf")
        if np.any(high < low):
            raise CheckpointError("state normalization: high must not be below low in any dimension")
        if not (np.isfinite(self.tolerance) and self.tolerance >= 0):
            raise CheckpointError(f"state normalization: tolerance must be >= 0, got {self.tolerance}")

    @property
    def dim(self) -> int:
        return len(self.low)

    def check(self, state: Any) -> np.ndarray:
        """``state`` as float64 [dim] after refusing a wrong shape, NaN/Inf or an out-of-range value
        (:class:`StateError` whose first word names the reason: shape, nonfinite, range)."""
        s = np.asarray(state, dtype=np.float64)
        if s.shape != (self.dim,):
            raise StateError(f"shape: the policy takes a robot state of {self.dim} values, got shape {list(s.shape)}")
        if not np.all(np.isfinite(s)):
            raise StateError(f"nonfinite: robot state has NaN/Inf at {np.flatnonzero(~np.isfinite(s)).tolist()}")
        low, high = np.asarray(self.low), np.asarray(self.high)
        margin = self.tolerance * (high - low)
        out = np.flatnonzero((s < low - margin) | (s > high + margin))
        if out.size:
            i = int(out[0])
            raise StateError(f"range: robot state[{i}] = {s[i]:.4g} is outside [{low[i]:.4g}, {high[i]:.4g}] by more "
                             f"than {self.tolerance:g} x the range ({out.size} value(s) out of range)")
        return s

    def normalize(self, state: Any) -> np.ndarray:
        """Checked state [dim] -> the model's input [dim] float32 in [-1, 1]."""
        return self.scale(self.check(state))

    def scale(self, states: Any) -> np.ndarray:
        """States [..., dim] -> the model's inputs [..., dim] float32 in [-1, 1], clipped and not
        refused, as the official dataset does with recorded training states (a robot's state
        goes through :meth:`normalize`, which refuses first)."""
        s = np.asarray(states, dtype=np.float64)
        low, high = np.asarray(self.low), np.asarray(self.high)
        return np.clip(2.0 * (s - low) / (high - low + self.EPS) - 1.0, -1.0, 1.0).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": "bounds", "low": list(self.low), "high": list(self.high), "tolerance": self.tolerance}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "StateNormalizer | None":
        """None for no statistics (a policy without state input)."""
        if not data:
            return None
        unknown = set(data) - {"mode", "low", "high", "tolerance"}
        if unknown:
            raise CheckpointError(f"state normalization has unknown key(s) {sorted(unknown)}")
        if data.get("mode", "bounds") != "bounds":
            raise CheckpointError(f"state normalization mode '{data.get('mode')}' unknown; allowed: ['bounds'] "
                                  "(the official normalize_bound)")
        return cls(low=tuple(float(v) for v in data.get("low", ())), high=tuple(float(v) for v in data.get("high", ())),
                   tolerance=float(data.get("tolerance", 0.5)))

    @classmethod
    def fit(cls, states: np.ndarray, quantile: float = 0.01) -> "StateNormalizer":
        """Bounds from a [N, P] array of recorded states: the ``quantile`` / 1 - ``quantile``
        quantiles per dimension, as the official configs' ``state_01`` / ``state_99``."""
        states = np.asarray(states, dtype=np.float64).reshape(-1, np.shape(states)[-1])
        if not np.all(np.isfinite(states)):
            raise CheckpointError("cannot fit state bounds: the recorded states contain NaN or Inf")
        low, high = np.quantile(states, quantile, axis=0), np.quantile(states, 1 - quantile, axis=0)
        return cls(low=tuple(float(v) for v in low), high=tuple(float(v) for v in high))


def seeded_state(dim: int, seed: int) -> np.ndarray:
    """A seeded normalised robot state [1, dim] in [-1, 1], float32: what the export's parity
    and calibration, `vpp calibrate` and OpenVINO's INT8 feed a policy that takes a state
    when their data records none of its width (vpp_edge/state_feeds.py uses the recorded ones
    otherwise). One definition, so every gate sees the same states."""
    return np.random.default_rng(10_000 + seed).uniform(-1.0, 1.0, (1, dim)).astype(np.float32)


# ---- what the de-normalised actions are relative to ------------------------------------
#
# The official real-robot XBot policy is trained on actions relative to the robot state
# (policy_models/datasets/xbot_dataset.py: ``actions = command - state[:, :a_dim]``) and its
# deployment turns the prediction back into commands as
# ``denormalize_bound(prediction, action_01, action_99) + state`` (step3_deploy_real_xbot.py
# ``caculate_absolute_action``): the raw state (not the normalised one the policy sees), added
# to every action of the chunk, in every dimension, after de-normalisation and without
# clipping. The preset's ``action_base`` names the rule; this registry is its one definition,
# used by ``vpp predict`` (training/predict.py) and the runtime (runtime/policy.py).

def _no_base(state: np.ndarray | None, action_dim: int) -> np.ndarray:
    return np.zeros(action_dim)


def _state_base(state: np.ndarray | None, action_dim: int) -> np.ndarray:
    if state is None:
        raise StateError("missing: the policy's actions are relative to the robot state (action_base 'state'), "
                         "so every inference needs the state")
    s = np.asarray(state, dtype=np.float64).reshape(-1)
    if s.size < action_dim:
        raise StateError(f"shape: actions relative to the state need at least {action_dim} state values, got {s.size}")
    return s[:action_dim]  # the official action_base = state[:, :a_dim]


#: ``action_base`` rule -> (raw state [P] or None, action_dim) -> the float64 [A] vector the
#: de-normalised actions are relative to.
ACTION_BASES: dict[str, Callable[[np.ndarray | None, int], np.ndarray]] = {
    "none": _no_base,  # the actions are the commands (CALVIN, XHand, MetaWorld)
    "state": _state_base,  # official XBot: commands = actions + state[:A]
}

#: ``action_base`` rule -> what the de-normalised actions are relative to, in words ({A}: the
#: action dimension); what ``vpp predict`` prints and writes to its JSON beside the commands.
ACTION_BASE_MEANINGS: dict[str, str] = {
    "none": "nothing: the predicted actions are the commands",
    "state": "the raw robot state: commands = predicted actions + state[0:{A}]",
}


def describe_action_base(rule: str, action_dim: int) -> str:
    """What rule ``rule`` makes the de-normalised actions relative to, in one line."""
    if rule not in ACTION_BASE_MEANINGS:
        raise CheckpointError(f"action_base '{rule}' unknown; allowed: {sorted(ACTION_BASE_MEANINGS)}")
    return ACTION_BASE_MEANINGS[rule].format(A=action_dim)


def action_base(rule: str, state: np.ndarray | None, action_dim: int) -> np.ndarray:
    """The float64 [action_dim] vector that rule ``rule`` adds to de-normalised actions."""
    if rule not in ACTION_BASES:
        raise CheckpointError(f"action_base '{rule}' unknown; allowed: {sorted(ACTION_BASES)}")
    return ACTION_BASES[rule](state, action_dim)


def to_commands(actions: np.ndarray, rule: str, state: np.ndarray | None) -> np.ndarray:
    """De-normalised actions [..., A] -> the commands the robot executes, float32."""
    return (np.asarray(actions, np.float64) + action_base(rule, state, np.shape(actions)[-1])).astype(np.float32)


def from_commands(commands: np.ndarray, rule: str, state: np.ndarray | None) -> np.ndarray:
    """The inverse of :func:`to_commands` (commands -> de-normalised actions relative to ``state``),
    float32: how commands the robot still executes become the policy's own actions again."""
    return (np.asarray(commands, np.float64) - action_base(rule, state, np.shape(commands)[-1])).astype(np.float32)
