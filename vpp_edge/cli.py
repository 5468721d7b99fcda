"""``vpp``: the command-line entry point.

Subcommands import their heavy dependencies (torch, diffusers) only when they run, so
``vpp --help`` and the robot-side commands start fast on a machine without them.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from importlib import import_module
from pathlib import Path
from typing import Any, Callable, Iterator

from vpp_edge import __version__, precisions
from vpp_edge.errors import ConfigError, RunFailed, VPPError

log = logging.getLogger("vpp")

EXIT_ERROR = 2  # bad input, missing or corrupt files
EXIT_MISSING_DEPENDENCY = 3  # an optional component (TensorRT, DALI, an SDK) is not installed
EXIT_PARITY = 4  # an exported graph failed its parity gate
EXIT_RUN_FAILED = 5  # a run that did not do its job: no frames, the bridge vanished, chunks refused


class LazyChoices:
    """argparse ``choices`` read from a module's constant when first needed (parsing that
    subcommand or its --help), so ``vpp --help`` does not import the runtime."""

    def __init__(self, module: str, names: Callable[[Any], Any], extra: tuple[str, ...] = ()):
        self._module, self._names, self._extra = module, names, extra
        self._values: list[str] | None = None

    def _all(self) -> list[str]:
        if self._values is None:
            self._values = [*self._extra, *self._names(import_module(self._module))]
        return self._values

    def __contains__(self, value: object) -> bool:
        return value in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())


BACKEND_CHOICES = LazyChoices("vpp_edge.runtime.engines", lambda m: m.BACKENDS, ("auto",))
SMOOTHING_CHOICES = LazyChoices("vpp_edge.runtime.chunking", lambda m: m.SMOOTHING)
PRECISION_CHOICES = LazyChoices("vpp_edge.precisions", lambda m: m.names())


def _port(text: str) -> int:
    """argparse type of --base-port: a port with room for the four after it."""
    from vpp_edge.runtime.protocol import PORT_SPAN

    if not text.isdigit() or not 1 <= int(text) <= 65535 - PORT_SPAN:
        raise argparse.ArgumentTypeError(f"not a port between 1 and {65535 - PORT_SPAN}: {text!r}")
    return int(text)


def _non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a non-negative integer: {text!r}")
    return int(text)


def _add_port_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-port", type=_port, default=None, metavar="PORT",
                   help="first of the link's five ports: action PORT, state +1, command +2, events +3, camera +4 "
                        "(default $VPP_BASE_PORT, else 5701); bridge and runtime must agree")


def _base_port(args: argparse.Namespace) -> int:
    """--base-port, else $VPP_BASE_PORT, else 5701."""
    from vpp_edge.runtime.protocol import base_port_from_env

    return args.base_port if getattr(args, "base_port", None) is not None else base_port_from_env()


def _existing(path: Path | None, what: str) -> None:
    """A one-line error, before any heavy import, when a path given on the command line is missing."""
    if path is not None and not Path(path).exists():
        raise ConfigError(f"{what} {path}: no such file or folder")


def _load_policy(args: argparse.Namespace):
    """Policy + tokenizer from --checkpoint, the official files, or random weights."""
    from vpp_edge.normalization import ActionNormalizer, StateNormalizer
    from vpp_edge.presets import get_preset
    from vpp_edge.training.checkpoints import load_checkpoint, load_official
    from vpp_edge.training.models import build_policy

    preset = get_preset(args.preset) if args.preset else None
    if args.checkpoint:
        return load_checkpoint(args.checkpoint, preset), str(args.checkpoint)
    normalizer = state_normalizer = None
    if args.normalization:
        try:
            stats = json.loads(Path(args.normalization).read_text())
            # "state": the robot-state bounds of a policy that takes it (the official state_01 / state_99)
            state_normalizer = StateNormalizer.from_dict(stats.pop("state", None)) if isinstance(stats, dict) else None
            normalizer = ActionNormalizer.from_dict(stats)
        except (OSError, json.JSONDecodeError) as exc:
            raise VPPError(f"{args.normalization}: cannot read normalisation statistics ({exc})") from None
    if args.video_model or args.clip or args.action_model:
        if not (args.video_model and args.clip):
            raise VPPError("official weights need both --video-model (SVD folder) and --clip (CLIP folder)")
        source = f"official: {args.video_model}, {args.clip}, {args.action_model or 'random action head'}"
        return load_official(preset, args.video_model, args.clip, args.action_model, normalizer,
                             state_normalizer), source
    preset = preset or get_preset("tiny")
    policy, tokenizer = build_policy(preset, seed=0, normalizer=normalizer)
    if state_normalizer is not None:
        try:
            policy.set_state_normalizer(state_normalizer)
        except ValueError as exc:
            raise VPPError(f"{args.normalization}: {exc}") from None
    return (policy, tokenizer), f"untrained '{preset.name}' model (random weights, seed 0)"


def _add_weight_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weights (default: an untrained model of the preset)")
    g.add_argument("--preset", help="preset name or YAML file (default: the checkpoint's own, the one the official "
                                    "action model's shapes fit, or tiny)")
    g.add_argument("--checkpoint", type=Path, help="vpp-edge checkpoint folder (vpp_config.json + model.safetensors)")
    g.add_argument("--video-model", type=Path, help="official diffusers SVD folder (svd-robot, svd-robot-calvin)")
    g.add_argument("--clip", type=Path, help="transformers CLIP folder (clip-vit-base-patch32)")
    g.add_argument("--action-model", type=Path, help="official action-model torch file (dp-calvin)")
    g.add_argument("--normalization", type=Path, help="JSON action statistics (mode, low/high or mean/std); with "
                   "'state': {low, high}, the robot-state bounds of a preset that takes the state (xbot)")


def cmd_predict(args: argparse.Namespace) -> int:
    for path, what in ((args.episode, "--episode"), (args.dataset, "--dataset"), (args.checkpoint, "--checkpoint")):
        _existing(path, what)
    import numpy as np
    import torch

    from vpp_edge.episodes import list_episodes, load_episode
    from vpp_edge.training.predict import STAGES, TorchPredictor, episode_frames

    torch.set_num_threads(args.threads or torch.get_num_threads())
    (policy, tokenizer), source = _load_policy(args)
    if args.dataset:
        episodes = list_episodes(args.dataset)
        if not 0 <= args.index < len(episodes):
            raise VPPError(f"--index {args.index} out of range: {args.dataset} has {len(episodes)} episodes")
        annotation = episodes[args.index]
    else:
        from vpp_edge.demo_data import default_episode

        annotation = args.episode or default_episode()
    episode = load_episode(annotation)
    instruction = args.instruction or episode.instruction
    preset = policy.preset
    frames = episode_frames(episode, preset.num_views, preset.image_size, args.frame)
    predictor = TorchPredictor(policy, tokenizer)
    state = _predict_state(args, policy, episode)
    runs = [predictor.predict(frames, instruction, seed=args.seed, state=state) for _ in range(max(1, args.repeat))]
    result = runs[-1]
    timings = {s: float(np.median([r.timings_ms[s] for r in runs[1:] or runs])) for s in STAGES}
    timings["text"] = runs[0].timings_ms["text"]  # encoded once, then cached
    report = {
        "preset": preset.name, "weights": source, "episode": str(episode.annotation), "frame": args.frame,
        "views": [str(p) for p in episode.video_paths[: preset.num_views]], "instruction": instruction,
        "seed": args.seed, **({"state": state.tolist()} if state is not None else {}),
        **_action_report(preset, result, state), "timings_ms": timings,
        "predict_ms": sum(timings[s] for s in STAGES if s != "text"),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    _print_prediction(report, result.actions)
    return 0


def _predict_state(args: argparse.Namespace, policy, episode):
    """The raw robot state for a policy that takes one (its preset's action_head.use_proprio):
    --state, else the episode's recorded state at --frame (as step3_deploy_real_xbot.py
    reads states[idx]); a state given to a policy without state input is refused."""
    import numpy as np

    from vpp_edge.normalization import StateError

    if policy.state_normalizer is None:
        if args.state is not None:
            raise VPPError(f"--state: preset '{policy.preset.name}' takes no robot state (action_head.use_proprio is "
                           "false)")
        return None
    if args.state is not None:
        state = np.asarray(args.state, np.float64)
    elif episode.states is not None and 0 <= args.frame < len(episode.states):
        state = np.asarray(episode.states[args.frame], np.float64)
    else:
        raise VPPError(f"preset '{policy.preset.name}' takes the robot state ({policy.state_normalizer.dim} values): "
                       f"give --state, or an episode that records states")
    try:
        policy.state_normalizer.check(state)
    except StateError as exc:
        raise VPPError(f"robot state refused: {exc}") from None
    return state


def _action_report(preset, result, state) -> dict:
    """The chunk as the JSON reports it: ``actions`` are always the commands the robot would
    execute (what the text table shows); ``action_base`` says what the model's de-normalised
    prediction is relative to and, where that is not nothing, ``predicted_actions`` (the
    prediction itself) and ``base`` (the vector added to every action, e.g. state[0:A])."""
    from vpp_edge.normalization import action_base, describe_action_base

    rule = preset.action_base
    report = {"action_base": {"rule": rule, "relative_to": describe_action_base(rule, preset.action_dim)},
              "actions": result.actions.tolist()}
    if rule != "none":
        report["action_base"]["base"] = action_base(rule, state, preset.action_dim).tolist()
        report["predicted_actions"] = result.predicted.tolist()
    return report


def _print_prediction(report: dict, actions) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]VPP predict[/bold]  preset [cyan]{report['preset']}[/cyan]  weights: {report['weights']}")
    console.print(f"episode {report['episode']} (frame {report['frame']}, {len(report['views'])} views)")
    console.print(f"instruction: [italic]{report['instruction']}[/italic]  seed {report['seed']}")
    base = report["action_base"]
    console.print(f"action_base '{base['rule']}': actions relative to {base['relative_to']}")
    what = "commands" if base["rule"] != "none" else "action chunk"
    # Every value, whatever the width: as many action dimensions per table as the terminal
    # fits (a column of "+0.1234" takes 10 characters with its borders; "t" takes 6).
    per_table = max(1, (console.width - 6) // 10)
    for first in range(0, actions.shape[1], per_table):
        dims = range(first, min(first + per_table, actions.shape[1]))
        part = f", dims {dims[0]}-{dims[-1]}" if actions.shape[1] > per_table else ""
        table = Table(title=f"{what} [{actions.shape[0]} x {actions.shape[1]}]{part}")
        table.add_column("t", justify="right", no_wrap=True)
        for j in dims:
            table.add_column(f"a{j}", justify="right", no_wrap=True)
        for i, row in enumerate(actions):
            table.add_row(str(i), *(f"{row[j]:+.4f}" for j in dims))
        console.print(table)
    timing = Table(title="per-stage time (ms)")
    for s in report["timings_ms"]:
        timing.add_column(s, justify="right")
    timing.add_column("predict step", justify="right")
    timing.add_row(*(f"{v:.1f}" for v in report["timings_ms"].values()), f"{report['predict_ms']:.1f}")
    console.print(timing)


def cmd_presets(args: argparse.Namespace) -> int:
    import yaml

    from vpp_edge.presets import available_presets, get_preset

    if args.name:
        print(yaml.safe_dump(get_preset(args.name).to_dict(), sort_keys=False))
        return 0
    import textwrap

    names = available_presets()
    width = max(map(len, names)) + 2
    for name in names:  # 80 columns: the description wraps under itself
        print(textwrap.fill(get_preset(name).description, 80, initial_indent=f"{name:{width}s}",
                            subsequent_indent=" " * width))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from vpp_edge.training.checkpoints import save_checkpoint

    if not (args.video_model and args.clip):
        raise VPPError("convert needs --video-model and --clip (and usually --action-model)")
    (policy, tokenizer), source = _load_policy(args)
    out = save_checkpoint(policy, tokenizer, args.out, extra={"converted_from": source})
    print(f"wrote {out}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from vpp_edge.training.checkpoints import compact_checkpoint

    _existing(args.checkpoint, "checkpoint")
    out = compact_checkpoint(args.checkpoint, args.out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB, FP16 weights)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import platform

    from rich.console import Console
    from rich.table import Table

    from vpp_edge.extras import is_available, report

    table = Table(title=f"vpp-edge {__version__} on Python {platform.python_version()} ({platform.machine()})")
    for col in ("component", "status", "used for"):
        table.add_column(col)
    for module, status, purpose in report():
        table.add_row(module, status if status != "missing" else "[yellow]missing[/yellow]", purpose)
    console = Console()
    console.print(table)
    if is_available("torch") and not args.artifact:  # the robot path (--artifact) never imports torch
        import torch

        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        console.print(f"torch {torch.__version__}: {cuda}")
    if is_available("onnxruntime"):
        import onnxruntime

        console.print(f"onnxruntime providers: {', '.join(onnxruntime.get_available_providers())}")
    if is_available("openvino"):
        from vpp_edge.runtime.engines.openvino import cpu_summary

        console.print(cpu_summary())
    if args.artifact:  # deployment self-test (issue 8): engines load, one inference, latency
        from vpp_edge.deploy.selftest import format_report, run_selftest, verify_artifact

        print(verify_artifact(args.artifact), flush=True)
        if args.selftest:
            result = run_selftest(args.artifact, args.backend, args.precision, args.runs)
            print("\n".join(format_report(result)), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from vpp_edge.deploy.cli import run

    return run(args)


def cmd_export(args: argparse.Namespace) -> int:
    from vpp_edge.export.options import load_options

    overrides = {}
    if args.precisions:
        overrides["precisions"] = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if args.parity_samples is not None:
        overrides["parity_samples"] = args.parity_samples
    if args.calibration_samples is not None:
        overrides["calibration_samples"] = args.calibration_samples
    options = load_options(args.config, **overrides)  # a bad config fails here, before torch is imported
    data = [*(args.data or ()), *(args.data_old_spelling or ())]
    for path in args.data or ():
        _existing(path, "--data")
    for path in args.data_old_spelling or ():
        _existing(path, "--calibration-data")
    _existing(args.checkpoint, "--checkpoint")
    import torch

    from vpp_edge.export.artifact import export_artifact
    from vpp_edge.runtime.manifest import manifest_precisions, read_manifest
    from vpp_edge.export.openvino_int8 import after_export
    from vpp_edge.export.options import names_precisions, precisions_for

    if args.threads:
        torch.set_num_threads(args.threads)
    (policy, tokenizer), source = _load_policy(args)
    out = args.out or Path("artifacts") / policy.preset.name
    observations = None
    if data:  # frames of the robot/simulator the model will see, not the samples
        from vpp_edge.observations import sample_observations

        preset = policy.preset
        observations = sample_observations(preset.num_views, preset.image_size,
                                           options["parity_samples"] + options["calibration_samples"],
                                           roots=data)
    weight_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    precisions = precisions_for(options, weight_bytes, bool(args.precisions) or names_precisions(args.config))
    if precisions != options["precisions"]:
        print(f"{weight_bytes / 1e9:.1f} GB of weights: exporting {', '.join(precisions)}, what TensorRT (its FP16 "
              "engine too) and ONNX Runtime on a CPU run; add others with --precisions")
        options["precisions"] = precisions
    # release_policy: the PyTorch weights are freed once the FP32 graphs are written (paper scale: 6 GB)
    export_artifact(policy, tokenizer, out, options, observations, source=source, progress=not args.quiet,
                    release_policy=True)
    print((Path(out) / "parity.md").read_text())
    # int8_ov and the manifest's cpu_default (what --backend auto runs) when OpenVINO is installed
    for line in after_export(out, precisions, threads=args.threads, options=options, roots=data or None):
        print(line)
    manifest = read_manifest(out)
    print(f"wrote {out}: {len(manifest['graphs'])} graphs ({', '.join(manifest_precisions(manifest))}), "
          f"action head mode '{manifest['action_mode']}' ({manifest['action_mode_ms'][manifest['action_mode']]:.1f} ms)")
    return 0


def cmd_build_engines(args: argparse.Namespace) -> int:
    from vpp_edge.errors import MissingDependencyError
    from vpp_edge.runtime.manifest import read_manifest
    from vpp_edge.extras import is_available

    if args.artifact and args.artifact_old_spelling and args.artifact != args.artifact_old_spelling:
        raise ConfigError(f"two artifacts: --artifact {args.artifact} and {args.artifact_old_spelling}")
    args.artifact = args.artifact or args.artifact_old_spelling or DEFAULT_ARTIFACT
    if not Path(args.artifact).is_dir():
        raise ConfigError(f"no such artifact: {args.artifact} (make one with 'vpp export')")
    read_manifest(args.artifact)  # an artifact folder, not any folder
    if not is_available("tensorrt"):
        raise MissingDependencyError(
            "TensorRT not available on this machine: engines must be built where they run (Jetson: JetPack ships "
            "TensorRT; x86: pip install tensorrt). The artifact's ONNX graphs run on ONNX Runtime meanwhile.")
    from vpp_edge.export.tensorrt_build import build_engines

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    manifest = build_engines(args.artifact, precisions, args.workspace_gb)
    for key, entry in manifest["engines"].items():
        print(f"{key}: {entry['file']} ({entry['gpu_name']}, TensorRT {entry['tensorrt_version']})")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from vpp_edge.runtime.transport import create_keys

    public, secret = create_keys(args.out, args.name)
    print(f"{public} (public: copy it to the peer) and {secret} (secret, mode 0600: stays here)")
    return 0


def _curve_keys(args: argparse.Namespace, name: str, server: str | None = None):
    """This side's CurveZMQ keys ``<name>.key_secret`` (and the server's ``<server>.key``) from --keys."""
    from vpp_edge.runtime.transport import CurveKeys

    keys = getattr(args, "keys", None)  # vpp demo has no link options: its bridge is on loopback
    return CurveKeys.load(keys, name, server) if keys else None


def _add_link_args(p: argparse.ArgumentParser, host_flag: str, host_help: str, keys_help: str) -> None:
    """Where the runtime-bridge link goes and how it is secured (loopback needs nothing)."""
    p.add_argument(host_flag, default="127.0.0.1", help=host_help)
    p.add_argument("--keys", type=Path, help=keys_help)
    p.add_argument("--insecure", action="store_true",
                   help="allow a plaintext link beyond loopback (an isolated network only)")


def _rt_priority(text: str) -> int:
    """A SCHED_FIFO priority, 0 (off) to 99."""
    value = int(text)
    if not 0 <= value <= 99:
        raise ValueError(text)
    return value


def _cpu_list(text: str) -> tuple[int, ...]:
    """``3`` or ``2,3`` -> (2, 3); argparse turns the ValueError into a one-line usage error."""
    cpus = tuple(int(c) for c in text.split(",") if c.strip())
    if not cpus or min(cpus) < 0:
        raise ValueError(text)
    return cpus


def cmd_bridge(args: argparse.Namespace) -> int:
    from vpp_edge.firmware_bridge.bridge import Bridge, Endpoints, Security
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.firmware_bridge.factory import make_driver

    cfg = load_bridge_config(str(args.config) if args.config else args.robot)
    security = Security(_curve_keys(args, "bridge"), str(args.allow) if args.allow else None, args.insecure)
    from vpp_edge.runtime.metrics import print_counts

    from vpp_edge.runtime.realtime import ThreadRealtime

    # SIGINT stops the bridge cleanly (counters, driver stop), even when a non-interactive shell
    # started it in the background with SIGINT ignored, as such shells do (vpp demo stops its
    # bridge with SIGINT). Only the main thread may set a handler (tests run the command in others).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    servo = ThreadRealtime(args.rt_priority, tuple(args.cpus))
    bridge = Bridge(make_driver(cfg), cfg, Endpoints.on(args.host, _base_port(args)), security=security,
                    servo_realtime=servo)
    try:
        with bridge:
            print(f"{args.robot} bridge up: {bridge.bound()}", flush=True)
            try:  # a failed bridge thread raises ThreadFailure: a non-zero exit, and systemd restarts the bridge
                bridge.supervise(args.duration if args.duration else float("inf"))
            except KeyboardInterrupt:
                pass
    finally:  # once closed: the bridge's threads add counters while they run
        print_counts("bridge counters", bridge.counts)
        sys.stdout.flush()
    return 0


def _run_runtime(args: argparse.Namespace) -> dict:
    """Build the runtime as ``vpp run`` describes it, run it, and return its summary with
    what ran (``summary["run"]``) and the verdict (``summary["verdict"]``: None or why it failed)."""
    from vpp_edge.preprocess import source_sizes
    from vpp_edge.runtime.build import build_runtime, open_link, open_policy, resolve_instruction
    from vpp_edge.runtime.cameras.factory import make_cameras
    from vpp_edge.runtime.metrics import Metrics
    from vpp_edge.runtime.verdict import run_verdict

    if getattr(args, "log_frames", False) and not args.log:
        raise ConfigError("--log-frames keeps the camera views beside a run log: it needs --log LOG")
    if getattr(args, "rerun", None):  # a missing optional package fails before any heavy work
        from vpp_edge.rerun_view import require_rerun

        require_rerun()
    artifact, robot, episode, notes = _run_inputs(args)
    config = args.runtime  # the effective runtime config (_run_inputs): flags, --runtime-config, --set
    _print_effective_config(config)
    preset = artifact.preset
    instruction, source = resolve_instruction(config, episode)  # never a demo's on live cameras
    notes += [source] if source else []
    source_sizes(reset=True)  # replay cameras prepare their frames here, live ones while running
    camera_spec = config.cameras.spec(preset.views)  # devices bound by the preset's view names
    cameras = make_cameras(camera_spec, preset.num_views, preset.image_size, episode, config.cameras.fps,
                           config.cameras.dali_device)
    host = config.bridge.host  # vpp demo: its bridge on loopback
    recorder = None
    if getattr(args, "record", None):  # a LeRobot dataset of the run, fed from the metrics thread
        from vpp_edge.recording import EpisodeRecorder

        recorder = EpisodeRecorder(args.record, cameras, instruction, 1.0 / robot.dt, robot.name)
    viewer = None
    if getattr(args, "rerun", None):  # a rerun recording of the run, also fed from the metrics thread
        from vpp_edge.rerun_view import RerunWriter

        viewer = RerunWriter(args.rerun, cameras, robot.dt)
    frame_log = None
    if getattr(args, "log_frames", False):  # camera frames beside the log, for 'vpp replay LOG --video'
        from vpp_edge.run_video import FrameLog, frames_dir

        frame_log = FrameLog(frames_dir(args.log), cameras)
    sinks = [sink for sink in (recorder, viewer, frame_log) if sink is not None]
    link = open_link(config, curve=_curve_keys(args, "runtime", "bridge"))
    metrics = Metrics(args.log, status=not args.quiet and sys.stderr.isatty(), sinks=sinks)
    try:
        with open_policy(config, artifact) as policy:  # the Python API's object
            engine = policy.engine
            if getattr(engine, "choice", None):  # --backend auto: what it chose and why, in one line
                notes.append(engine.choice)
            run = {"artifact": str(artifact.root), "preset": preset.name, "engine": f"{engine.backend}/{engine.precision}",
                   "cameras": f"{camera_spec} ({preset.num_views} view(s) of {preset.image_size}x{preset.image_size})",
                   "instruction": instruction, "robot": f"{robot.name} ({robot.action_dim} actions at "
                   f"{1 / robot.dt:g} Hz)", "bridge": f"{host}, ports {config.bridge.port()}-{config.bridge.port() + 3}", "notes": notes}
            _print_run_header(run)
            _report_instruction(policy, instruction, run)
            metrics.record("run", **run)
            built = build_runtime(config, policy=policy, cameras=cameras, link=link, metrics=metrics, robot=robot,
                                  episode=episode, tick_record_every=_tick_record_every(args, run),
                                  set_instruction=False)  # set above, its truncation said once
            summary = built.run()
    finally:
        metrics.close()
        link.close()
        if viewer is not None:
            viewer.close()
    if recorder is not None:
        _write_recording(recorder, run)
    if viewer is not None:
        run["notes"].append(f"rerun recording {args.rerun}: open it with 'rerun {args.rerun}'")
        print(f"note: {run['notes'][-1]}", flush=True)
    resized = sorted(f"{w}x{h}" for h, w in source_sizes() if (h, w) != (preset.image_size, preset.image_size))
    if resized:  # said once, not per frame
        note = (f"camera frames of {', '.join(resized)} were centre-cropped to squares and resized to "
                f"{preset.image_size}x{preset.image_size} for the model")
        run["notes"].append(note)
        print(f"note: {note}", flush=True)
    summary["backend"] = run["engine"]
    summary["run"] = run
    summary["verdict"] = run_verdict(summary, cameras, robot.dt)
    return summary


def _run_inputs(args: argparse.Namespace):
    """(artifact, robot config, episode, notes) of a run; paths are checked first, and a
    runtime config that changes what the cameras feed the model is said (``notes``). The
    effective runtime config is left in ``args.runtime``."""
    from vpp_edge.runtime.build import open_artifact, replay_episode
    from vpp_edge.runtime.robot_config import load_robot_config

    config, notes = _runtime_config(args)
    args.runtime = config
    artifact = open_artifact(config)
    robot = load_robot_config(config.robot)
    episode = replay_episode(config)  # None for live cameras: a robot loads no demo data
    offered = len(episode.video_paths) if episode is not None else None
    if offered is not None and offered > artifact.preset.num_views:
        notes.append(f"the model takes {artifact.preset.num_views} camera view(s): {offered - artifact.preset.num_views}"
                     f" of the episode's {offered} left out")
    return artifact, robot, episode, notes


def _runtime_config(args: argparse.Namespace):
    """(the effective RuntimeConfig of vpp run/demo, notes). Layers: the flags' defaults, then
    --runtime-config's file, then the flags given on the command line, then --set KEY=VALUE.
    The file's artifact, backend, precision and threads win over the flags too: a calibrated
    recommendation runs as it was measured. ``args.artifact/backend/precision/threads`` follow."""
    from vpp_edge.runtime.config import config_from_dict, deep_update, load_runtime_config, parse_overrides, \
        with_overrides

    _existing(args.episode, "--episode")
    config = _flags_config(args)
    notes: list[str] = []
    path = getattr(args, "runtime_config", None)
    if path:  # from 'vpp calibrate' or 'vpp deploy'
        from vpp_edge.config_schema import read_yaml

        _existing(path, "--runtime-config")
        given = read_yaml(path, "runtime config")
        from_file = {k: v for k, v in load_runtime_config(path).to_dict().items() if k in given}
        defaults = _flags_config(build_parser().parse_args([args.command])).flat()
        measured = ("artifact", "backend", "precision", "threads")
        typed = {k: v for k, v in config.flat().items() if v != defaults.get(k) and not (k in measured and k in given)}
        layer = parse_overrides(f"{k}={_yaml_value(v)}" for k, v in typed.items())
        config = config_from_dict(deep_update(deep_update(config.to_dict(), from_file), layer), str(path))
        if {"artifact", "backend", "precision"} <= set(given):
            notes.append(f"runtime config {path}: artifact {config.artifact}, {config.backend}/{config.precision} "
                         "(replacing --artifact, --backend and --precision)")
        if given.get("threads"):  # the thread count the recommendation was measured with
            notes.append(f"runtime config {path}: {config.threads} inference thread(s) (replacing --threads)")
    config = with_overrides(config, getattr(args, "set", None) or [])
    args.artifact, args.backend, args.precision, args.threads = config.artifact, config.backend, config.precision, \
        config.threads
    return config, notes


def _yaml_value(value: Any) -> str:
    """A value as ``--set`` reads it back (YAML, on one line)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()


