"""The Python API for embedding a policy in your own loop.

    from vpp_edge.api import Policy

    with Policy.load("artifacts/tiny", instruction="open the drawer") as policy:
        chunk = policy.act([scene_rgb, wrist_rgb], stamp=capture_time)  # any image size
        for t, action in zip(chunk.times(dt=0.1), chunk.actions):
            ...  # send ``action`` (robot units) to the robot at time ``t``

:class:`Policy` loads an export artifact on an engine (TensorRT, ONNX Runtime, OpenVINO
or torch; ``auto`` as ``vpp run``), keeps the instruction's text features cached, takes
one RGB ``uint8`` image per camera view of any size (centre-cropped and resized exactly
as in training) and returns an :class:`ActionChunk` stamped with the observation's time.
``vpp run`` loads the same engine and policy from its runtime config
(``runtime/build.py``, the same ``create_engine``) and adds what a robot needs on top
(cameras, latency compensation, smoothing, the safety gate, the bridge). Errors are :mod:`vpp_edge.errors` classes. numpy only (no torch).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vpp_edge.errors import ConfigError
from vpp_edge.preprocess import prepare_frame
from vpp_edge.presets import Preset
from vpp_edge.runtime.artifact import Artifact
from vpp_edge.runtime.engines import create_engine
from vpp_edge.runtime.engines.base import Engine
from vpp_edge.runtime.policy import RuntimePolicy


@dataclass(frozen=True)
class ActionChunk:
    """The actions one observation produced.

    ``actions``: float32 ``[horizon, action_dim]`` in robot units (de-normalised), the
    first meant for the observation's time; ``stamp``: that observation's time (the clock
    the caller's ``stamp`` used; ``time.monotonic()`` when none was given);
    ``timings_ms``: time per stage of this inference."""

    actions: np.ndarray
    stamp: float
    timings_ms: dict[str, float] = field(default_factory=dict)

    def times(self, dt: float) -> np.ndarray:
        """When each action is due, for actions ``dt`` seconds apart (the robot's control period)."""
        return self.stamp + dt * np.arange(len(self.actions))


class Policy:
    """An export artifact on an inference engine, ready to act (see the module docstring)."""

    def __init__(self, artifact: Artifact, engine: Engine, seed: int = 0, instruction: str | None = None):
        """Wrap a loaded ``engine`` of ``artifact``; :meth:`load` does all of it from a path."""
        self.artifact, self.engine = artifact, engine
        self.runtime = RuntimePolicy(artifact, engine, seed=seed)  # what `vpp run` drives
        if instruction is not None:
            self.set_instruction(instruction)

    @classmethod
    def load(cls, artifact: str | Path | Artifact, backend: str = "auto", precision: str | None = None,
             seed: int = 0, instruction: str | None = None, threads: int = 0) -> Policy:
        """Open ``artifact`` (an export folder, or one opened already) and load it on
        ``backend`` at ``precision`` (default: the backend's). ``seed`` fixes the noise:
        same seed and frames, same actions. ``threads``: CPU inference threads (0: the
        backend's choice; TensorRT has none)."""
        if isinstance(artifact, Artifact):
            opened = artifact
        elif Path(artifact).is_dir():
            opened = Artifact.open(artifact)
        else:
            raise ConfigError(f"no such artifact: {artifact} (make one with 'vpp export')")
        engine = create_engine(opened, backend, precision, threads=threads).load()
        try:
            return cls(opened, engine, seed, instruction)
        except BaseException:
            engine.close()
            raise

    @property
    def preset(self) -> Preset:
        """The model's shapes: ``num_views``, ``image_size``, ``action_dim``, ``action_horizon``."""
        return self.artifact.preset

    @property
    def instruction(self) -> str | None:
        return self.runtime.instruction

    def set_instruction(self, text: str) -> float:
        """Change the task (the text graph runs once per new text); milliseconds spent."""
        return self.runtime.set_instruction(text)

    def prepare(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """One RGB ``uint8 [H, W, 3]`` image per view, any size -> the model's ``[V, S, S, 3]``."""
        views = self.preset.num_views
        if len(frames) != views:
            raise ConfigError(f"the model takes {views} camera view(s), got {len(frames)} image(s)")
        try:
            return np.stack([prepare_frame(np.asarray(f), self.preset.image_size) for f in frames])
        except ValueError as exc:
            raise ConfigError(f"camera image: {exc}") from None

    def act(self, frames: Sequence[np.ndarray], stamp: float | None = None) -> ActionChunk:
        """The action chunk for one observation: ``frames`` as in :meth:`prepare`, captured at
        ``stamp`` (default: now, ``time.monotonic()``)."""
        if self.instruction is None:
            raise ConfigError("set an instruction first (Policy.load(..., instruction=...) or set_instruction)")
        stamp = time.monotonic() if stamp is None else float(stamp)
        chunk = self.runtime.infer(self.prepare(frames))
        return ActionChunk(chunk.actions, stamp, dict(chunk.timings_ms))

    def close(self) -> None:
        """Release the engine (GPU memory, sessions)."""
        self.engine.close()

    def __enter__(self) -> Policy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
