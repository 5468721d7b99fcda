"""Small datasets written by the training tests themselves: the official sample format,
LeRobot v2.1 and v3.0, and CALVIN. Frames encode (episode, step) in their colour so a
reader that returns the wrong frames is caught. (No tests in this module: helpers only.)
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np


def frame_value(episode: int, step: int) -> int:
    """Red level of frame ``step`` of ``episode`` (distinct, decodes within a few levels)."""
    return (40 + 60 * episode + 12 * step) % 250


def make_frames(episode: int, steps: int, size: int = 32, view: int = 0) -> np.ndarray:
    frames = np.zeros((steps, size, size, 3), np.uint8)
    for t in range(steps):
        frames[t, :, :, 0] = frame_value(episode, t)
        frames[t, :, :, 1] = 80 + 60 * view
        if size >= 16:
            x = (t * 3) % (size - 8)
            frames[t, 8:16, x:x + 8, 2] = 255  # a moving block
    return frames


def write_video(path: Path, frames: np.ndarray, fps: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_actions(episode: int, steps: int, dim: int = 7) -> np.ndarray:
    t = np.arange(steps)[:, None]
    return np.sin(0.3 * t + np.arange(dim)[None] + episode).astype(np.float32) * (1 + np.arange(dim))[None]


def write_official(root: Path, episodes: int = 3, steps: int = 12, size: int = 32, dim: int = 7,
                   views: int = 2, split: str = "val") -> list[Path]:
    """``root/annotation/<split>/<i>.json`` + ``root/videos/<split>/<i>/<view>.mp4``."""
    paths = []
    (root / "annotation" / split).mkdir(parents=True, exist_ok=True)
    for e in range(episodes):
        for v in range(views):
            write_video(root / "videos" / split / str(e) / f"{v}.mp4", make_frames(e, steps, size, v))
        ann = {"texts": [f"push block {e % 2}"], "episode_id": e, "video_length": steps,
               "videos": [{"video_path": f"videos/{split}/{e}/{v}.mp4"} for v in range(views)],
               "states": make_actions(e + 10, steps, 3).tolist(), "actions": make_actions(e, steps, dim).tolist()}
        path = root / "annotation" / split / f"{e}.json"
        path.write_text(json.dumps(ann), encoding="utf-8")
        paths.append(path)
    return paths


CAMERAS = ("observation.images.top", "observation.images.wrist")


def _info(version: str, data_path: str, video_path: str, size: int, dim: int) -> dict:
    video = {"dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "channel"]}
    return {"codebase_version": version, "fps": 10, "chunks_size": 1000, "data_path": data_path,
            "video_path": video_path,
            "features": {CAMERAS[0]: video, CAMERAS[1]: video,
                         "observation.state": {"dtype": "float32", "shape": [3]},
                         "action": {"dtype": "float32", "shape": [dim]},
                         "timestamp": {"dtype": "float32", "shape": [1]},
                         "frame_index": {"dtype": "int64", "shape": [1]},
                         "episode_index": {"dtype": "int64", "shape": [1]},
                         "task_index": {"dtype": "int64", "shape": [1]}}}


def _rows(e: int, steps: int, dim: int, task: int, start_index: int = 0) -> dict:
    return {"observation.state": make_actions(e + 10, steps, 3).tolist(),
            "action": make_actions(e, steps, dim).tolist(),
            "timestamp": [t / 10 for t in range(steps)], "frame_index": list(range(steps)),
            "episode_index": [e] * steps, "index": list(range(start_index, start_index + steps)),
            "task_index": [task] * steps}


def write_lerobot_v2(root: Path, lengths=(8, 11), size: int = 32, dim: int = 7) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    info = _info("v2.1", "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                 "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4", size, dim)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    tasks = ["open the drawer", "close the drawer"]
    (root / "meta" / "tasks.jsonl").write_text("\n".join(json.dumps({"task_index": i, "task": t})
                                                         for i, t in enumerate(tasks)))
    (root / "meta" / "episodes.jsonl").write_text("\n".join(
        json.dumps({"episode_index": e, "tasks": [tasks[e % 2]], "length": n}) for e, n in enumerate(lengths)))
    for e, n in enumerate(lengths):
        path = root / f"data/chunk-000/episode_{e:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(_rows(e, n, dim, e % 2)), path)
        for v, cam in enumerate(CAMERAS):
            write_video(root / f"videos/chunk-000/{cam}/episode_{e:06d}.mp4", make_frames(e, n, size, v))
    return root


def write_lerobot_v3(root: Path, lengths=(8, 11), size: int = 32, dim: int = 7) -> Path:
    """All episodes in one data file and one video file per camera, located by timestamps."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    info = _info("v3.0", "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                 "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4", size, dim)
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    tasks = ["open the drawer", "close the drawer"]
    pq.write_table(pa.table({"task_index": [0, 1], "task": tasks}), root / "meta" / "tasks.parquet")
    rows: dict[str, list] = {}
    episodes: dict[str, list] = {"episode_index": [], "tasks": [], "length": [], "data/chunk_index": [],
                                 "data/file_index": [], "dataset_from_index": [], "dataset_to_index": []}
    for cam in CAMERAS:
        for k in ("chunk_index", "file_index", "from_timestamp", "to_timestamp"):
            episodes[f"videos/{cam}/{k}"] = []
    start = 0
    for e, n in enumerate(lengths):
        for k, v in _rows(e, n, dim, e % 2, start).items():
            rows.setdefault(k, []).extend(v)
        episodes["episode_index"].append(e)
        episodes["tasks"].append([tasks[e % 2]])
        episodes["length"].append(n)
        episodes["data/chunk_index"].append(0)
        episodes["data/file_index"].append(0)
        episodes["dataset_from_index"].append(start)
        episodes["dataset_to_index"].append(start + n)
        for cam in CAMERAS:
            episodes[f"videos/{cam}/chunk_index"].append(0)
            episodes[f"videos/{cam}/file_index"].append(0)
            episodes[f"videos/{cam}/from_timestamp"].append(start / 10)
            episodes[f"videos/{cam}/to_timestamp"].append((start + n) / 10)
        start += n
    (root / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), root / "data" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.table(episodes), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    for v, cam in enumerate(CAMERAS):
        frames = np.concatenate([make_frames(e, n, size, v) for e, n in enumerate(lengths)])
        write_video(root / f"videos/{cam}/chunk-000/file-000.mp4", frames)
    return root


def write_calvin(root: Path, frames: int = 12, windows=((0, 5, "open the drawer"), (4, 11, "push the button")),
                 dim: int = 7) -> Path:
    """A CALVIN split folder: one npz per step + lang_annotations/auto_lang_ann.npy."""
    root.mkdir(parents=True, exist_ok=True)
    static = make_frames(0, frames, 20)
    gripper = make_frames(0, frames, 8, view=1)
    actions = make_actions(0, frames, dim)
    for i in range(frames):
        np.savez(root / f"episode_{i:07d}.npz", rgb_static=static[i], rgb_gripper=gripper[i], rel_actions=actions[i],
                 actions=actions[i] * 2, robot_obs=np.full(15, i, np.float32))
    (root / "lang_annotations").mkdir(exist_ok=True)
    ann = {"language": {"ann": [w[2] for w in windows], "task": ["t"] * len(windows),
                        "emb": np.zeros((len(windows), 1, 8), np.float32)},
           "info": {"indx": [(w[0], w[1]) for w in windows], "episodes": []}}
    np.save(root / "lang_annotations" / "auto_lang_ann.npy", ann, allow_pickle=True)
    return root
