"""The interface of every exported graph: its name, its inputs and outputs (by name, in the
order the graph takes and returns them) and the predict-step stage its time counts to.

One definition for export (which traces the graphs under these names), calibration, the
runtime (which feeds them) and the reports. Shapes are not here: they follow from the preset
and are recorded per graph in the artifact's manifest. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STATE_INPUT = "state"  # the normalised robot state [1, P]: last input of the graphs that take it
STAGES = ("text", "tvp", "former", "action_head")  # the predict step's stages, in order
ACTION_MODES = ("sampler", "step")  # the unrolled sampler graph, or the context graph + one graph per DDIM step


@dataclass(frozen=True)
class GraphSpec:
    """One graph's interface. A graph with ``takes_state`` has one more input, ``state``,
    when the policy feeds the robot state (a preset with ``action_head.use_proprio``)."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    stage: str
    takes_state: bool = False

    def inputs_for(self, with_state: bool) -> tuple[str, ...]:
        """The inputs of this graph for a policy that takes the robot state or not."""
        return (*self.inputs, STATE_INPUT) if self.takes_state and with_state else self.inputs

    def feeds(self, *values: Any, **extra: Any) -> dict[str, Any]:
        """``{input name: value}`` from the values in input order (``extra``: named ones, the state)."""
        if len(values) != len(self.inputs):
            raise ValueError(f"graph '{self.name}' takes {list(self.inputs)}, got {len(values)} value(s)")
        return {**dict(zip(self.inputs, values)), **extra}


GRAPHS: dict[str, GraphSpec] = {g.name: g for g in (
    GraphSpec("text", ("input_ids", "attention_mask"), ("condition", "goal"), "text"),
    GraphSpec("tvp", ("frames", "condition", "noise"), ("features",), "tvp"),
    GraphSpec("former", ("features",), ("tokens",), "former"),
    GraphSpec("action_context", ("tokens", "goal"), ("context",), "action_head", takes_state=True),
    GraphSpec("action_step", ("context", "x", "sigma", "sigma_next"), ("x_next",), "action_head"),
    GraphSpec("action_sampler", ("tokens", "goal", "action_noise"), ("actions",), "action_head", takes_state=True),
)}
GRAPH_NAMES = tuple(GRAPHS)
# The graphs each action mode runs (the other action-head graphs sit idle in that mode).
ACTION_MODE_GRAPHS = {"sampler": ("action_sampler",), "step": ("action_context", "action_step")}
STAGE_OF_GRAPH = {name: g.stage for name, g in GRAPHS.items()}
