"""One predict step over the exported graphs, whatever engine runs them.

``run(graph_name, feeds) -> outputs`` abstracts the engine (ONNX Runtime, TensorRT, or
PyTorch), so export parity checks, benchmarks and the on-robot runtime chain the stages
the same way. numpy only.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from vpp_edge.graph_spec import ACTION_MODES, GRAPHS, STAGE_OF_GRAPH, STATE_INPUT

GraphRunner = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]
__all__ = ["ACTION_MODES", "STAGE_OF_GRAPH", "GraphRunner", "encode_text", "inpainting_weights", "predict_actions",
           "sample_actions", "timed"]


def call(run: GraphRunner, graph: str, *inputs: np.ndarray, state: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Run ``graph`` on its inputs in the order of its spec (``vpp_edge.graph_spec``; ``state``
    for the graphs that take it) and return its outputs in that order."""
    spec = GRAPHS[graph]
    out = run(graph, spec.feeds(*inputs, **({STATE_INPUT: state} if state is not None and spec.takes_state else {})))
    return tuple(out[name] for name in spec.outputs)


def timed(run: GraphRunner, timings_ms: dict[str, float]) -> GraphRunner:
    """``run`` that adds each call's wall time (ms) to ``timings_ms`` under its stage name."""

    def wrapped(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = run(graph, feeds)
        stage = STAGE_OF_GRAPH.get(graph, graph)
        timings_ms[stage] = timings_ms.get(stage, 0.0) + (time.perf_counter() - start) * 1e3
        return out

    return wrapped


def encode_text(run: GraphRunner, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(condition, goal) for an instruction's tokens; cache them until the instruction changes."""
    condition, goal = call(run, "text", input_ids, attention_mask)
    return condition, goal


def inpainting_weights(overlap: int, delay: int) -> np.ndarray:
    """Real-time-chunking soft mask over the overlap with the previous chunk: 1 for the
    actions that will run while this inference is in flight, then decaying to 0."""
    if overlap <= 0:
        return np.zeros(0, np.float32)
    i = np.arange(overlap)
    fade = 1.0 - (i - delay + 1) / (overlap - delay + 1)
    return np.where(i < delay, 1.0, np.clip(fade, 0.0, 1.0)).astype(np.float32)


def predict_actions(run: GraphRunner, condition: np.ndarray, goal: np.ndarray, frames: np.ndarray,
                    noise: np.ndarray, action_noise: np.ndarray, sigmas: Sequence[float],
                    action_mode: str = "sampler", prefix: np.ndarray | None = None,
                    prefix_weights: np.ndarray | None = None, state: np.ndarray | None = None) -> np.ndarray:
    """Normalised action chunk [1, T, A] from uint8 frames [1, V, S, S, 3] and the noises.

    ``action_mode`` ``sampler`` runs the unrolled sampler graph; ``step`` runs the context
    graph once and the one-step graph ``len(sigmas) - 1`` times.

    With ``prefix`` (normalised actions [k, A] that the previous chunk still has planned
    for this chunk's first k ticks) the sampler inpaints: after every step the first k
    actions are pulled, with ``prefix_weights`` [k], towards the prefix noised to the
    step's noise level, so the new chunk continues what the robot is already doing
    (real-time chunking). Needs the step graph.

    ``state``: the normalised robot state [1, P] for artifacts whose action graphs take
    one (``action_head.use_proprio``); it joins the action-head context.
    """
    (features,) = call(run, "tvp", frames, condition, noise)
    (tokens,) = call(run, "former", features)
    return sample_actions(run, tokens, goal, action_noise, sigmas, action_mode, prefix, prefix_weights, state)


def sample_actions(run: GraphRunner, tokens: np.ndarray, goal: np.ndarray, action_noise: np.ndarray,
                   sigmas: Sequence[float], action_mode: str = "sampler", prefix: np.ndarray | None = None,
                   prefix_weights: np.ndarray | None = None, state: np.ndarray | None = None) -> np.ndarray:
    """The action head of :func:`predict_actions`: the normalised chunk [1, T, A] from the
    Former's tokens (the DDIM step loop of the ``step`` mode lives here only)."""
    if prefix is not None and len(prefix):
        action_mode = "step"
    if action_mode == "sampler":
        return call(run, "action_sampler", tokens, goal, action_noise, state=state)[0]
    if action_mode != "step":
        raise ValueError(f"action_mode '{action_mode}' unknown; allowed: {list(ACTION_MODES)}")
    (context,) = call(run, "action_context", tokens, goal, state=state)
    x = (action_noise * np.float32(sigmas[0])).astype(np.float32)
    k = 0 if prefix is None else min(len(prefix), x.shape[1])
    w = None if not k else (np.ones(k, np.float32) if prefix_weights is None else prefix_weights[:k])[None, :, None]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        (x,) = call(run, "action_step", context, x, np.array([sigma], np.float32),
                    np.array([sigma_next], np.float32))
        if k:
            known = prefix[None, :k] + np.float32(sigma_next) * action_noise[:, :k]
            x = x.copy()
            x[:, :k] = w * known + (1.0 - w) * x[:, :k]
    return x
