"""``build_runtime(config)``: the one place a :class:`~vpp_edge.runtime.config.RuntimeConfig`
becomes a running system (artifact -> engine -> policy, robot, cameras, bridge link, control
loop). ``vpp run``/``vpp demo``, the MetaWorld evaluation, the test fixtures, the runtime
benchmark and the deploy self-test all build through here; a caller that owns a part
already (a policy loaded once for many episodes, a link to an in-process bridge, cameras of
a simulator) passes it in and the rest comes from the config.

Where the instruction comes from: the config (``instruction``, i.e. ``--instruction`` or
``--set instruction=...``); else, only when the cameras replay an episode, that episode's
own instruction, said in the notes. A run on live cameras without one is refused: a robot
never silently runs a demo's task. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from vpp_edge.errors import ConfigError

from .config import RuntimeConfig


def open_artifact(config: RuntimeConfig):
    """The config's artifact, opened (a one-line error when it is missing)."""
    from .artifact import Artifact

    if not Path(config.artifact).is_dir():
        raise ConfigError(f"no such artifact: {config.artifact} (make one with 'vpp export')")
    return Artifact.open(config.artifact)


class LoadedPolicy:
    """An engine loaded for an artifact and the policy that drives it (``runtime``: the
    :class:`~vpp_edge.runtime.policy.RuntimePolicy` the loop runs); close it, or use it as a
    context manager. :class:`vpp_edge.api.Policy` is this object with the embedding API on
    top, so ``vpp run`` and an embedding program drive the same thing."""

    def __init__(self, engine: Any, runtime: Any):
        self.engine, self.runtime = engine, runtime

    def set_instruction(self, text: str) -> float:
        """Change the task (the text graph runs once per new text); milliseconds spent."""
        return self.runtime.set_instruction(text)

    def close(self) -> None:
        """Release the engine (GPU memory, sessions)."""
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_policy(artifact: Any, backend: str = "auto", precision: str | None = None, threads: int = 0,
                seed: int = 0, cls: type[LoadedPolicy] = LoadedPolicy, **options: Any) -> LoadedPolicy:
    """An opened artifact on ``backend`` at ``precision`` (default: the backend's) with
    ``threads`` CPU inference threads and noise seed ``seed``, loaded, as ``cls``; ``options``
    go to the engine's builder (e.g. the torch backend's ``checkpoint``)."""
    from .engines import create_engine
    from .policy import RuntimePolicy

    engine = create_engine(artifact, backend, precision, threads=threads, **options).load()
    try:
        return cls(engine, RuntimePolicy(artifact, engine, seed=seed))
    except BaseException:
        engine.close()
        raise


def open_policy(config: RuntimeConfig, artifact: Any = None) -> LoadedPolicy:
    """The config's artifact on the config's engine (backend, precision, threads) with its seed, loaded."""
    artifact = artifact if artifact is not None else open_artifact(config)
    return load_policy(artifact, config.backend, config.precision, config.threads, config.seed)


def run_options(config: RuntimeConfig, stop_when: Callable[[], bool] | None = None, tick_record_every: int = 1):
    """The control loop's options from the config (smoothing and its parameters included)."""
    from .loop import RunOptions

    s = config.smoothing
    return RunOptions(duration_s=config.duration_s, smoothing=s.policy, crossfade_steps=s.crossfade_steps,
                      margin_steps=s.margin_steps, ensemble_m=s.ensemble_m, action_dt=s.action_dt,
                      realtime_priority=config.rt_priority, target_stream=config.target_stream,
                      stop_when=stop_when, tick_record_every=tick_record_every,
                      inject_latency_s=config.inject_latency_ms / 1e3)


def open_link(config: RuntimeConfig, *, curve: Any = None, context: Any = None):
    """The link to the config's bridge (``bridge.host`` at ``bridge.base_port``, else
    ``$VPP_BASE_PORT``, else the default ports); ``curve``: its CurveZMQ keys; ``context``:
    a ZeroMQ context to share (an in-process bridge's)."""
    from . import protocol as P
    from .link import BridgeLink

    ends = (P.ACTION_ENDPOINT, P.STATE_ENDPOINT, P.EVENT_ENDPOINT, P.COMMAND_ENDPOINT)
    return BridgeLink(*(P.endpoint_on(config.bridge.host, e, config.bridge.port()) for e in ends), context=context,
                      curve=curve, insecure=config.bridge.insecure)


