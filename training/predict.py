"""One predict step on PyTorch, stage by stage, with timings: the reference path that the
exported graphs are checked against and that ``vpp predict`` runs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
import numpy as np
import torch

from vpp_edge.episodes import Episode
from vpp_edge.errors import DataError
from vpp_edge.normalization import to_commands
from vpp_edge.preprocess import prepare_frame, to_model_input
from vpp_edge.tokenizer import InstructionTokenizer

from .models.policy import VPPPolicy

STAGES = ("text", "tvp", "former", "action_head")


@dataclass
class Prediction:
    """The action chunk [T, A] in robot units (de-normalised; commands per the preset's
    ``action_base``), the wall time of each stage in ms, and ``predicted``: the de-normalised
    prediction before the base was added (equal to ``actions`` for ``action_base`` 'none')."""

    actions: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)
    predicted: np.ndarray | None = None


class TorchPredictor:
    """Runs a :class:`VPPPolicy` on camera frames; the instruction's text features are
    computed once per instruction and cached."""

    def __init__(self, policy: VPPPolicy, tokenizer: InstructionTokenizer, device: str | torch.device = "cpu"):
        self.policy = policy.eval().to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self._instruction: str | None = None
        self._text: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.inference_mode()
    def set_instruction(self, instruction: str) -> float:
        """Encode ``instruction`` if it changed; returns the text stage time in ms (0 if cached)."""
        if instruction == self._instruction and self._text is not None:
            return 0.0
        start = time.perf_counter()
        ids, mask = (torch.from_numpy(a).to(self.device) for a in self.tokenizer([instruction]))
        self._text = self.policy.encode_text(ids, mask)
        self._instruction = instruction
        return (time.perf_counter() - start) * 1e3

    @torch.inference_mode()
    def predict(self, frames: np.ndarray, instruction: str, seed: int = 0, state: np.ndarray | None = None) -> Prediction:
        """``frames``: uint8 [V, S, S, 3] (already cropped/resized) -> actions [T, A].

        ``state``: the raw robot state [proprio_dim] of a policy with ``action_head.use_proprio``
        (normalised here with the policy's state statistics; refused without it or for a
        policy that takes none); with the preset's ``action_base`` 'state' the actions are the
        commands relative to it (de-normalised prediction + state, as the official XBot)."""
        p = self.policy.preset
        expected = (p.num_views, p.image_size, p.image_size, 3)
        if frames.shape != expected or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames {list(expected)}, got {frames.dtype} {list(frames.shape)}")
        norm_state = self.policy.normalize_state(state)
        timings = {"text": self.set_instruction(instruction)}
        condition, goal = self._text  # type: ignore[misc]  # set just above
        noise = self.policy.make_noise(1, seed)
        x = torch.from_numpy(to_model_input(frames)).unsqueeze(0).to(self.device)
        t0 = time.perf_counter()
        feats = self.policy.predictive_features(x, condition, noise.tvp.to(self.device))
        t1 = time.perf_counter()
        tokens = self.policy.former(feats)
        t2 = time.perf_counter()
        actions = self.policy.denormalize(self.policy.sample_actions(
            tokens, goal, noise.action.to(self.device), None if norm_state is None else norm_state.to(self.device)))
        t3 = time.perf_counter()
        timings.update(tvp=(t1 - t0) * 1e3, former=(t2 - t1) * 1e3, action_head=(t3 - t2) * 1e3)
        predicted = actions[0].float().cpu().numpy()
        commands = to_commands(predicted, p.action_base, state)
        return Prediction(actions=commands, timings_ms=timings, predicted=predicted)


def episode_frames(episode: Episode, num_views: int, size: int, index: int = 0) -> np.ndarray:
    """The views of one time step of an episode, prepared for the model: uint8 [V, S, S, 3]."""
    if episode.num_views < num_views:
        raise DataError(f"{episode.annotation}: episode has {episode.num_views} camera view(s), "
                        f"the preset needs {num_views}; choose a preset with fewer views")
    return np.stack([prepare_frame(episode.frames(v, [index])[0], size) for v in range(num_views)])

