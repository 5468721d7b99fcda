"""A physics simulator behind the bridge: MetaWorld's Sawyer tasks on MuJoCo.

The setpoint is the hand position target in the world frame (m) plus a gripper effort in
[-1, 1]. Each servo tick advances the simulation by one MetaWorld step (5 MuJoCo steps of
2.5 ms) with the MetaWorld action that moves the hand's mocap towards the setpoint, at
most 1 cm per step. The servo rate therefore sets the simulation's speed: 80 Hz is real
time; the robot description runs it at 20 Hz (a quarter of real time), so a small model on
a CPU acts about as often per simulated second as VPP does on the paper's GPU.

Cameras are rendered off-screen (EGL) on a thread of their own from a snapshot of the
simulation state, so rendering never delays the servo loop; the bridge streams them to the
runtime like network cameras. Task success is MetaWorld's own ``info["success"]`` flag.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from vpp_edge.extras import require

from .config import BridgeConfig
from .driver import RobotDriver
from .factory import DRIVERS

# Off-screen rendering; MuJoCo reads this once, when it is first imported.
os.environ.setdefault("MUJOCO_GL", "egl")
MOCAP_STEP = 0.01  # metres per MetaWorld action unit (the environments' action_scale)


@dataclass
class SimStatus:
    """What the evaluation reads back: MetaWorld's verdict, never ours."""

    steps: int = 0
    success: bool = False
    first_success_step: int | None = None
    reward: float = 0.0
    info: dict = field(default_factory=dict)