def replay_episode(config: RuntimeConfig, episode: Any = None):
    """The episode a replay camera source plays (the config's, else the demo episode); None for
    live cameras, which need none (a robot never loads demo data)."""
    if episode is not None or not config.cameras.replays:
        return episode
    from vpp_edge.demo_data import default_episode
    from vpp_edge.episodes import load_episode

    if config.cameras.episode and not Path(config.cameras.episode).exists():
        raise ConfigError(f"cameras.episode {config.cameras.episode}: no such file or folder")
    return load_episode(config.cameras.episode or default_episode())


def resolve_instruction(config: RuntimeConfig, episode: Any = None) -> tuple[str, str | None]:
    """(instruction, note): the config's, else the replayed episode's (with a note saying so)."""
    if config.instruction:
        return config.instruction, None
    if config.cameras.replays and episode is not None and episode.instruction:
        return episode.instruction, (f"instruction from the replayed episode {episode.annotation} "
                                     "(--instruction or --set instruction=... to give another)")
    raise ConfigError("no instruction: give the task with --instruction TEXT (or instruction: in the runtime "
                      "config); only a replayed episode may supply its own")


@dataclass
class BuiltRuntime:
    """What :func:`build_runtime` assembled. :meth:`close` releases what it built (not what
    the caller passed in)."""

    config: RuntimeConfig
    artifact: Any
    robot: Any  # RobotConfig
    policy: Any  # RuntimePolicy the loop drives
    cameras: list
    link: Any
    metrics: Any
    runtime: Any  # loop.Runtime
    instruction: str
    episode: Any = None
    notes: list[str] = field(default_factory=list)
    owned: list[Any] = field(default_factory=list)  # closed by close(), last first

    def run(self) -> dict:
        return self.runtime.run()

    def close(self) -> None:
        for part in reversed(self.owned):
            part.close()
        self.owned.clear()

    def __enter__(self) -> "BuiltRuntime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_runtime(config: RuntimeConfig, *, policy: Any = None, cameras: Sequence[Any] | None = None,
                  link: Any = None, metrics: Any = None, robot: Any = None, episode: Any = None,
                  stop_when: Callable[[], bool] | None = None, tick_record_every: int = 1,
                  make_metrics: Callable[[list], Any] | None = None, curve: Any = None,
                  set_instruction: bool = True) -> BuiltRuntime:
    """The runtime ``config`` describes, ready to :meth:`~BuiltRuntime.run`. Parts given are
    used as they are: ``policy`` (a :class:`LoadedPolicy`, an :class:`vpp_edge.api.Policy` or a
    ``RuntimePolicy``, loaded), ``cameras``, ``link`` (a BridgeLink), ``metrics`` (or ``make_metrics(cameras)``),
    ``robot`` (a RobotConfig, e.g. with another control rate), ``episode`` (replayed).
    ``curve``: CurveZMQ keys of the link it builds. ``set_instruction``: False when the
    caller sets it (to report a truncation, or per episode)."""
    from vpp_edge.preprocess import source_sizes

    from .cameras.factory import make_cameras
    from .loop import Runtime
    from .metrics import Metrics
    from .robot_config import load_robot_config

    owned: list[Any] = []
    notes: list[str] = []
    try:
        if policy is None:
            policy = open_policy(config)
            owned.append(policy)
        runtime_policy = getattr(policy, "runtime", policy)  # LoadedPolicy/api.Policy wrap the RuntimePolicy
        artifact = getattr(runtime_policy, "artifact", None)  # a test's stand-in policy may have none
        preset = runtime_policy.preset
        robot = robot if robot is not None else load_robot_config(config.robot)
        if cameras is None:
            episode = replay_episode(config, episode)
            source_sizes(reset=True)  # replay cameras prepare their frames here, live ones while running
            cameras = make_cameras(config.cameras.spec(preset.views), preset.num_views, preset.image_size, episode,
                                   config.cameras.fps, config.cameras.dali_device)
            offered = len(episode.video_paths) if episode is not None else None
            if offered is not None and offered > preset.num_views:
                notes.append(f"the model takes {preset.num_views} camera view(s): {offered - preset.num_views}"
                             f" of the episode's {offered} left out")
        instruction, note = resolve_instruction(config, episode)
        if note:
            notes.append(note)
        if set_instruction:
            runtime_policy.set_instruction(instruction)
        if link is None:
            link = open_link(config, curve=curve)
            owned.append(link)
        if metrics is None:
            metrics = make_metrics(list(cameras)) if make_metrics is not None else Metrics()
            owned.append(metrics)
        runtime = Runtime(runtime_policy, list(cameras), robot, link, run_options(config, stop_when, tick_record_every),
                          metrics)
    except BaseException:
        for part in reversed(owned):
            part.close()
        raise
    return BuiltRuntime(config, artifact, robot, runtime_policy, list(cameras), link, metrics, runtime, instruction,
                        episode, notes, owned)