def _flags_config(args: argparse.Namespace):
    """The RuntimeConfig the command-line flags of vpp run/demo describe."""
    from vpp_edge.runtime.config import CameraConfig, LinkConfig, RuntimeConfig, SmoothingConfig

    kind, _, devices = args.cameras.partition(":")
    keys = getattr(args, "keys", None)
    return RuntimeConfig(
        artifact=Path(args.artifact or DEFAULT_ARTIFACT), backend=args.backend, precision=args.precision,
        threads=args.threads, seed=args.seed, robot=args.robot, instruction=args.instruction,
        cameras=CameraConfig(kind, devices, args.camera_fps, args.dali_device, str(args.episode) if args.episode else None),
        smoothing=SmoothingConfig(args.smoothing, args.crossfade_steps, args.ensemble_m, args.margin_steps),
        bridge=LinkConfig(getattr(args, "bridge_host", "127.0.0.1"), args.base_port, str(keys) if keys else None,
                          getattr(args, "insecure", False)),
        duration_s=args.duration, rt_priority=args.rt_priority)


def _print_effective_config(config: Any) -> None:
    """The effective runtime config at start, one ``key: value`` per line (the keys --set takes)."""
    print("runtime config (change any with --set KEY=VALUE):")
    for key, value in config.flat().items():
        print(f"  {key}: {value}")
    sys.stdout.flush()


