"""A small synthetic episode in the official sample format, for machines without
``shared/vpp_samples``: a gripper pushes a red block towards a green target, seen by a
scene camera and a gripper camera. Written as real MPEG-4 videos so the demo exercises
the same decoding path as recorded data.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np

from vpp_edge.episodes import write_episode

INSTRUCTION = "push the red block to the green target"
log = logging.getLogger(__name__)


def _scene(t: float, size: int, gripper_view: bool) -> np.ndarray:
    img = np.full((size, size, 3), (200, 190, 170), np.uint8)  # table
    block = np.array([0.3 + 0.4 * t, 0.55])
    target = np.array([0.75, 0.55])
    hand = block - np.array([0.08, 0.0])
    if gripper_view:  # camera rides on the hand: the world shifts, scaled up
        def to_px(p: np.ndarray) -> tuple[int, int]:
            q = (p - hand) * 2.0 + 0.5
            return int(q[0] * size), int(q[1] * size)
    else:
        def to_px(p: np.ndarray) -> tuple[int, int]:
            return int(p[0] * size), int(p[1] * size)
    r = size // 16 * (2 if gripper_view else 1)
    cv2.circle(img, to_px(target), r + 4, (40, 170, 60), -1)
    bx, by = to_px(block)
    cv2.rectangle(img, (bx - r, by - r), (bx + r, by + r), (200, 40, 40), -1)
    hx, hy = to_px(hand)
    cv2.rectangle(img, (hx - r // 2, hy - 2 * r), (hx + r // 3, hy + 2 * r), (60, 60, 70), -1)
    return img


def write_demo_dataset(root: str | Path, steps: int = 20, size: int = 256, fps: int = 10) -> Path:
    """Create ``root/annotation/val/0.json`` + two videos; returns the annotation path."""
    ts = np.linspace(0.0, 1.0, steps)
    views = [np.stack([_scene(t, size, gripper) for t in ts]) for gripper in (False, True)]
    # State: block x, y, z, gripper; action: change of the hand position + gripper command.
    states = np.stack([0.3 + 0.4 * ts, np.full(steps, 0.55), np.zeros(steps), np.ones(steps)], axis=1)
    actions = np.diff(states, axis=0, append=states[-1:])
    actions[:, 3] = 1.0
    return write_episode(root, 0, INSTRUCTION, views, states, actions, fps)


def default_episode() -> Path:
    """First XHand sample episode if ``shared/vpp_samples`` is present, else the synthetic
    episode (written once to ``$XDG_CACHE_HOME/vpp-edge/demo_episode``)."""
    from vpp_edge.episodes import find_samples_dir, list_episodes

    samples = find_samples_dir()
    if samples is not None and (samples / "xhand").is_dir():
        return list_episodes(samples / "xhand")[0]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vpp-edge" / "demo_episode"
    annotation = cache / "annotation" / "val" / "0.json"
    if not annotation.is_file():
        log.info("shared/vpp_samples not found; writing a synthetic demo episode to %s", cache)
        annotation = write_demo_dataset(cache)
    return annotation
