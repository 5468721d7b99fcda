"""Open-loop action error of a trained policy on its own demonstrations, per task.

For the first ``--episodes`` episodes of every task in a dataset (the sample format; the
task is the annotation's ``metaworld_task`` or, without one, its instruction), the policy
predicts a chunk at every ``--every``-th step from that step's frames (and recorded state,
for a policy that takes one) and is compared with the recorded actions of the next
``action_horizon`` steps. Printed per task: the mean absolute error per action dimension
next to the mean absolute recorded action, the scale an error means something against.

A closed-loop failure with a small error here is the loop's (latency, compounding drift);
a large error even on training episodes is the model's: it cannot tell from its inputs what
the demonstration did next.

    python bench/open_loop_actions.py models/metaworld-tiny --data data/metaworld --episodes 3
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="a trained (or compact) checkpoint folder")
    ap.add_argument("--data", type=Path, default=Path("data/metaworld"), help="dataset in the sample format")
    ap.add_argument("--split", default="train")
    ap.add_argument("--episodes", type=int, default=3, help="episodes per task (default 3)")
    ap.add_argument("--every", type=int, default=2, help="predict at every n-th step (default 2)")
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from vpp_edge.episodes import list_episodes, load_episode
    from vpp_edge.training.checkpoints import load_checkpoint
    from vpp_edge.training.predict import TorchPredictor, episode_frames

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    policy, tokenizer = load_checkpoint(args.checkpoint)
    predictor = TorchPredictor(policy, tokenizer)
    preset, horizon = policy.preset, policy.preset.action_horizon
    takes_state = preset.action_head.use_proprio
    errors: dict[str, list] = defaultdict(list)
    scale: dict[str, list] = defaultdict(list)
    seen: dict[str, int] = defaultdict(int)
    for annotation in list_episodes(args.data, args.split):
        task = json.loads(annotation.read_text()).get("metaworld_task")
        episode = load_episode(annotation)
        task = task or episode.instruction
        if seen[task] >= args.episodes or episode.actions is None:
            continue
        seen[task] += 1
        actions = episode.actions
        for t in range(0, len(actions), args.every):
            rows = np.minimum(t + np.arange(horizon), len(actions) - 1)  # clamped, as in training
            frames = episode_frames(episode, preset.num_views, preset.image_size, t)
            state = episode.states[t] if takes_state else None
            chunk = predictor.predict(frames, episode.instruction, seed=t, state=state).actions
            errors[task].append(np.abs(chunk - actions[rows]).mean(0))
            scale[task].append(np.abs(actions[rows]).mean(0))
    report = {task: {"mae": np.mean(errors[task], 0).round(4).tolist(),
                     "mean_abs_action": np.mean(scale[task], 0).round(4).tolist(), "predictions": len(errors[task])}
              for task in errors}
    print(f"{args.checkpoint}: {args.episodes} {args.split} episode(s) per task, a chunk every {args.every} step(s)")
    print("| task | predictions | action MAE per dim | mean abs action per dim |\n| --- | ---: | --- | --- |")
    for task, r in report.items():
        print(f"| {task} | {r['predictions']} | {r['mae']} | {r['mean_abs_action']} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
