"""The exported graphs for tracing: each graph's spec (:mod:`vpp_edge.graph_spec`) with its
adapter module (:mod:`vpp_edge.training.models.graph_modules`), and the reference run that
gives every graph input and output of one PyTorch predict step by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vpp_edge.graph_spec import GRAPHS as SPECS
from vpp_edge.graph_spec import STATE_INPUT, GraphSpec
from vpp_edge.presets import Preset
from vpp_edge.training.models.graph_modules import ADAPTERS, ActionStepGraph, TVPGraph
from vpp_edge.training.models.policy import VPPPolicy

@dataclass(frozen=True)
class GraphDef:
    """A graph's spec (names of its inputs and outputs: keys of the reference run) and its
    adapter. ``inputs`` are those of every policy; a graph with ``takes_state`` has one more,
    ``state``, when the preset feeds the robot state (``action_head.use_proprio``): use
    :meth:`inputs_for`."""

    spec: GraphSpec
    adapter: Callable[[VPPPolicy], nn.Module]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.spec.inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.spec.outputs

    @property
    def takes_state(self) -> bool:
        return self.spec.takes_state

    def inputs_for(self, preset: Preset) -> tuple[str, ...]:
        """The graph's inputs for a policy of ``preset``."""
        return self.spec.inputs_for(preset.action_head.use_proprio)


GRAPHS: dict[str, GraphDef] = {name: GraphDef(spec, ADAPTERS[name]) for name, spec in SPECS.items()}


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
