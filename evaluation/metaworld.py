"""MetaWorld through the whole stack: oracle demonstrations recorded into the sample
format, and closed-loop evaluation of an exported policy.

Both go through :class:`~vpp_edge.firmware_bridge.metaworld_sim.MetaWorldDriver`, so
demonstrations see exactly the cameras, rates and action convention the runtime later
acts with: one action per control step = the hand target's change over the MetaWorld
steps of one control period (bridge servo rate / runtime control rate, 4) + the gripper
effort. In evaluation the
simulator sits behind a real bridge on loopback ZeroMQ, its cameras stream to the
runtime's network camera, and the runtime (ONNX Runtime, safety, chunking) drives it
exactly as it would a robot. Success is MetaWorld's own ``info["success"]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vpp_edge.errors import ConfigError
from vpp_edge.extras import require
from vpp_edge.firmware_bridge.metaworld_sim import MOCAP_STEP, MetaWorldDriver

# The demo's and the recipe's tasks (make metaworld-policy, vpp demo): six of the MetaWorld
# "easy" set the VPP paper reports (its MetaWorld table splits the 50 tasks by difficulty).
DEMO_TASKS = ("drawer-close-v3", "window-close-v3", "door-close-v3", "button-press-topdown-v3",
              "handle-press-v3", "faucet-close-v3")


def instruction_for(task: str) -> str:
    """A plain-language instruction from a MetaWorld task name ('drawer-open-v3' -> 'drawer open')."""
    name = task.rsplit("-v", 1)[0]
    return name.replace("-", " ")


def check_tasks(tasks: list[str]) -> list[str]:
    require("metaworld", "MetaWorld tasks")
    import metaworld

    known = sorted(metaworld.ALL_V3_ENVIRONMENTS)
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise ConfigError(f"unknown MetaWorld task(s) {unknown or tasks}; e.g. {', '.join(known[:6])}, ...")
    return tasks


def _rates() -> tuple[object, object, int]:
    """(bridge config, runtime robot config, MetaWorld steps per control step) for MetaWorld."""
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.runtime.robot_config import load_robot_config

    bridge, robot = load_bridge_config("metaworld"), load_robot_config("metaworld")
    return bridge, robot, max(1, round(bridge.servo_hz / robot.control_hz))


# --- demonstrations -------------------------------------------------------------------------
def record_demos(tasks: list[str], episodes: int, out: str | Path, image_size: int = 128, seed: int = 0,
                 max_steps: int = 500, split: str = "train", progress: bool = True) -> dict:
    """Record ``episodes`` successful oracle demonstrations per task into ``out`` (sample format).

    Returns counts per task (recorded, failed attempts) and the totals; failed oracle
    attempts are not written.
    """
    from metaworld.policies import ENV_POLICY_MAP
    from tqdm import tqdm

    from vpp_edge.episodes import write_episode

    check_tasks(tasks)
    cfg, robot, every = _rates()
    out = Path(out)
    summary: dict = {"tasks": {}, "steps_per_action": every, "control_hz": robot.control_hz, "image_size": image_size}
    episode_id = 0
    bar = tqdm(total=len(tasks) * episodes, desc="oracle demos", unit="ep", disable=not progress)
    for task in tasks:
        driver = MetaWorldDriver({**cfg.driver, "task": task, "image_size": image_size})
        oracle = ENV_POLICY_MAP[task]()
        recorded, failed, lengths, attempt = 0, 0, [], 0
        try:
            while recorded < episodes:
                if failed > 2 * episodes + 5:
                    raise RuntimeError(f"{task}: the oracle keeps failing ({failed} attempts)")
                demo = _one_demo(driver, oracle, seed + attempt, every, max_steps)
                attempt += 1
                if demo is None:
                    failed += 1
                    continue
                views, states, actions = demo
                write_episode(out, episode_id, instruction_for(task), views, states, actions, robot.control_hz, split,
                              extra={"metaworld_task": task, "seed": seed + attempt - 1})
                episode_id += 1
                recorded += 1
                lengths.append(len(actions))
                bar.update()
        finally:
            driver.disconnect()
        summary["tasks"][task] = {"episodes": recorded, "failed_attempts": failed,
                                  "mean_length": float(np.mean(lengths))}
    bar.close()
    summary["episodes"] = episode_id
    (out / "demos.json").write_text(json.dumps(summary, indent=2))
    return summary


def _one_demo(driver: MetaWorldDriver, oracle, seed: int, every: int, max_steps: int):
    """(views [V][T, S, S, 3], states [T, 4], actions [T, 4]) of one successful episode, or None."""
    driver.reset_episode(seed)
    frames, states, actions = [], [], []
    after_success = 0
    while driver.status.steps < max_steps and after_success < 2:  # two more steps: learn to settle
        frames.append(driver.render())
        states.append(driver.read_state()[1][:4])  # hand (tcp) xyz and finger opening
        start = driver.setpoint()
        for _ in range(every):
            a = np.clip(oracle.get_action(driver.observation), -1.0, 1.0)
            target = driver.setpoint()[:3] + a[:3] * MOCAP_STEP
            driver.servo(np.array([*target, a[3]]))
        actions.append([*(driver.setpoint()[:3] - start[:3]), a[3]])
        if driver.status.success:
            after_success += 1
    if not driver.status.success:
        return None
    views = [np.stack([f[v] for f in frames]) for v in range(frames[0].shape[0])]
    return views, np.asarray(states), np.asarray(actions)


# --- closed-loop evaluation -----------------------------------------------------------------
@dataclass(frozen=True)
class EvalOptions:
    tasks: tuple[str, ...]
    episodes: int = 10
    seed: int = 1000  # evaluation seeds start here, away from the demonstrations' seeds
    max_steps: int = 200  # MetaWorld steps per episode (the oracles need < 100)
    backend: str = "onnxruntime"
    precision: str = "fp32"
    smoothing: str = "crossfade"
    threads: int = 0
    inject_latency_ms: float = 0.0  # every inference this much longer (RuntimeConfig.inject_latency_ms)
    video_dir: str | None = None  # each episode's run log <task>_<seed>.jsonl here (and its video)
    # Makes each episode's video from its log: sinks(log, cameras) -> metrics sinks, finish(log);
    # given by the entry point (evaluation/commands.py AnnotatedVideo: vpp replay's renderer).
    video: Any = None
    on_episode: Callable[[str, dict], None] | None = None  # called after each episode (task, its record)


EPISODE_MEANS = ("starved_ticks", "boundary_jump", "action_jerk")  # per-episode figures averaged per task


def _episode_metrics(log: Path | None, cameras: list, video: Any):
    """The episode's metrics; with ``log``, a run log, and the sinks of ``video`` beside it."""
    from vpp_edge.runtime.metrics import Metrics

    if log is None:
        return Metrics()
    log.parent.mkdir(parents=True, exist_ok=True)
    return Metrics(log, sinks=video.sinks(log, cameras) if video is not None else ())


