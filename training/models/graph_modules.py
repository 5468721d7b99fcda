"""Thin tracing adapters around the policy's stages: one ``nn.Module`` per exported graph
(their names, inputs and outputs: :mod:`vpp_edge.graph_spec`).

Each adapter only reorders arguments or converts the camera layout; every layer is the
policy's own (one model definition for training, export and the PyTorch backend, which
runs these same modules).
"""

from __future__ import annotations

import torch
from torch import nn

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


# graph name (vpp_edge.graph_spec.GRAPHS) -> its adapter
ADAPTERS: dict[str, type[nn.Module]] = {"text": TextGraph, "tvp": TVPGraph, "former": FormerGraph,
                                         "action_context": ActionContextGraph, "action_step": ActionStepGraph,
                                         "action_sampler": ActionSamplerGraph}