class MetaWorldDriver(RobotDriver):
    def __init__(self, settings: dict):
        require("metaworld", "the MetaWorld simulator bridge")
        self.task = settings.get("task", "reach-v3")
        self.seed = int(settings.get("seed", 0))
        self.cameras = list(settings.get("cameras", ["corner2", "gripperPOV"]))
        self.image_size = int(settings.get("image_size", 128))
        self.camera_hz = float(settings.get("camera_hz", 10.0))
        self.max_steps = int(settings.get("max_steps", 500))  # MetaWorld itself refuses more than 500
        # MetaWorld's corner cameras are mounted upside down; turn their images upright.
        self.upright = set(settings.get("rotate_180", ["corner", "corner2", "corner3", "corner4"]))
        self._lock = threading.Lock()
        self._env = None
        self._state: tuple[np.ndarray, ...] = ()
        self._renderer = None
        self._gripper = -1.0
        self.observation: np.ndarray | None = None  # MetaWorld's own observation (for its oracle policies)
        self._frames: tuple[np.ndarray, float, int] | None = None
        self._frame_index = 0
        self._render_stop = threading.Event()
        self._render_thread: threading.Thread | None = None
        self._render_error: str | None = None
        self.status = SimStatus()
        self.stopped = False

    # --- episode control (the evaluation harness plays the world) ---------------------------
    def reset_episode(self, seed: int | None = None) -> np.ndarray:
        """A new episode of the task (new object/goal positions); returns the start setpoint."""
        import gymnasium as gym
        import metaworld  # noqa: F401 - registers the Meta-World environments

        with self._lock:
            if self._env is None:
                self._env = gym.make("Meta-World/MT1", env_name=self.task, seed=self.seed, disable_env_checker=True)
                # MT1 holds 50 variants of the task (object and goal positions). Its wrapper
                # draws one on every reset from the generator that the previous episode's seed
                # left behind, so an episode's scene would depend on the episodes before it and
                # `--seed S --episodes 1` would not replay episode S of a longer run. The
                # variant is drawn here from the episode's own seed instead.
                self._env.get_wrapper_attr("toggle_sample_tasks_on_reset")(False)
            variants = self._env.get_wrapper_attr("tasks")
            self._env.unwrapped.set_task(variants[np.random.default_rng(seed).integers(len(variants))])
            self.observation, _ = self._env.reset(seed=seed)
            self._gripper = -1.0
            self.status = SimStatus()
            self._frames = None
            self._snapshot()
            return self._setpoint()

    def _setpoint(self) -> np.ndarray:
        return np.array([*self._env.unwrapped.data.mocap_pos[0], self._gripper])

    def setpoint(self) -> np.ndarray:
        """The current setpoint: hand (mocap) target xyz and the last gripper effort."""
        with self._lock:
            return self._setpoint()

    def _snapshot(self) -> None:
        data = self._env.unwrapped.data
        self._state = (data.qpos.copy(), data.qvel.copy(), data.mocap_pos.copy(), data.mocap_quat.copy())
        self._snapshot_time = time.monotonic()

    # --- RobotDriver -------------------------------------------------------------------------
    def connect(self) -> np.ndarray:
        setpoint = self.reset_episode(self.seed) if self._env is None else self.setpoint()
        if self._render_thread is None:
            self._render_thread = threading.Thread(target=self._render_loop, name="metaworld-render", daemon=True)
            self._render_thread.start()
        self.stopped = False
        return setpoint

    def servo(self, setpoint: np.ndarray) -> None:
        with self._lock:
            env = self._env
            if self.status.steps >= min(self.max_steps, env.unwrapped.max_path_length):  # episode over: freeze
                return
            delta = (np.asarray(setpoint[:3]) - env.unwrapped.data.mocap_pos[0]) / MOCAP_STEP
            action = np.clip(np.array([*delta, setpoint[3]]), -1.0, 1.0).astype(np.float32)
            self._gripper = float(action[3])
            self.observation, reward, _, _, info = env.step(action)
            self.status.steps += 1
            self.status.reward = float(reward)
            self.status.info = {k: float(v) for k, v in info.items() if np.isscalar(v)}
            if info.get("success") and not self.status.success:
                self.status.success, self.status.first_success_step = True, self.status.steps
            self._snapshot()
        self.stopped = False

    def read_state(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            data = self._env.unwrapped.data
            return data.qpos[:9].copy(), np.array([*self._env.unwrapped.tcp_center, data.qpos[7] - data.qpos[8]])

    def stop(self) -> None:
        self.stopped = True  # the servo loop stops calling servo(): the simulation pauses

    def disconnect(self) -> None:
        self._render_stop.set()
        if self._render_thread is not None:
            self._render_thread.join(timeout=2.0)
        if self._renderer is not None and self._render_thread is None:  # rendered synchronously
            self._renderer.close()
            self._renderer = None
        with self._lock:
            if self._env is not None:
                self._env.close()

    def events(self) -> list[tuple[str, str]]:
        if self._render_error:
            error, self._render_error = self._render_error, None
            return [("camera_error", error)]
        return []

    # --- cameras -----------------------------------------------------------------------------
    def take_frames(self) -> tuple[np.ndarray, float, int] | None:
        """The newest rendered views ``uint8 [V, S, S, 3]``, their sim-state time and index (once)."""
        with self._lock:
            frames, self._frames = self._frames, None
        return frames

    def render(self) -> np.ndarray:
        """Render every camera now from the latest simulation snapshot: uint8 [V, S, S, 3].

        Call from one thread only (the GL context belongs to the thread that first renders).
        """
        import mujoco

        model = self._env.unwrapped.model
        if self._renderer is None:
            model.vis.quality.shadowsize = 0  # shadows cost more than the rest of the frame in software GL
            self._renderer = mujoco.Renderer(model, self.image_size, self.image_size)
            self._render_data = mujoco.MjData(model)
        data = self._render_data
        with self._lock:  # render a snapshot so physics can go on meanwhile
            data.qpos[:], data.qvel[:], data.mocap_pos[:], data.mocap_quat[:] = self._state
        mujoco.mj_forward(model, data)
        views = []
        for camera in self.cameras:
            self._renderer.update_scene(data, camera=camera)
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            image = self._renderer.render()
            views.append(np.ascontiguousarray(image[::-1, ::-1] if camera in self.upright else image))
        return np.stack(views)

    def _render_loop(self) -> None:
        period, next_t = 1.0 / self.camera_hz, time.monotonic()
        try:
            while not self._render_stop.is_set():
                with self._lock:
                    stamp = self._snapshot_time
                views = self.render()
                with self._lock:
                    self._frame_index += 1
                    self._frames = (views, stamp, self._frame_index)
                next_t += period
                self._render_stop.wait(max(0.0, next_t - time.monotonic()))
        except Exception as exc:  # reported through events(); the runtime sees the frames age
            self._render_error = f"{type(exc).__name__}: {exc}"
        finally:
            if self._renderer is not None:
                self._renderer.close()
                self._renderer = None


@DRIVERS.register("metaworld")
def _build(cfg: BridgeConfig) -> RobotDriver:
    return MetaWorldDriver(cfg.driver)