def _run_options(args: argparse.Namespace, run: dict):
    """The control loop's options from the command line (smoothing and its parameters included)."""
    from vpp_edge.runtime.build import run_options

    config = getattr(args, "runtime", None) or _runtime_config(args)[0]
    return run_options(config, tick_record_every=_tick_record_every(args, run))


def _non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a non-negative number: {text!r}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return value


def _tick_record_every(args: argparse.Namespace, run: dict) -> int:
    """--log-ticks, else every tick for a run of finite duration and none for an endless one
    (a deployed service's log would grow by GBs a day); --record and --rerun need every tick."""
    import math

    if getattr(args, "record", None) or getattr(args, "rerun", None):
        return 1
    if args.log_ticks is not None:
        return args.log_ticks
    if args.log and math.isinf(args.duration):
        run["notes"].append("an endless run logs no per-tick records (--log-ticks N: every Nth tick)")
        print(f"note: {run['notes'][-1]}", flush=True)
        return 0
    return 1


def _write_recording(recorder: Any, run: dict) -> None:
    """Write ``vpp run --record``'s dataset and say how to train on it (or that it is empty)."""
    if not len(recorder):
        note = f"--record {recorder.out}: nothing recorded (no target was sent with a camera frame and a robot state)"
    else:
        path = recorder.write()
        note = (f"recorded {len(recorder)} steps to {path} (LeRobot v3.0); train on it with: vpp train policy "
                f"--set 'data.sources=[{{format: lerobot, path: {path}}}]'")
    run["notes"].append(note)
    print(f"note: {note}", flush=True)


