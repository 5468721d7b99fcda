"""Thin tracing adapters around the policy's stages: one per exported graph.

Each adapter only reorders arguments or converts the camera layout; every layer is the
policy's own (one model definition for training, export and the PyTorch backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vpp_edge.presets import Preset
from vpp_edge.training.models.edm import ddim_step
from vpp_edge.training.models.policy import VPPPolicy


class TextGraph(nn.Module):
    """token ids, mask [1, L] -> TVP condition [1, L, 2H], goal [1, P]."""

    def __init__(self, policy: VPPPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy.encode_text(input_ids, attention_mask)


class TVPGraph(nn.Module):
    """Camera frames uint8 [1, V, S, S, 3] + condition + noise -> Former input features.

    The uint8 -> [-1, 1] conversion and HWC -> CHW move into the graph, so the runtime
    hands over camera buffers as they are.
    """

    def __init__(self, policy: VPPPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, frames: torch.Tensor, condition: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 1, 4, 2, 3).to(torch.float32) * (2.0 / 255.0) - 1.0
        return self.policy.predictive_features(x, condition, noise)


class FormerGraph(nn.Module):
    """TVP features [1, F, T, C] -> Video Former tokens [1, Q, D]."""

    def __init__(self, policy: VPPPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.policy.former(features)


class ActionContextGraph(nn.Module):
    """Former tokens + goal (+ normalised robot state [1, P] with ``action_head.use_proprio``)
    -> action-head context (once per chunk)."""

    def __init__(self, policy: VPPPolicy):
        super().__init__()
        self.inner = policy.action_head.inner_model

    def forward(self, tokens: torch.Tensor, goal: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.encode(tokens, goal, state)


class ActionStepGraph(nn.Module):
    """One DDIM step: (context, x at sigma, sigma [1], sigma_next [1]) -> x at sigma_next."""

    def __init__(self, policy: VPPPolicy):
        super().__init__()
        self.head = policy.action_head

    def forward(self, context: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                sigma_next: torch.Tensor) -> torch.Tensor:
        denoised = self.head.denoise(context, x, sigma.expand(x.shape[0]))
        return ddim_step(x, denoised, sigma.reshape(1, 1, 1), sigma_next.reshape(1, 1, 1))


class ActionSamplerGraph(nn.Module):
    """The whole fixed-step sampler unrolled: tokens + goal + unit noise (+ normalised robot
    state with ``action_head.use_proprio``) -> normalised actions."""

    def __init__(self, policy: VPPPolicy):
        super().__init__()
        self.head = policy.action_head

    def forward(self, tokens: torch.Tensor, goal: torch.Tensor, noise: torch.Tensor,
                state: torch.Tensor | None = None) -> torch.Tensor:
        return self.head.sample(tokens, goal, noise, state)


STATE_INPUT = "state"  # the normalised robot state [1, proprio_dim], last input of the graphs that take it


@dataclass(frozen=True)
class GraphDef:
    """A graph's adapter and the names of its inputs and outputs (keys of the reference run).

    ``inputs`` are those of every policy; a graph with ``takes_state`` has one more,
    ``state``, when the preset feeds the robot state (``action_head.use_proprio``): use
    :meth:`inputs_for`.
    """

    name: str
    adapter: Callable[[VPPPolicy], nn.Module]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    takes_state: bool = False

    def inputs_for(self, preset: Preset) -> tuple[str, ...]:
        """The graph's inputs for a policy of ``preset``."""
        return (*self.inputs, STATE_INPUT) if self.takes_state and preset.action_head.use_proprio else self.inputs


GRAPHS: dict[str, GraphDef] = {
    g.name: g
    for g in (
        GraphDef("text", TextGraph, ("input_ids", "attention_mask"), ("condition", "goal")),
        GraphDef("tvp", TVPGraph, ("frames", "condition", "noise"), ("features",)),
        GraphDef("former", FormerGraph, ("features",), ("tokens",)),
        GraphDef("action_context", ActionContextGraph, ("tokens", "goal"), ("context",), takes_state=True),
        GraphDef("action_step", ActionStepGraph, ("context", "x", "sigma", "sigma_next"), ("x_next",)),
        GraphDef("action_sampler", ActionSamplerGraph, ("tokens", "goal", "action_noise"), ("actions",),
                 takes_state=True),
    )
}


@torch.inference_mode()
def reference_run(policy: VPPPolicy, input_ids: torch.Tensor, attention_mask: torch.Tensor, frames: torch.Tensor,
                  noise: torch.Tensor, action_noise: torch.Tensor,
                  state: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every graph input and output of one PyTorch predict step, by name.

    ``frames`` is uint8 [1, V, S, S, 3]. The step-graph sample is the sampler's first step.
    ``state``: the normalised robot state [1, P] of a policy with ``action_head.use_proprio``
    (required there, refused otherwise).
    """
    condition, goal = policy.encode_text(input_ids, attention_mask)
    features = TVPGraph(policy)(frames, condition, noise)
    tokens = policy.former(features)
    context = policy.action_head.inner_model.encode(tokens, goal, state)
    sigmas = policy.action_head.sigmas
    x = action_noise * policy.action_head.cfg.sigma_max
    sigma, sigma_next = torch.tensor([sigmas[0]]), torch.tensor([sigmas[1]])
    x_next = ActionStepGraph(policy)(context, x, sigma, sigma_next)
    actions = policy.action_head.sample(tokens, goal, action_noise, state)
    return dict(input_ids=input_ids, attention_mask=attention_mask, frames=frames, noise=noise,
                action_noise=action_noise, condition=condition, goal=goal, features=features, tokens=tokens,
                context=context, x=x, sigma=sigma, sigma_next=sigma_next, x_next=x_next, actions=actions,
                actions_denormalized=policy.denormalize(actions), **({STATE_INPUT: state} if state is not None else {}))
