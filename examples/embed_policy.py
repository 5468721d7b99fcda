"""Embed a vpp-edge policy in your own control loop (the Python API, vpp_edge.api).

    python examples/embed_policy.py [ARTIFACT] [--backend auto] [--steps 3]

Loads an export artifact (default artifacts/tiny: `vpp export --preset tiny`), feeds it
camera images of an arbitrary size with their capture times (here: synthetic 480x640
frames), and prints each timestamped action chunk. Replace `grab_frames` and `send` with
your cameras and robot; keep a safety layer between the policy and the robot (the
`vpp run` runtime and a bridge provide one).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from vpp_edge.api import Policy
from vpp_edge.errors import VPPError


def grab_frames(views: int, step: int) -> tuple[list[np.ndarray], float]:
    """Stand-in for your cameras: one RGB uint8 image per view (any size) and its capture time."""
    rng = np.random.default_rng(step)
    return [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(views)], time.monotonic()


def send(t: float, action: np.ndarray) -> None:
    """Stand-in for your robot: the action (robot units) due at time ``t``."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", nargs="?", default="artifacts/tiny", help="export artifact (default artifacts/tiny)")
    parser.add_argument("--backend", default="auto", help="auto | onnxruntime | tensorrt | openvino | torch")
    parser.add_argument("--steps", type=int, default=3, help="observations to act on (default 3)")
    parser.add_argument("--dt", type=float, default=0.1, help="seconds between actions (default 0.1)")
    args = parser.parse_args(argv)
    try:
        with Policy.load(args.artifact, args.backend, instruction="open the drawer") as policy:
            print(f"{policy.preset.name}: {policy.preset.num_views} view(s), {policy.preset.action_horizon} x "
                  f"{policy.preset.action_dim} actions per chunk, engine {policy.engine.backend}")
            for step in range(args.steps):
                frames, stamp = grab_frames(policy.preset.num_views, step)
                chunk = policy.act(frames, stamp)
                for t, action in zip(chunk.times(args.dt), chunk.actions):
                    send(t, action)
                ms = sum(chunk.timings_ms.values())
                print(f"chunk {step}: observed at {chunk.stamp:.3f} s, first action {np.round(chunk.actions[0], 4)}, "
                      f"{ms:.0f} ms")
    except VPPError as exc:
        print(f"embed_policy: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