def _report_instruction(policy: Any, instruction: str, run: dict) -> None:
    """Set the instruction; a truncation warning becomes one line of the run's notes, said once."""
    import warnings

    from vpp_edge.tokenizer import InstructionTruncatedWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InstructionTruncatedWarning)
        policy.set_instruction(instruction)
    for w in caught:
        if issubclass(w.category, InstructionTruncatedWarning):
            note = f"instruction: {w.message}"
            run["notes"].append(note)
            print(f"note: {note}", flush=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _print_run_header(run: dict) -> None:
    """What is about to run, one line per part (the summary repeats it under "run")."""
    width = max(len(k) for k in run if k != "notes")
    for key, value in run.items():
        if key != "notes":
            print(f"{key:>{width}}  {value}")
    for note in run["notes"]:
        print(f"note: {note}")
    sys.stdout.flush()


def _print_run(summary: dict) -> None:
    from vpp_edge.runtime.metrics import print_counts, print_summary

    print_summary(summary)
    only_safety = {k: v for k, v in summary["safety"].items() if k not in summary["counts"]}
    if only_safety:  # the gate's verdicts are counters already; its chunk refusals by reason are not
        print_counts("safety gate (not in the counters above)", only_safety)
    if summary.get("link"):
        print_counts("bridge inputs refused", summary["link"])
    bj = summary["boundary_jump"]
    print(f"engine {summary['backend']}; boundary jump max {bj['max']:.4f} mean {bj['mean']:.4f} "
          f"(within chunks {bj['inner_mean']:.4f})")


def _finish_run(summary: dict, args: argparse.Namespace) -> int:
    """Write --json, then the verdict: 0, or :class:`RunFailed` with its one line."""
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=float))
    if args.log:
        print(f"run log {args.log}: 'vpp plot {args.log}' draws targets and robot states over time, "
              f"'vpp replay {args.log} --video OUT.mp4' the run as an annotated video")
    if summary["verdict"] is not None:
        raise RunFailed(summary["verdict"])
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    summary = _run_runtime(args)
    _print_run(summary)
    return _finish_run(summary, args)


