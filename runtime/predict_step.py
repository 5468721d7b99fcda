"""One predict step over the exported graphs, whatever engine runs them.

``run(graph_name, feeds) -> outputs`` abstracts the engine (ONNX Runtime, TensorRT, or
PyTorch), so export parity checks, benchmarks and the on-robot runtime chain the stages
the same way. numpy only.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

GraphRunner = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]
ACTION_MODES = ("sampler", "step")
STAGE_OF_GRAPH = {"text": "text", "tvp": "tvp", "former": "former", "action_context": "action_head",
                  "action_step": "action_head", "action_sampler": "action_head"}


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
    out = run("text", {"input_ids": input_ids, "attention_mask": attention_mask})
    return out["condition"], out["goal"]


def predict_actions(run: GraphRunner, condition: np.ndarray, goal: np.ndarray, frames: np.ndarray,
                    noise: np.ndarray, action_noise: np.ndarray, sigmas: Sequence[float],
                    action_mode: str = "sampler") -> np.ndarray:
    """Normalised action chunk [1, T, A] from uint8 frames [1, V, S, S, 3] and the noises.

    ``action_mode`` ``sampler`` runs the unrolled sampler graph; ``step`` runs the context
    graph once and the one-step graph ``len(sigmas) - 1`` times.
    """
    features = run("tvp", {"frames": frames, "condition": condition, "noise": noise})["features"]
    tokens = run("former", {"features": features})["tokens"]
    if action_mode == "sampler":
        return run("action_sampler", {"tokens": tokens, "goal": goal, "action_noise": action_noise})["actions"]
    if action_mode != "step":
        raise ValueError(f"action_mode '{action_mode}' unknown; allowed: {list(ACTION_MODES)}")
    context = run("action_context", {"tokens": tokens, "goal": goal})["context"]
    x = (action_noise * np.float32(sigmas[0])).astype(np.float32)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        feeds = {"context": context, "x": x, "sigma": np.array([sigma], np.float32),
                 "sigma_next": np.array([sigma_next], np.float32)}
        x = run("action_step", feeds)["x_next"]
    return x
