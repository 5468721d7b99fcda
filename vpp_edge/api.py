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
``vpp run`` drives the same object: :class:`Policy` is the runtime's ``LoadedPolicy``
(``runtime/build.py``, loaded by the same ``load_policy``), and ``vpp run`` adds what a
robot needs on top (cameras, latency compensation, smoothing, the safety gate, the
bridge). Errors are :mod:`vpp_edge.errors` classes. numpy only (no torch).
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
from vpp_edge.runtime.build import LoadedPolicy, load_policy
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


class Policy(LoadedPolicy):
    """An export artifact on an inference engine, ready to act (see the module docstring):
    the runtime's :class:`~vpp_edge.runtime.build.LoadedPolicy` with the embedding API."""

    def __init__(self, engine: Engine, runtime: RuntimePolicy):
        """Wrap a loaded ``engine`` and its policy; :meth:`load` does all of it from a path."""
        super().__init__(engine, runtime)
        self.artifact: Artifact = runtime.artifact

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
        policy = load_policy(opened, backend, precision, threads, seed, cls=cls)
        try:
            if instruction is not None:
                policy.set_instruction(instruction)
            return policy
        except BaseException:
            policy.close()
            raise

    @property
    def preset(self) -> Preset:
        """The model's shapes: ``num_views``, ``image_size``, ``action_dim``, ``action_horizon``."""
        return self.artifact.preset

    @property
    def instruction(self) -> str | None:
        return self.runtime.instruction

    def prepare(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """One RGB ``uint8 [H, W, 3]`` image per view, any size -> the model's ``[V, S, S, 3]``."""
        views = self.preset.num_views
        if len(frames) != views:
            raise ConfigError(f"the model takes {views} camera view(s), got {len(frames)} image(s)")
        try:
            return np.stack([prepare_frame(np.asarray(f), self.preset.image_size) for f in frames])
        except ValueError as exc:
            raise ConfigError(f"camera image: {exc}") from None

    def act(self, frames: Sequence[np.ndarray], stamp: float | None = None,
            state: np.ndarray | None = None) -> ActionChunk:
        """The action chunk for one observation: ``frames`` as in :meth:`prepare`, captured at
        ``stamp`` (default: now, ``time.monotonic()``). ``state``: the raw robot state at that
        time, for a policy that takes one (``preset.action_head.use_proprio``, e.g. the official
        XBot; refused otherwise); with ``preset.action_base`` 'state' the actions are commands
        relative to it (prediction + state), as the official deployment sends."""
        if self.instruction is None:
            raise ConfigError("set an instruction first (Policy.load(..., instruction=...) or set_instruction)")
        stamp = time.monotonic() if stamp is None else float(stamp)
        chunk = self.runtime.infer(self.prepare(frames), state=state)
        return ActionChunk(chunk.actions, stamp, dict(chunk.timings_ms))
