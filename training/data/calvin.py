"""Reader for CALVIN's episode format.

A split folder (``training/`` or ``validation/``) holds one ``episode_XXXXXXX.npz`` per
time step (``rgb_static`` 200x200, ``rgb_gripper`` 84x84, ``actions``, ``rel_actions``,
``robot_obs``, ...) and ``lang_annotations/auto_lang_ann.npy``: a dict whose
``language.ann`` lists the instructions and ``info.indx`` the (start, end) frame ids
(inclusive) they annotate. Each annotated window is one training episode, as VPP trains.

``auto_lang_ann.npy`` is a pickled object array. It is read with an unpickler that only
rebuilds numpy arrays and plain containers (no other class, no code), so a crafted file
cannot run anything.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from vpp_edge.errors import DataError

from .episode import TrainEpisode
from .sources import EpisodeRef, SourceConfig, select_views

CAMERAS = ["rgb_static", "rgb_gripper"]
LANG_FILE = Path("lang_annotations") / "auto_lang_ann.npy"

# The only globals a pickled numpy object array needs (numpy 1.x and 2.x module names).
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}' (only numpy arrays are allowed)")


def load_object_npy(path: Path) -> Any:
    """The object stored in a ``.npy`` file written by ``np.save(dict)``, read safely."""
    if not path.is_file():
        raise DataError(f"{path}: not found (CALVIN language annotations)")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            if dtype.hasobject:
                array = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
            else:
                array = np.fromfile(f, dtype=dtype).reshape(shape)
    except (ValueError, pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    return array.item() if isinstance(array, np.ndarray) and array.shape == () else array


def _annotations(folder: Path) -> list[tuple[str, int, int]]:
    path = folder / LANG_FILE
    data = load_object_npy(path)
    try:
        texts = list(data["language"]["ann"])
        spans = [(int(a), int(b)) for a, b in data["info"]["indx"]]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: expected {{'language': {{'ann': [...]}}, 'info': {{'indx': [...]}}}}") from None
    if len(texts) != len(spans):
        raise DataError(f"{path}: {len(texts)} instructions for {len(spans)} annotated windows")
    return [(str(t), a, b) for t, (a, b) in zip(texts, spans)]


def _frame_file(folder: Path, index: int) -> Path:
    return folder / f"episode_{index:07d}.npz"


def _read_key(path: Path, key: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: CALVIN frame file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if key not in npz.files:
                raise DataError(f"{path}: no '{key}' array (has {sorted(npz.files)})")
            return npz[key]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


class CalvinFrames:
    """Frames of one annotated window, read from its per-step npz files."""

    def __init__(self, folder: Path, start: int, end: int, cameras: list[str]):
        self.folder, self.start, self.end, self.cameras = folder, start, end, cameras

    @property
    def num_views(self) -> int:
        return len(self.cameras)

    def count(self, view: int) -> int:
        return self.end - self.start + 1

    def read(self, view: int) -> np.ndarray:
        key = self.cameras[view]
        return np.stack([_read_key(_frame_file(self.folder, i), key) for i in range(self.start, self.end + 1)])

    def describe(self, view: int) -> str:
        last = _frame_file(self.folder, self.end).name
        return f"{_frame_file(self.folder, self.start)}..{last} ({self.cameras[view]})"


def load_calvin_window(folder: Path, text: str, start: int, end: int, source: SourceConfig) -> TrainEpisode:
    """One annotated window; reads only the action (and state) arrays of its frames."""
    cameras = [CAMERAS[i] for i in select_views(CAMERAS, source.views, str(folder))]
    action_key = source.action_key or "rel_actions"
    state_key = source.state_key or "robot_obs"
    files = [_frame_file(folder, i) for i in range(start, end + 1)]
    actions = np.stack([_read_key(f, action_key).reshape(-1) for f in files]).astype(np.float32)
    states = np.stack([_read_key(f, state_key).reshape(-1) for f in files]).astype(np.float32)
    return TrainEpisode(name=f"{files[0]} .. {files[-1].name}", instruction=source.instruction or text,
                        actions=actions, frames=CalvinFrames(folder, start, end, cameras), states=states,
                        source=source.label)


def calvin_refs(source: SourceConfig) -> list[EpisodeRef]:
    """Every language-annotated window of the split folder as a lazy episode."""
    root = source.root()
    folder = root / source.split if source.split and (root / source.split).is_dir() else root
    return [EpisodeRef(f"{_frame_file(folder, a)} .. {_frame_file(folder, b).name}",
                       lambda t=t, a=a, b=b: load_calvin_window(folder, t, a, b, source))
            for t, a, b in _annotations(folder)]
