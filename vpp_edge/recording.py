"""``vpp run --record DIR``: the run as a LeRobot v3.0 dataset that ``vpp train`` reads
(``--set 'data.sources=[{format: lerobot, path: DIR}]'``), so on-robot rollouts feed
the next training run.

One step per control tick that sent a target: the cameras' newest frames (as the model
saw them: cropped and resized to its input size), the robot state the bridge reported
(its joints, or its setpoint when it reports none), the action sent (robot units, after
the safety gate) and the instruction as the episode's task. The recorder is a
:class:`~vpp_edge.runtime.metrics.Metrics` sink: it runs on the metrics thread, never on
the control thread; it keeps the episode in memory (about 0.4 MB per step for two
256 x 256 views) and writes it at the end of the run.

Layout written (LeRobot ``codebase_version`` v3.0; one episode per folder)::

    meta/info.json                          fps, features, path templates
    meta/tasks.parquet                      task_index, task
    meta/episodes/chunk-000/file-000.parquet  the episode: length, data file, video segments
    data/chunk-000/file-000.parquet         observation.state, action, timestamp, indices
    videos/observation.images.view<N>/chunk-000/file-000.mp4
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vpp_edge.errors import ConfigError
from vpp_edge.extras import require
from vpp_edge.runtime.cameras.base import StaleFrameError

DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"


class EpisodeRecorder:
    """Collects the steps of one run (``__call__`` takes each metrics record) and
    :meth:`write` s them as a LeRobot v3.0 dataset into ``out``."""

    def __init__(self, out: str | Path, cameras: Sequence[Any], instruction: str, fps: float, robot: str = ""):
        self.out, self.cameras, self.instruction, self.fps, self.robot = Path(out), cameras, instruction, fps, robot
        if self.out.exists() and any(self.out.iterdir()):
            raise ConfigError(f"--record {self.out}: the folder exists and is not empty (one episode per folder)")
        require("pyarrow", "recording a run as a LeRobot dataset (--record)")
        self.frames: list[np.ndarray] = []  # [V, S, S, 3] per step
        self.states: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.skipped = 0  # ticks that sent a target but had no frame or no state to pair it with

    def __call__(self, record: Mapping[str, Any]) -> None:
        if record.get("record") != "tick" or record.get("target") is None:
            return
        state = record.get("state")
        try:
            frames = np.concatenate([cam.latest(float("inf")).image for cam in self.cameras])
        except StaleFrameError:  # no frame yet: nothing to pair this action with
            frames = None
        if frames is None or not state:
            self.skipped += 1
            return
        self.frames.append(frames)
        self.states.append(np.asarray(state.get("joints") or state["target"], np.float32))
        self.actions.append(np.asarray(record["target"], np.float32))

    def __len__(self) -> int:
        return len(self.actions)

    def write(self) -> Path:
        """Write the episode; :class:`ConfigError` if the run recorded no step."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from vpp_edge.episodes import write_video

        n = len(self.actions)
        if not n:
            raise ConfigError(f"--record {self.out}: the run sent no target with a camera frame and a robot "
                              f"state: nothing recorded")
        views = self.frames[0].shape[0]
        cameras = [f"observation.images.view{v}" for v in range(views)]
        size = list(self.frames[0].shape[1:])
        states, actions = np.stack(self.states), np.stack(self.actions)
        features: dict[str, Any] = {cam: {"dtype": "video", "shape": size, "names": ["height", "width", "channel"],
                                          "info": {"video.fps": self.fps, "video.codec": "mpeg4"}} for cam in cameras}
        features |= {"observation.state": {"dtype": "float32", "shape": [states.shape[1]]},
                     "action": {"dtype": "float32", "shape": [actions.shape[1]]},
                     **{k: {"dtype": dtype, "shape": [1]} for k, dtype in (
                         ("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                         ("index", "int64"), ("task_index", "int64"))}}
        info = {"codebase_version": "v3.0", "robot_type": self.robot, "fps": self.fps, "chunks_size": 1000,
                "total_episodes": 1, "total_frames": n, "total_tasks": 1, "data_path": DATA_PATH,
                "video_path": VIDEO_PATH, "features": features, "source": "vpp run --record"}
        (self.out / "meta" / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
        (self.out / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
        (self.out / "meta" / "info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        pq.write_table(pa.table({"task_index": [0], "task": [self.instruction]}), self.out / "meta" / "tasks.parquet")
        pq.write_table(pa.table({
            "observation.state": states.tolist(), "action": actions.tolist(),
            "timestamp": (np.arange(n) / self.fps).astype(np.float32), "frame_index": np.arange(n),
            "episode_index": np.zeros(n, np.int64), "index": np.arange(n), "task_index": np.zeros(n, np.int64),
        }), self.out / DATA_PATH.format(chunk_index=0, file_index=0))
        episode: dict[str, list] = {"episode_index": [0], "tasks": [[self.instruction]], "length": [n],
                                    "data/chunk_index": [0], "data/file_index": [0],
                                    "dataset_from_index": [0], "dataset_to_index": [n]}
        for v, cam in enumerate(cameras):
            path = self.out / VIDEO_PATH.format(video_key=cam, chunk_index=0, file_index=0)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_video(path, [f[v] for f in self.frames], self.fps)
            episode |= {f"videos/{cam}/chunk_index": [0], f"videos/{cam}/file_index": [0],
                        f"videos/{cam}/from_timestamp": [0.0], f"videos/{cam}/to_timestamp": [n / self.fps]}
        pq.write_table(pa.table(episode), self.out / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
        return self.out
