"""Reader for LeRobot datasets (``codebase_version`` v2.x and v3.0), read with pyarrow.

Layouts (``meta/info.json`` holds the path templates, ``fps`` and ``features``):

* v2.x: one parquet file and one video per camera per episode
  (``data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet``,
  ``videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4``),
  ``meta/episodes.jsonl`` (index, tasks, length) and ``meta/tasks.jsonl``.
* v3.0: many episodes per file (``data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet``,
  ``videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4``); per-episode
  rows in ``meta/episodes/chunk-*/file-*.parquet`` give the data file, the video file and
  the episode's ``from_timestamp``/``to_timestamp`` within it; ``meta/tasks.parquet``.

Cameras are features of dtype ``video`` (decoded with PyAV) or ``image`` (encoded
images inside the parquet rows).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vpp_edge.errors import DataError
from vpp_edge.extras import require
from vpp_edge.files import read_json

from .episode import ArrayFrames, TrainEpisode, VideoFiles, VideoSegments
from .sources import EpisodeRef, SourceConfig, select_views

CAMERA_DTYPES = ("video", "image")


def _pq():
    require("pyarrow", "reading LeRobot datasets")
    import pyarrow.parquet as pq

    return pq


@lru_cache(maxsize=8)
def _read_table(path: Path, columns: tuple[str, ...] | None = None):
    """A parquet table (recently read files stay cached: v3 files hold many episodes)."""
    if not path.is_file():
        raise DataError(f"{path}: parquet file not found")
    try:
        return _pq().read_table(str(path), columns=list(columns) if columns else None)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise DataError(f"{path}: cannot read parquet ({exc})") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: not found (LeRobot v2 metadata)")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {i + 1} is not valid JSON ({exc})") from None
    return rows


def _major_version(info: dict[str, Any], path: Path) -> int:
    version = str(info.get("codebase_version", ""))
    try:
        major = int(version.lstrip("v").split(".")[0])
    except ValueError:
        raise DataError(f"{path}: codebase_version '{version}' is not a LeRobot version") from None
    if major not in (2, 3):
        raise DataError(f"{path}: LeRobot codebase_version '{version}' is not supported (v2.x and v3.0 are)")
    return major


def _vectors(table, key: str, source: str) -> np.ndarray:
    if key not in table.column_names:
        raise DataError(f"{source}: column '{key}' not found; columns: {table.column_names}")
    values = table.column(key).to_pylist()
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{source}: column '{key}' is not numeric") from None
    return arr.reshape(len(values), -1)


def _decode_images(table, key: str, source: str) -> np.ndarray:
    frames = []
    for i, cell in enumerate(table.column(key).to_pylist()):
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        img = cv2.imdecode(np.frombuffer(data or b"", np.uint8), cv2.IMREAD_COLOR) if data else None
        if img is None:
            raise DataError(f"{source}: row {i} of image column '{key}' cannot be decoded")
        frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    return np.stack(frames)


class _Dataset:
    """Parsed ``meta/`` of one LeRobot dataset."""

    def __init__(self, source: SourceConfig):
        self.source = source
        self.root = source.root()
        info_path = self.root / "meta" / "info.json"
        self.info = read_json(info_path, DataError, "is it a LeRobot dataset folder?")
        self.major = _major_version(self.info, info_path)
        features = self.info.get("features") or {}
        self.fps = float(self.info.get("fps") or 0)
        if self.fps <= 0:
            raise DataError(f"{info_path}: 'fps' missing or not positive")
        cameras = [k for k, f in features.items() if isinstance(f, dict) and f.get("dtype") in CAMERA_DTYPES]
        if not cameras:
            raise DataError(f"{info_path}: no camera feature (dtype video or image)")
        self.cameras = [cameras[i] for i in select_views(cameras, source.views, str(info_path))]
        self.camera_dtype = {k: features[k]["dtype"] for k in self.cameras}
        self.action_key = source.action_key or "action"
        if self.action_key not in features:
            raise DataError(f"{info_path}: action feature '{self.action_key}' not found; features: {list(features)}")
        state_key = source.state_key or "observation.state"
        self.state_key = state_key if state_key in features else None
        self.chunks_size = int(self.info.get("chunks_size") or 1000)
        self.tasks = self._tasks()

    def _tasks(self) -> dict[int, str]:
        if self.major == 2:
            path = self.root / "meta" / "tasks.jsonl"
            return {int(r["task_index"]): str(r["task"]) for r in _read_jsonl(path)} if path.is_file() else {}
        path = self.root / "meta" / "tasks.parquet"
        if not path.is_file():
            return {}
        table = _read_table(path)
        names = table.column_names
        text_col = "task" if "task" in names else next((n for n in names if n != "task_index"), None)
        if text_col is None or "task_index" not in names:
            raise DataError(f"{path}: expected a 'task_index' column and the task text")
        return dict(zip((int(i) for i in table.column("task_index").to_pylist()),
                        (str(t) for t in table.column(text_col).to_pylist())))

    def episodes(self) -> list[dict[str, Any]]:
        if self.major == 2:
            return _read_jsonl(self.root / "meta" / "episodes.jsonl")
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise DataError(f"{self.root / 'meta' / 'episodes'}: no episode metadata parquet files")
        rows: list[dict[str, Any]] = []
        for f in files:
            rows.extend(_read_table(f).to_pylist())
        return rows

    def _instruction(self, meta: dict[str, Any], table, name: str) -> str:
        if self.source.instruction:
            return self.source.instruction
        tasks = meta.get("tasks")
        if isinstance(tasks, list) and tasks and isinstance(tasks[0], str):
            return tasks[0]
        if "task_index" in table.column_names and len(table):
            index = int(table.column("task_index")[0].as_py())
            if index in self.tasks:
                return self.tasks[index]
        raise DataError(f"{name}: episode has no task text (set 'instruction' in the source)")

    def load(self, meta: dict[str, Any]) -> TrainEpisode:
        ep = int(meta["episode_index"])
        if self.major == 2:
            chunk = ep // self.chunks_size
            data_path = self.root / self.info["data_path"].format(episode_chunk=chunk, episode_index=ep)
            table = _read_table(data_path)
        else:
            data_path = self.root / self.info["data_path"].format(chunk_index=int(meta["data/chunk_index"]),
                                                                  file_index=int(meta["data/file_index"]))
            table = _read_table(data_path)
            pc = require("pyarrow.compute", "reading LeRobot datasets")
            table = table.filter(pc.equal(table.column("episode_index"), ep))
        name = f"{data_path} (episode {ep})"
        if not len(table):
            raise DataError(f"{name}: no rows for this episode")
        if "frame_index" in table.column_names:
            table = table.sort_by("frame_index")
        actions = _vectors(table, self.action_key, name)
        states = _vectors(table, self.state_key, name) if self.state_key else None
        return TrainEpisode(name=name, instruction=self._instruction(meta, table, name), actions=actions,
                            frames=self._frames(meta, ep, table, name), states=states, source=self.source.label)

    def _frames(self, meta: dict[str, Any], ep: int, table, name: str):
        if all(self.camera_dtype[k] == "image" for k in self.cameras):
            return ArrayFrames([_decode_images(table, k, name) for k in self.cameras], name)
        if any(self.camera_dtype[k] == "image" for k in self.cameras):
            raise DataError(f"{name}: mixing image and video cameras in one source is not supported")
        template = self.info.get("video_path")
        if not template:
            raise DataError(f"{self.root / 'meta' / 'info.json'}: 'video_path' missing")
        if self.major == 2:
            chunk = ep // self.chunks_size
            return VideoFiles([self.root / template.format(episode_chunk=chunk, video_key=k, episode_index=ep)
                               for k in self.cameras])
        segments = []
        for k in self.cameras:
            try:
                path = self.root / template.format(video_key=k, chunk_index=int(meta[f"videos/{k}/chunk_index"]),
                                                   file_index=int(meta[f"videos/{k}/file_index"]))
                segments.append((path, float(meta[f"videos/{k}/from_timestamp"]),
                                 float(meta[f"videos/{k}/to_timestamp"])))
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{name}: episode metadata lacks the video location of '{k}'") from None
        return VideoSegments(segments, self.fps)


def lerobot_refs(source: SourceConfig) -> list[EpisodeRef]:
    """Every episode listed in ``meta/`` as a lazy episode."""
    ds = _Dataset(source)
    refs = []
    for meta in ds.episodes():
        if "episode_index" not in meta:
            raise DataError(f"{ds.root / 'meta'}: episode metadata row without 'episode_index'")
        refs.append(EpisodeRef(f"{ds.root} (episode {meta['episode_index']})", lambda m=meta: ds.load(m)))
    return refs
