"""The policy as the robot runs it: instruction -> cached text features; camera frames
-> a de-normalised action chunk, through any engine. numpy only."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from vpp_edge.errors import VPPError
from vpp_edge.normalization import StateError, from_commands, to_commands

from .artifact import Artifact
from .engines.base import Engine
from .predict_step import encode_text, inpainting_weights, predict_actions, timed


class EngineOutputError(VPPError):
    """An engine produced NaN/Inf or a wrong shape: the chunk must not reach the robot."""


@dataclass
class Chunk:
    actions: np.ndarray  # [T, A] float32, robot units
    normalized: np.ndarray  # [T, A] float32, the model's space
    timings_ms: dict[str, float] = field(default_factory=dict)


class RuntimePolicy:
    """Wraps an engine with the tokenizer, noise, sampler schedule and action statistics."""

    def __init__(self, artifact: Artifact, engine: Engine, seed: int = 0):
        self.artifact = artifact
        self.engine = engine
        self.preset = artifact.preset
        self.tokenizer = artifact.tokenizer()
        self.scale, self.offset = artifact.normalizer.scale_offset(self.preset.action_dim)
        self.noise_shape = artifact.input_spec("tvp", "noise").shape
        self.action_shape = (1, self.preset.action_horizon, self.preset.action_dim)
        self.frame_shape = (self.preset.num_views, self.preset.image_size, self.preset.image_size, 3)
        self.rng = np.random.default_rng(seed)
        self.instruction: str | None = None
        self._text: tuple[np.ndarray, np.ndarray] | None = None

    def set_instruction(self, instruction: str) -> float:
        """Tokenize and run the text graph when the instruction changes; ms spent (0 if cached)."""
        if instruction == self.instruction and self._text is not None:
            return 0.0
        start = time.perf_counter()
        ids, mask = self.tokenizer([instruction])
        self._text = encode_text(self.engine.run, ids, mask)
        self.instruction = instruction
        return (time.perf_counter() - start) * 1e3

    @property
    def takes_state(self) -> bool:
        """Whether the policy needs the robot state with every inference (``action_head.use_proprio``)."""
        return self.artifact.state_normalizer is not None

    def infer(self, frames: np.ndarray, noise: np.ndarray | None = None, action_noise: np.ndarray | None = None,
              prefix: np.ndarray | None = None, delay_steps: int = 0, state: np.ndarray | None = None) -> Chunk:
        """uint8 frames [V, S, S, 3] -> action chunk; noise drawn from the seeded generator.

        ``state``: the raw robot state [proprio_dim] for a policy that takes one; checked
        (shape, finite, range: :class:`~vpp_edge.normalization.StateError`) and normalised with
        the artifact's state bounds, as the official real-robot code does. With the preset's
        ``action_base`` 'state' the chunk's actions are the de-normalised prediction plus this
        raw state (the official XBot commands).

        ``prefix``: actions (robot units, [k, A]) the robot will still execute at this
        chunk's first k ticks; the sampler inpaints them (real-time chunking), holding the
        first ``delay_steps`` firmly and letting the rest fade.
        """
        if self._text is None:
            raise VPPError("set an instruction before the first inference")
        if frames.shape != self.frame_shape or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames {list(self.frame_shape)}, got {frames.dtype} {list(frames.shape)}")
        norm_state = None
        if self.takes_state:
            if state is None:
                raise StateError(f"missing: the policy takes the robot state ({self.artifact.state_normalizer.dim} "
                                 "values) with every inference")
            norm_state = self.artifact.state_normalizer.normalize(state)[None]
        elif state is not None:
            raise ValueError("this policy takes no robot state (its preset's action_head.use_proprio is false)")
        noise = self.rng.standard_normal(self.noise_shape, dtype=np.float32) if noise is None else noise
        action_noise = (self.rng.standard_normal(self.action_shape, dtype=np.float32)
                        if action_noise is None else action_noise)
        timings: dict[str, float] = {}
        condition, goal = self._text
        rule = self.preset.action_base  # robot units = to_commands(normalised * scale + offset)
        known = (None if prefix is None or not len(prefix)
                 else ((from_commands(prefix, rule, state) - self.offset) / self.scale).astype(np.float32))
        weights = None if known is None else inpainting_weights(len(known), delay_steps)
        normalized = predict_actions(timed(self.engine.run, timings), condition, goal, frames[None], noise,
                                     action_noise, self.artifact.sigmas, self.artifact.action_mode, known,
                                     weights, norm_state)[0]
        if normalized.shape != self.action_shape[1:] or not np.all(np.isfinite(normalized)):
            raise EngineOutputError(f"engine '{self.engine.backend}' returned an invalid chunk "
                                    f"(shape {normalized.shape}, finite={bool(np.all(np.isfinite(normalized)))})")
        actions = to_commands(normalized * self.scale + self.offset, rule, state)
        return Chunk(actions=actions, normalized=normalized.astype(np.float32), timings_ms=timings)