METAWORLD_ARTIFACT = Path("artifacts/metaworld_tiny")  # exported from METAWORLD_CHECKPOINT on first use
# The trained MetaWorld policy shipped with the repository (FP16 weights; make metaworld-policy remakes it).
METAWORLD_CHECKPOINT = Path("models/metaworld-tiny")
DEFAULT_ARTIFACT = Path("artifacts/tiny")


def _metaworld_artifact() -> Path:
    """The MetaWorld artifact, exported (FP32, one parity sample) from the shipped checkpoint
    when it is not there yet."""
    if not (METAWORLD_ARTIFACT / "manifest.json").is_file():
        print(f"no artifact at {METAWORLD_ARTIFACT}: exporting the trained MetaWorld policy "
              f"{METAWORLD_CHECKPOINT} (FP32, about a minute on 2 cores)", flush=True)
        code = main(["export", "--checkpoint", str(METAWORLD_CHECKPOINT), "--out", str(METAWORLD_ARTIFACT),
                     "--precisions", "fp32", "--parity-samples", "1", "--quiet"])
        if code:
            raise VPPError(f"exporting {METAWORLD_CHECKPOINT} failed (exit {code})")
    return METAWORLD_ARTIFACT


def _demo_metaworld(args: argparse.Namespace) -> int:
    """The trained MetaWorld policy, closed loop on the demo's tasks through bridge + runtime:
    success per episode from MetaWorld's flag, an annotated video per episode."""
    from vpp_edge.evaluation.commands import AnnotatedVideo, print_episode
    from vpp_edge.evaluation.metaworld import DEMO_TASKS, EvalOptions, evaluate, write_report

    artifact = _metaworld_artifact()
    tasks = (args.task,) if args.task else DEMO_TASKS
    print(f"trained MetaWorld policy ({artifact}): closed loop on {', '.join(tasks)}, {args.episodes} "
          "episode(s) each (MetaWorld on MuJoCo -> cameras -> runtime -> bridge)", flush=True)
    out = Path("results/demo")
    results = evaluate(artifact, EvalOptions(tasks=tasks, episodes=args.episodes, smoothing=args.smoothing,
                                             video_dir=str(out), video=AnnotatedVideo(), on_episode=print_episode))
    print(write_report(results, out).read_text())
    print(f"annotated videos (camera views, instruction, step, predicted chunk vs actions sent): {out}/*.mp4")
    return 0 if results["average_success"] > 0 else 5  # 5: the run's verdict, as vpp run's


