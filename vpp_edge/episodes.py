"""Robot episodes in the official VPP sample format.

A dataset folder holds ``annotation/<split>/<id>.json`` (``texts``, ``videos`` with
``video_path`` relative to the dataset folder, per-step ``state``/``action`` or
``states``/``actions``) and the videos they point to. Videos are decoded with PyAV
(FFmpeg). numpy only: the runtime's replay camera reads episodes with this module too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from vpp_edge.errors import DataError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def find_samples_dir() -> Path | None:
    """``$VPP_SAMPLES``, else ``shared/vpp_samples`` beside the repository, else None."""
    env = os.environ.get("VPP_SAMPLES")
    if env:
        return Path(env) if Path(env).is_dir() else None
    repo = Path(__file__).resolve().parents[1]
    for candidate in (repo.parent / "shared" / "vpp_samples", repo / "shared" / "vpp_samples"):
        if candidate.is_dir():
            return candidate
    return None


def decode_video(path: str | Path, indices: list[int] | None = None) -> np.ndarray:
    """RGB frames uint8 [T, H, W, 3] of a video (all, or the given frame indices)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: video file not found")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.FFmpegError, IndexError) as exc:
        raise DataError(f"{path}: cannot decode video ({exc})") from None
    if not frames:
        raise DataError(f"{path}: video has no frames")
    video = np.stack(frames)
    if indices is None:
        return video
    bad = [i for i in indices if not -len(video) <= i < len(video)]
    if bad:
        raise DataError(f"{path}: frame index {bad[0]} out of range (video has {len(video)} frames)")
    return video[indices]


def video_fps(path: str | Path) -> float:
    """Recorded frame rate of a video (its average rate)."""
    try:
        with av.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
    except (av.FFmpegError, IndexError) as exc:
        raise DataError(f"{path}: cannot read video header ({exc})") from None
    return float(rate) if rate else 0.0


@dataclass(frozen=True)
class Episode:
    """One episode: instruction, camera videos (one per view) and optional states/actions."""

    annotation: Path
    episode_id: str
    instruction: str
    video_paths: tuple[Path, ...]
    states: np.ndarray | None = None
    actions: np.ndarray | None = None

    @property
    def num_views(self) -> int:
        return len(self.video_paths)

    def frames(self, view: int, indices: list[int] | None = None) -> np.ndarray:
        """Decoded RGB frames of one view."""
        return decode_video(self.video_paths[view], indices)

    def fps(self) -> float:
        return video_fps(self.video_paths[0])


def _array(data: object, name: str, source: Path) -> np.ndarray | None:
    if data is None:
        return None
    try:
        arr = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{source}: '{name}' is not a numeric array") from None
    if arr.ndim != 2:
        raise DataError(f"{source}: '{name}' must be [steps, dims], got shape {arr.shape}")
    return arr


def load_episode(annotation: str | Path, extra_views: bool = True) -> Episode:
    """Read an annotation JSON; with ``extra_views``, other videos in the episode's video
    folder are appended after the annotated ones (the XHand samples have a third camera)."""
    annotation = Path(annotation)
    try:
        meta = json.loads(annotation.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{annotation}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{annotation}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{annotation}: expected a JSON object")
    root = annotation.parent.parent.parent  # <dataset>/annotation/<split>/<id>.json
    texts = meta.get("texts") or []
    if not texts or not isinstance(texts[0], str):
        raise DataError(f"{annotation}: 'texts' must list at least one instruction")
    try:
        videos = [root / v["video_path"] for v in meta["videos"]]
    except (KeyError, TypeError):
        raise DataError(f"{annotation}: 'videos' must be a list of {{'video_path': ...}}") from None
    if not videos:
        raise DataError(f"{annotation}: no videos listed")
    for v in videos:
        if not v.is_file():
            raise DataError(f"{annotation}: video {v} not found")
    if extra_views:
        folder = videos[0].parent
        listed = {v.resolve() for v in videos}
        videos += sorted(p for p in folder.iterdir() if p.suffix in VIDEO_SUFFIXES and p.resolve() not in listed)
    states = _array(meta.get("states", meta.get("state")), "states", annotation)
    actions = _array(meta.get("actions", meta.get("action")), "actions", annotation)
    for name, arr in (("states", states), ("actions", actions)):
        if arr is not None and not np.all(np.isfinite(arr)):
            raise DataError(f"{annotation}: '{name}' contains NaN or Inf")
    return Episode(annotation=annotation, episode_id=str(meta.get("episode_id", annotation.stem)),
                   instruction=texts[0], video_paths=tuple(videos), states=states, actions=actions)


def list_episodes(dataset: str | Path, split: str = "val") -> list[Path]:
    """Annotation files of a dataset folder, in numeric id order."""
    folder = Path(dataset) / "annotation" / split
    if not folder.is_dir():
        raise DataError(f"{dataset}: no 'annotation/{split}' folder (is it in the VPP sample format?)")
    files = list(folder.glob("*.json"))
    return sorted(files, key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.stem))


def write_video(path: str | Path, frames: list[np.ndarray] | np.ndarray, fps: float) -> None:
    """RGB uint8 frames [T, H, W, 3] -> an MPEG-4 video (PyAV)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=round(fps))
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_episode(dataset: str | Path, episode_id: int, instruction: str, views: list[np.ndarray],
                  states: np.ndarray, actions: np.ndarray, fps: float, split: str = "val",
                  extra: dict | None = None) -> Path:
    """Write one episode in the sample format (one video per view); returns the annotation path.

    ``views`` are RGB uint8 [T, H, W, 3] arrays; ``states``/``actions`` are [T, dims].
    """
    dataset = Path(dataset)
    lengths = {len(v) for v in views} | {len(states), len(actions)}
    if len(lengths) != 1:
        raise DataError(f"episode {episode_id}: views, states and actions differ in length ({sorted(lengths)})")
    video_dir = dataset / "videos" / split / str(episode_id)
    video_dir.mkdir(parents=True, exist_ok=True)
    (dataset / "annotation" / split).mkdir(parents=True, exist_ok=True)
    for v, frames in enumerate(views):
        write_video(video_dir / f"{v}.mp4", frames, fps)
    annotation = {"task": "robot_trajectory_prediction", "texts": [instruction],
                  "videos": [{"video_path": f"videos/{split}/{episode_id}/{v}.mp4"} for v in range(len(views))],
                  "episode_id": episode_id, "video_length": len(states),
                  "states": np.asarray(states).tolist(), "actions": np.asarray(actions).tolist(), **(extra or {})}
    path = dataset / "annotation" / split / f"{episode_id}.json"
    path.write_text(json.dumps(annotation), encoding="utf-8")
    return path