def evaluate(artifact_dir: str | Path, options: EvalOptions, progress: bool = True) -> dict:
    """Run ``options.episodes`` closed-loop episodes per task; success from MetaWorld."""
    import zmq
    from tqdm import tqdm

    from vpp_edge.firmware_bridge.bridge import loopback_bridge
    from vpp_edge.runtime.artifact import Artifact
    from vpp_edge.runtime.build import build_runtime, open_link, open_policy
    from vpp_edge.runtime.cameras.network import ZmqCameras
    from vpp_edge.runtime.config import LinkConfig, RuntimeConfig, SmoothingConfig

    check_tasks(list(options.tasks))
    artifact = Artifact.open(artifact_dir)
    preset = artifact.preset
    cfg, robot, _ = _rates()
    logging.getLogger("vpp_edge.firmware_bridge").setLevel(logging.WARNING)  # events are counted, not printed
    if preset.action_dim != cfg.dim:
        raise ConfigError(f"{artifact_dir}: the model acts in {preset.action_dim} dims, MetaWorld takes {cfg.dim}")
    wall_limit = options.max_steps / cfg.servo_hz + 2.0
    ctx = zmq.Context()
    results: dict = {"artifact": str(artifact_dir), "precision": options.precision, "backend": options.backend,
                     "episodes_per_task": options.episodes, "max_steps": options.max_steps, "tasks": {}}
    latencies: list[float] = []
    bar = tqdm(total=len(options.tasks) * options.episodes, desc="MetaWorld closed loop", unit="ep",
               disable=not progress)
    # The runtime as vpp run builds it (runtime/build.py); one engine serves every episode, and
    # each episode's bridge, link and simulator cameras are this evaluation's own.
    config = RuntimeConfig(Path(artifact_dir), options.backend, options.precision,
                           options.threads if options.backend == "onnxruntime" else 0, robot="metaworld",
                           smoothing=SmoothingConfig(options.smoothing), duration_s=wall_limit,
                           inject_latency_ms=options.inject_latency_ms)
    with open_policy(config, artifact) as policy:
        for task in options.tasks:
            settings = {**cfg.driver, "task": task, "image_size": preset.image_size, "max_steps": options.max_steps}
            bridge, base = loopback_bridge(dataclasses.replace(cfg, driver=settings), ctx)
            driver, ends = bridge.start().driver, bridge.bound()
            task_config = config.replace(bridge=LinkConfig(base_port=base))  # reaches this task's bridge
            link = open_link(task_config, context=ctx)
            policy.set_instruction(instruction_for(task))
            episodes = []
            try:
                for i in range(options.episodes):
                    bridge.new_episode(lambda: driver.reset_episode(options.seed + i))
                    started = time.monotonic()
                    cams = [ZmqCameras(ends.camera, preset.num_views, preset.image_size, ctx, not_before=started)]
                    log = Path(options.video_dir) / f"{task}_{options.seed + i}.jsonl" if options.video_dir else None
                    metrics = _episode_metrics(log, cams, options.video)
                    if log is not None:  # the run's header, as vpp run writes it: the video's caption
                        metrics.record("run", artifact=str(artifact_dir), preset=preset.name,
                                       engine=f"{options.backend}/{options.precision}", instruction=instruction_for(task),
                                       robot=f"metaworld {task} seed {options.seed + i}")
                    status = driver.status
                    summary = build_runtime(task_config.replace(instruction=instruction_for(task)), policy=policy,
                                            cameras=cams, link=link, metrics=metrics, robot=robot,
                                            stop_when=lambda: status.success or status.steps >= options.max_steps,
                                            set_instruction=False).run()
                    metrics.close()
                    if log is not None and options.video is not None:
                        options.video.finish(log)
                    e2e = summary["latency_ms"].get("end_to_end_ms", {})
                    if e2e.get("n"):
                        latencies.append(e2e["p50"])
                    episodes.append({"seed": options.seed + i, "success": bool(status.success),
                                     "steps": status.first_success_step or status.steps,
                                     "chunks": summary["counts"].get("chunks", 0),
                                     "starved_ticks": summary["safety"].get("starvation", 0),
                                     "boundary_jump": summary["boundary_jump"]["mean"],
                                     "action_jerk": summary["action_jerk"]["mean"],
                                     "end_to_end_ms_p50": e2e.get("p50"),
                                     "wall_s": time.monotonic() - started, "safety": summary["safety"]})
                    if options.on_episode is not None:
                        options.on_episode(task, episodes[-1])
                    bar.update()
                    bar.set_postfix(task=task, success=sum(e["success"] for e in episodes))
            finally:
                link.close()
                bridge.close()
            successes = [e["success"] for e in episodes]
            results["tasks"][task] = {
                "success_rate": float(np.mean(successes)), "episodes": len(episodes),
                "mean_steps_to_success": float(np.mean([e["steps"] for e in episodes if e["success"]]))
                if any(successes) else None,
                "mean_length": float(np.mean([e["steps"] for e in episodes])),
                **{k: float(np.mean([e[k] for e in episodes])) for k in EPISODE_MEANS}, "episodes_detail": episodes}
    bar.close()
    ctx.destroy(linger=0)
    rates = [t["success_rate"] for t in results["tasks"].values()]
    results["average_success"] = float(np.mean(rates))
    for k in EPISODE_MEANS:  # over every episode of every task
        results[k] = float(np.mean([e[k] for t in results["tasks"].values() for e in t["episodes_detail"]]))
    results["end_to_end_ms_p50_median"] = float(np.median(latencies)) if latencies else None
    return results


def write_report(results: dict, out: str | Path) -> Path:
    """results.json + results.md (a table per task) in ``out``; returns the Markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# MetaWorld closed loop: {results['artifact']} ({results['backend']}/{results['precision']})", "",
             f"{results['episodes_per_task']} episodes per task, at most {results['max_steps']} MetaWorld steps; "
             "success is MetaWorld's own flag.", "",
             "| task | success | mean steps to success | mean episode steps |", "| --- | ---: | ---: | ---: |"]
    for task, r in results["tasks"].items():
        to_success = f"{r['mean_steps_to_success']:.0f}" if r["mean_steps_to_success"] is not None else "-"
        lines.append(f"| {task} | {r['success_rate']:.2f} | {to_success} | {r['mean_length']:.0f} |")
    lines += ["", f"Average success: **{results['average_success']:.3f}**; runtime end-to-end latency "
              f"(median of per-episode p50): {results['end_to_end_ms_p50_median'] or float('nan'):.0f} ms."]
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path