def _use_metaworld(args: argparse.Namespace) -> bool:
    """--sim: metaworld needs the trained policy and MetaWorld (errors otherwise); auto takes
    it when both exist and no --artifact was given; kinematic never."""
    import ctypes.util

    from vpp_edge.errors import MissingDependencyError
    from vpp_edge.extras import is_available

    have_policy = (METAWORLD_ARTIFACT / "manifest.json").is_file() or (METAWORLD_CHECKPOINT / "vpp_config.json").is_file()
    if args.sim == "metaworld":
        if not have_policy:
            raise ConfigError(f"--sim metaworld: no trained MetaWorld policy at {METAWORLD_CHECKPOINT} or "
                              f"{METAWORLD_ARTIFACT} (make metaworld-policy)")
        if not is_available("metaworld"):
            raise MissingDependencyError("--sim metaworld: MetaWorld is not installed (pip install metaworld)")
        return True
    if not (args.sim == "auto" and args.artifact is None and have_policy and is_available("metaworld")):
        return False
    if ctypes.util.find_library("EGL") is None:  # MuJoCo renders the cameras off-screen with EGL
        print("MetaWorld's cameras need libEGL (make system-deps): the demo runs the kinematic simulator instead")
        return False
    return True


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default, closed loop. With a trained MetaWorld policy (make
    metaworld-policy) and no --artifact: MetaWorld episodes through bridge and runtime.
    Otherwise: export the tiny model if needed, start the kinematic sim bridge in its own
    process on free ports (its log goes to a file), run the runtime against it over
    ZeroMQ, print the summary."""
    import subprocess
    import tempfile

    from vpp_edge.runtime.protocol import free_base_port

    if _use_metaworld(args):
        return _demo_metaworld(args)
    args.artifact = Path(args.artifact or DEFAULT_ARTIFACT)
    if not (args.artifact / "manifest.json").is_file():
        print(f"no artifact at {args.artifact}: exporting the tiny preset first (about two minutes on 2 cores, "
              "45 s more with OpenVINO: its INT8 and the fastest gated CPU engine, the run's backend)")
        code = main(["export", "--preset", "tiny", "--out", str(args.artifact)])
        if code:
            return code
    if args.base_port is None:  # beside any other bridge on this machine
        args.base_port = free_base_port(start=_base_port(args))
    bridge_log = Path(tempfile.gettempdir()) / f"vpp-demo-bridge-{args.base_port}.log"
    with open(bridge_log, "w", encoding="utf-8") as err:
        bridge = subprocess.Popen([sys.executable, "-m", "vpp_edge.cli", "bridge", "--robot", "sim",
                                   "--base-port", str(args.base_port), "--duration", str(args.duration + 30)],
                                  stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        ready = bridge.stdout.readline() if bridge.stdout else ""
        if "bridge up" not in ready:
            bridge.wait(timeout=10)
            tail = bridge_log.read_text().strip().splitlines()[-1:] or [ready.strip()]
            raise VPPError(f"the sim bridge did not start: {tail[0]} (log {bridge_log})")
        print(ready.strip(), f"(its log: {bridge_log})", flush=True)
        summary = _run_runtime(args)
    finally:
        bridge.send_signal(2)
        try:
            out, _ = bridge.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            bridge.kill()
            out, _ = bridge.communicate()
    _print_run(summary)
    print(out.rstrip())  # the bridge's counter table, after the runtime's summary
    return _finish_run(summary, args)


def cmd_plot(args: argparse.Namespace) -> int:
    from vpp_edge.runlog import plot_run

    _existing(args.log, "run log")
    out = plot_run(args.log, args.out)
    print(f"wrote {out}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """The rerun recording (without --video, or with --out), the annotated video (--video)."""
    from vpp_edge.extras import require

    _existing(args.log, "run log")
    _existing(args.frames, "--frames")
    if args.video is None or args.out is not None:
        from vpp_edge.rerun_view import replay_log

        require("rerun", "vpp replay (a rerun recording of a run log)")
        out = replay_log(args.log, args.out)
        print(f"wrote {out}: open it with 'rerun {out}'")
    if args.video is not None:
        from vpp_edge.run_video import frames_dir, render_video

        video, count, _ = render_video(args.log, args.video, args.fps, args.frames)
        frames = args.frames or frames_dir(args.log)
        seen = f"camera views from {frames}" if Path(frames).is_dir() else \
            "no camera views (record them with 'vpp run --log LOG --log-frames')"
        print(f"wrote {video}: {count} frames at {args.fps:g} fps, {seen}")
    return 0


def _add_run_args(p: argparse.ArgumentParser, duration: float, artifact_default: Path | None = DEFAULT_ARTIFACT) -> None:
    p.add_argument("--artifact", type=Path, default=artifact_default,
                   help=f"export artifact (default {artifact_default or DEFAULT_ARTIFACT})")
    p.add_argument("--robot", default="sim", help="robot description (vpp_edge/robots/<name>.yaml, shared with the "
                   "bridge): sim, metaworld, panda, xarm_xhand or a YAML (default %(default)s)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, metavar="BACKEND",
                   help="%(choices)s (default %(default)s)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, metavar="PRECISION",
                   help="%(choices)s (default: the backend's)")
    p.add_argument("--cameras", default="replay", metavar="SPEC",
                   help="replay | replay-dali | v4l2:DEV[,DEV] | dali:DEV[,DEV] | gstreamer:DEV[,DEV] | "
                        "auto:DEV[,DEV] | zmq[:ENDPOINT] (one device per view; auto: DALI, else GStreamer (Jetson "
                        "hardware JPEG), else OpenCV; zmq: views streamed by a simulator bridge, as 'vpp eval'; "
                        "e.g. auto:/dev/video0,/dev/video2; default replay)")
    p.add_argument("--dali-device", default="auto", choices=["auto", "gpu", "cpu"],
                   help="DALI decode on auto | gpu | cpu (default auto)")
    p.add_argument("--episode", type=Path, help="episode replayed as the cameras (default: the demo episode)")
    p.add_argument("--camera-fps", type=float, help="replay rate (default: the recorded rate)")
    p.add_argument("--instruction", help="task instruction (default: the episode's)")
    p.add_argument("--smoothing", default="crossfade", choices=SMOOTHING_CHOICES, metavar="MODE",
                   help="%(choices)s (default %(default)s)")
    p.add_argument("--crossfade-steps", type=_non_negative, default=3, metavar="N",
                   help="crossfade: control ticks over which a new chunk fades in (default %(default)s; 0 acts as 1)")
    p.add_argument("--ensemble-m", type=_non_negative_float, default=0.1, metavar="M",
                   help="ensemble: a tick's i-th prediction, oldest first, weighs exp(-M * i) (default %(default)s)")
    p.add_argument("--margin-steps", type=_non_negative, default=2, metavar="N",
                   help="infer when the plan would run dry within p95 latency + N control ticks (default %(default)s)")
    p.add_argument("--duration", type=float, default=duration, help=f"seconds to run (default {duration:g})")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--threads", type=_non_negative, default=0, metavar="N",
                   help="CPU inference threads of ONNX Runtime, OpenVINO or torch (default 0: the backend's choice)")
    p.add_argument("--rt-priority", type=int, default=0,
                   help="SCHED_FIFO priority for the control thread (needs CAP_SYS_NICE; default %(default)s: off)")
    p.add_argument("--log", type=Path, help="JSONL record of the run: chunks, targets sent and robot states per "
                                            "tick, events (plot it with 'vpp plot LOG')")
    p.add_argument("--log-ticks", type=_non_negative, metavar="N", help="with --log: a tick record every N ticks, 0 none "
                   "(default 1; 0 for --duration inf, where a tick log grows by GBs a day)")
    p.add_argument("--record", type=Path, metavar="DIR", help="write the run as a LeRobot v3.0 dataset (frames, "
                   "robot states, actions sent, instruction) that 'vpp train' reads; DIR must be new or empty")
    p.add_argument("--log-frames", action="store_true", help="with --log: also keep the camera views (as the model "
                   "saw them, JPEG, 10 a second, 160 px) in LOG.frames/ for 'vpp replay LOG --video OUT.mp4'")
    p.add_argument("--rerun", type=Path, metavar="FILE.rrd", help="write a rerun recording of the run (camera views, "
                   "predicted chunks vs targets sent, robot state, latency per stage; open it with 'rerun FILE.rrd'; "
                   "needs the optional rerun-sdk)")
    p.add_argument("--json", type=Path, help="write the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no live status line; only warnings are logged")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a runtime config value (after the flags and --runtime-config), e.g. --set "
                        "smoothing.policy=ensemble --set cameras.devices='{static: 0, gripper: 2}' (repeatable; "
                        "values are YAML; vpp run prints every key at start)")
    _add_port_arg(p)


def cmd_train(args: argparse.Namespace) -> int:
    """Stage 1 (tvp) or stage 2 (policy) training; works under accelerate launch / torchrun."""
    from vpp_edge.training.train import load_config, train_policy, train_tvp

    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    config = args.config or f"{args.stage}_tiny"
    cfg = load_config(config, overrides, stage=args.stage)
    out = args.out or Path("runs") / f"{args.stage}-{Path(config).stem}"
    train = train_policy if args.stage == "policy" else train_tvp
    summary = train(cfg, out, resume=args.resume, progress=not args.quiet)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    first, last = summary["loss_first"], summary["loss_last"]
    loss = f"loss {first:.4f} -> {last:.4f}" if first is not None else "no loss logged"
    print(f"trained {summary['steps'] - summary['start_step']} steps in {summary['seconds']:.1f} s, {loss}; "
          f"checkpoint {summary['checkpoint']}")
    return 0


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train VPP: stage 1 (TVP video model) or stage 2 (policy)",
                       description="Train from a config in training/configs (or a YAML file) into a run folder "
                                   "with checkpoints/, last, metrics.csv, tensorboard/ and summary.json. Runs in "
                                   "one process or under 'accelerate launch -m vpp_edge.cli train ...' / torchrun.")
    p.add_argument("stage", choices=["policy", "tvp"], help="policy: Video Former + action head on frozen TVP "
                   "features; tvp: fine-tune the video model")
    p.add_argument("--config", default=None, help="config name (policy_tiny, tvp_tiny, ...) or YAML file "
                   "(default: <stage>_tiny)")
    p.add_argument("--out", type=Path, help="run folder (default runs/<stage>-<config>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. "
                   "--set optim.lr=3e-4 --set init.tvp=runs/tvp-tiny/last (repeatable; values are YAML)")
    p.add_argument("--steps", type=int, help="total optimizer steps (overrides the config)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--json", type=Path, help="also write the summary here")
    p.add_argument("--quiet", action="store_true", help="no progress bars; only warnings are logged")
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpp", description="Video Prediction Policy on the robot: "
                                     "predict, export, run and bridge.")
    parser.add_argument("--version", action="version", version=f"vpp-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="predict one action chunk from a recorded episode",
                       description="Run one VPP predict step (text -> TVP -> Video Former -> action head) on one "
                                   "time step of an episode in the official sample format; print the action chunk "
                                   "and per-stage timings.")
    _add_weight_args(p)
    src = p.add_argument_group("input (default: first XHand sample episode, or a synthetic one)")
    src.add_argument("--episode", type=Path, help="annotation JSON of an episode")
    src.add_argument("--dataset", type=Path, help="dataset folder (annotation/val/*.json); see --index")
    src.add_argument("--index", type=int, default=0, help="episode number within --dataset (default 0)")
    src.add_argument("--frame", type=int, default=0, help="time step of the episode to act on (default 0)")
    src.add_argument("--instruction", help="override the episode's instruction")
    src.add_argument("--state", type=float, nargs="+", metavar="V",
                     help="raw robot state for a preset that takes one (action_head.use_proprio, e.g. xbot); "
                          "default: the episode's recorded state at --frame")
    p.add_argument("--seed", type=int, default=0, help="noise seed: same seed, same actions (default 0)")
    p.add_argument("--repeat", type=int, default=3, help="runs; timings are medians after the first (default 3)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", type=Path, help="also write the result as JSON (actions: the commands, as printed; "
                   "action_base: what the prediction is relative to, and its base and predicted_actions where "
                   "that is the robot state)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export ONNX graphs (FP32/FP16/INT8) with parity gates into an artifact",
                       description="Export the text, TVP, Video Former and action-head graphs, check each against "
                                   "PyTorch in ONNX Runtime on real frames, derive FP16 and INT8 (QDQ) variants, and "
                                   "write an artifact folder with manifest.json and parity.md. Exits 4 if a gate fails.")
    _add_weight_args(p)
    p.add_argument("--out", type=Path, help="artifact folder (default artifacts/<preset>)")
    p.add_argument("--config", type=Path, help="YAML overriding export/defaults.yaml (gates, FP16/INT8 options)")
    p.add_argument("--precisions", help=f"comma list from {','.join(precisions.names())} (default all; int8_ov "
                        "when OpenVINO and NNCF are installed; fp32 only for a model past 2 GB of weights, docs/export.md)")
    p.add_argument("--parity-samples", type=int, help="held-out observations for the gates")
    p.add_argument("--calibration-samples", type=int, help="observations for INT8 calibration")
    p.add_argument("--data", type=Path, action="extend", nargs="+", metavar="DIR",
                   help="folder(s) of datasets in the official sample format supplying the parity and calibration "
                        "frames (repeatable; default shared/vpp_samples), as for 'vpp calibrate'")
    p.add_argument("--calibration-data", dest="data_old_spelling", type=Path, action="extend", nargs="+",
                   help=argparse.SUPPRESS)  # the spelling before --data: still accepted
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar; only warnings are logged")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build-engines", help="build TensorRT engines for an artifact on this machine",
                       description="Build TensorRT engines from the artifact's ONNX graphs here (engines are not "
                                   "portable across GPUs or TensorRT versions). Exits 3 if TensorRT is missing.")
    p.add_argument("--artifact", type=Path, help="export artifact folder (vpp export; default artifacts/tiny)")
    p.add_argument("artifact_old_spelling", type=Path, nargs="?", metavar="ARTIFACT",
                   help=argparse.SUPPRESS)  # the spelling before --artifact: still accepted
    p.add_argument("--precisions", default="fp16",
                   help=f"comma list from {','.join(precisions.engine_sources())} (default fp16)")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace limit (default 4 GiB)")
    p.set_defaults(func=cmd_build_engines)

    p = sub.add_parser("run", help="run the policy on the robot: cameras -> engine -> chunking -> safety -> bridge",
                       description="Run the artifact closed loop against a bridge: cameras -> engine -> action plan "
                                   "-> safety gate -> bridge, at the robot config's control rate. Prints what runs, "
                                   "then a summary; exits 5 with one line when the run did not do its job (a camera "
                                   "never delivered, the bridge went silent, most chunks were refused).")
    _add_run_args(p, 10.0)
    _add_link_args(p, "--bridge-host", "the bridge computer's address (default 127.0.0.1)",
                   "CurveZMQ keys folder holding runtime.key_secret and the bridge's bridge.key (vpp keys)")
    p.add_argument("--runtime-config", type=Path, help="runtime config YAML (e.g. recommended.yaml from 'vpp "
                   "calibrate'): its artifact, backend and precision replace --artifact/--backend/--precision")
    p.set_defaults(func=cmd_run)

    from vpp_edge.calibrate.commands import add_parser as add_calibrate_parser

    add_calibrate_parser(sub)  # vpp calibrate {sweep,report,dataset,knobs}

    from vpp_edge.evaluation.commands import add_parsers as add_evaluation_parsers

    add_evaluation_parsers(sub)  # vpp record metaworld, vpp eval metaworld

    p = sub.add_parser("bridge", help="run a robot bridge (ZeroMQ <-> robot controller)",
                       description="Serve a robot (or a simulator) to runtimes over ZeroMQ: targets in, state and "
                                   "events out, its own deadlines and limits. Exits non-zero if a bridge thread fails.")
    p.add_argument("--robot", default="sim", help="robot description: sim, metaworld, panda, xarm_xhand "
                   "(vpp_edge/robots/<name>.yaml) or a YAML (default %(default)s)")
    p.add_argument("--config", type=Path,
                   help="robot description YAML (default vpp_edge/robots/<robot>.yaml, shared with the runtime)")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (default: run until Ctrl-C)")
    _add_link_args(p, "--host", "interface to bind (default 127.0.0.1; 0.0.0.0: all, needs --keys or --insecure)",
                   "CurveZMQ keys folder holding bridge.key_secret (vpp keys bridge)")
    p.add_argument("--allow", type=Path, help="folder of the client public keys (*.key) the bridge admits")
    p.add_argument("--rt-priority", type=_rt_priority, default=0, metavar="0-99",
                   help="SCHED_FIFO priority of the servo thread only (default %(default)s: best effort); above the "
                        "runtime's control thread when both share a computer")
    p.add_argument("--cpus", type=_cpu_list, default=(), metavar="LIST",
                   help="CPUs of the servo thread, e.g. 3 or 2,3 (default: any)")
    _add_port_arg(p)
    p.set_defaults(func=cmd_bridge)

    p = sub.add_parser("keys", help="make a CurveZMQ key pair for a runtime-bridge link beyond loopback",
                       description="Write NAME.key (public: copy it to the peer) and NAME.key_secret (mode 0600).")
    p.add_argument("name", help="bridge | runtime | an operator's name")
    p.add_argument("--out", type=Path, default=Path("keys"), help="folder (default ./keys)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("demo", help="the embedded default, closed loop: the trained MetaWorld policy if present, "
                                    "else the tiny model + replay cameras + kinematic sim bridge",
                       description="Closed loop on this machine: the kinematic sim bridge (its own process, on free "
                                   "ports, its log in a file) and the runtime, or the trained MetaWorld policy. "
                                   "Exits like 'vpp run'.")
    _add_run_args(p, 10.0, artifact_default=None)
    p.add_argument("--sim", choices=["auto", "metaworld", "kinematic"], default="auto",
                   help=f"auto: MetaWorld with the trained policy ({METAWORLD_CHECKPOINT}) when MetaWorld is installed "
                        "and no --artifact is given, else kinematic (default auto)")
    p.add_argument("--task", help="one MetaWorld task (default: each of the demo's tasks, vpp eval metaworld's default)")
    p.add_argument("--episodes", type=int, default=1, help="MetaWorld episodes per task (default 1)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plot", help="plot a run's JSONL log (--log): targets sent vs robot state over time",
                       description="Draw a PNG from 'vpp run/demo --log LOG': per action dimension the targets the "
                                   "runtime sent and the bridge's setpoint over time, chunk arrivals and events.")
    p.add_argument("log", type=Path, help="JSONL run log written by --log")
    p.add_argument("--out", type=Path, help="PNG to write (default: the log's name with .png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("replay", help="a run's JSONL log (--log) as a rerun recording (.rrd) or an annotated video",
                       description="Turn 'vpp run/demo --log LOG' into a rerun recording: predicted chunks vs the "
                                   "targets sent and the robot's setpoint per action dimension, joints, per-stage "
                                   "latency and events over time (no camera frames: the log has none; 'vpp run "
                                   "--rerun' records them). Needs the optional rerun-sdk. With --video OUT.mp4: an "
                                   "annotated video of the run instead, with the camera views when the run kept "
                                   "them (--log-frames).")
    p.add_argument("log", type=Path, help="JSONL run log written by --log")
    p.add_argument("--out", type=Path, help="recording to write (default: the log's name with .rrd; with --video: "
                   "none unless given)")
    p.add_argument("--video", type=Path, metavar="OUT.mp4", help="write the run as an annotated video instead: camera "
                   "views (from --log-frames), instruction, time, sending or holding and the robot's mode, events, "
                   "and per action dimension the predicted chunk vs the targets sent (default: no video)")
    p.add_argument("--frames", type=Path, metavar="DIR", help="with --video: the camera views' folder (default "
                   "LOG.frames, written by 'vpp run --log LOG --log-frames')")
    p.add_argument("--fps", type=_positive_float, default=10.0, help="with --video: frames per second of run time "
                   "(default %(default)s)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("presets", help="list presets, or show one",
                       description="List the model presets, or print one in full as YAML.")
    p.add_argument("name", nargs="?", help="preset to show in full")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("doctor", help="report which optional components (TensorRT, DALI, robot SDKs) are present",
                       description="Which optional components are installed; with --artifact, verify an artifact "
                                   "and (--selftest) run it.")
    p.add_argument("--artifact", type=Path, help="also verify this artifact's files against its manifest")
    p.add_argument("--selftest", action="store_true", help="with --artifact: load the engines, run inference, "
                   "print latencies (exit 2 if anything fails)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, metavar="BACKEND",
                   help="self-test backend: %(choices)s (default %(default)s)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, metavar="PRECISION",
                   help="self-test precision: %(choices)s (default: the backend's)")
    p.add_argument("--runs", type=int, default=3, help="self-test inferences (default 3)")
    p.add_argument("--json", type=Path, help="write the self-test result as JSON")
    p.set_defaults(func=cmd_doctor)

    from vpp_edge.deploy.cli import add_arguments as add_deploy_arguments

    p = sub.add_parser("deploy", help="deploy an artifact to a robot computer (Jetson) over SSH",
                       description="Bundle the runtime code, the artifact and the settings; copy them with rsync; "
                                   "on the target check JetPack/CUDA/TensorRT/Python/memory, build TensorRT engines "
                                   "(or fall back to ONNX Runtime), self-test, install and restart the systemd units; "
                                   "roll back to the previous bundle if any step fails. Nothing changed: nothing done.")
    add_deploy_arguments(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("convert", help="convert official VPP weights into a vpp-edge checkpoint",
                       description="Load the official video model, CLIP and action model and save them as one "
                                   "vpp-edge checkpoint folder.")
    _add_weight_args(p)
    p.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("compact", help="an FP16 copy of a vpp-edge checkpoint (half the size, to ship it)",
                       description="Copy a vpp-edge checkpoint with its weights stored in FP16; loading casts them "
                                   "back to FP32, so export, predict and train take the copy as they take the original.")
    p.add_argument("checkpoint", type=Path, help="vpp-edge checkpoint folder (e.g. runs/policy-metaworld/last)")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    p.set_defaults(func=cmd_compact)

    _add_train_parser(sub)  # vpp train {policy,tvp}
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from vpp_edge.errors import MissingDependencyError
    from vpp_edge.runtime.threads import ThreadFailure

    try:
        return args.func(args)
    except MissingDependencyError as exc:
        print(f"vpp {args.command}: {exc}", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    except (RunFailed, ThreadFailure) as exc:  # ran, and failed: a camera, the bridge, a worker thread
        print(f"vpp {args.command}: failed: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except VPPError as exc:
        from vpp_edge.export.parity import ParityError

        print(f"vpp {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_PARITY if isinstance(exc, ParityError) else EXIT_ERROR
    except OSError as exc:  # disk full, permissions, ...: one line, not a traceback
        print(f"vpp {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"vpp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
