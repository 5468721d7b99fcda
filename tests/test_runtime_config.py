"""The runtime config (issue 21): one frozen RuntimeConfig from YAML with --set overrides, and
one build_runtime(config) that wires the loop from it. Torch-free: runs under make test-robot."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vpp_edge.errors import ConfigError
from vpp_edge.runtime.build import build_runtime, replay_episode, resolve_instruction
from vpp_edge.runtime.config import (CameraConfig, RuntimeConfig, SmoothingConfig, load_runtime_config,
                                     with_overrides, write_runtime_config)


def test_a_config_round_trips_through_yaml_with_its_artifact_relative(tmp_path):
    config = RuntimeConfig(tmp_path / "art", "onnxruntime", "fp32", 2, {"measured": {"p50_ms": 12.0}},
                           instruction="open the drawer", robot="panda",
                           cameras=CameraConfig("v4l2", {"static": "/dev/video0", "wrist": "/dev/video2"}),
                           smoothing=SmoothingConfig("ensemble", ensemble_m=0.25))
    path = write_runtime_config(tmp_path / "run.yaml", config)
    assert "artifact: art\n" in path.read_text()  # relative: the folder moves to the robot whole
    again = load_runtime_config(path)
    assert again == config.replace(artifact=tmp_path / "art")
    assert again.cameras.spec(["static", "wrist"]) == "v4l2:/dev/video0,/dev/video2"
    assert again.cameras.spec(["wrist", "static"]) == "v4l2:/dev/video2,/dev/video0"  # by name, not position
    with pytest.raises(ConfigError, match=r"by name.*preset's views are \['wrist', 'scene'\] \(missing \['scene'\]"):
        again.cameras.spec(["wrist", "scene"])


def test_overrides_are_dotted_keys_with_yaml_values():
    config = with_overrides(RuntimeConfig(), ["smoothing.policy=ensemble", "smoothing.ensemble_m=0.5", "threads=2",
                                              "cameras.source=v4l2", "cameras.devices={static: 0, gripper: 2}",
                                              "duration_s=.inf", "instruction=pick up the cup"])
    assert (config.smoothing.policy, config.smoothing.ensemble_m, config.threads) == ("ensemble", 0.5, 2)
    assert config.cameras.spec(["static", "gripper"]) == "v4l2:0,2" and config.duration_s == float("inf")
    assert config.instruction == "pick up the cup"
    flat = config.flat()  # what vpp run prints at start: every key --set takes
    assert flat["smoothing.policy"] == "ensemble" and flat["cameras.devices"] == {"static": 0, "gripper": 2}
    assert {"artifact", "backend", "bridge.base_port", "rt_priority"} <= set(flat)
    for pairs, message in [(["smoothing.polcy=x"], "unknown key 'smoothing.polcy' \\(did you mean 'smoothing.policy'"),
                           (["threads=-1"], "'threads' must be an integer >= 0"),
                           (["cameras.dali_device=tpu"], "auto, gpu or cpu"),
                           (["smoothing=fast"], "'smoothing' takes a mapping"),
                           (["rt_priority=120"], "0-99"),
                           (["target_stream=chunks"], "'target_stream' is one of waypoints, per_tick"),
                           (["threads"], "expected KEY=VALUE")]:
        with pytest.raises(ConfigError, match=message):
            with_overrides(RuntimeConfig(), pairs)


def test_files_of_format_version_1_still_load(tmp_path):
    (tmp_path / "art").mkdir()
    (tmp_path / "old.yaml").write_text("format: vpp-edge-runtime-config\nformat_version: 1\nartifact: art\n"
                                       "backend: onnxruntime\nprecision: int8\nthreads: 2\nknobs: {frames: 2}\n")
    config = load_runtime_config(tmp_path / "old.yaml", ["smoothing.margin_steps=4"])
    assert (config.artifact, config.backend, config.precision, config.threads) == \
        (tmp_path / "art", "onnxruntime", "int8", 2)
    assert config.info == {"knobs": {"frames": 2}} and config.smoothing.margin_steps == 4
    (tmp_path / "new.yaml").write_text("format: vpp-edge-runtime-config\nformat_version: 3\n")
    with pytest.raises(ConfigError, match="format_version 3 is not supported"):
        load_runtime_config(tmp_path / "new.yaml")
    (tmp_path / "other.yaml").write_text("artifact: art\n")
    with pytest.raises(ConfigError, match="not a runtime config"):
        load_runtime_config(tmp_path / "other.yaml")


def test_the_instruction_never_comes_silently_from_demo_data(demo_episode):
    live = RuntimeConfig(cameras=CameraConfig("v4l2", "/dev/video0,/dev/video2"))
    assert replay_episode(live) is None  # live cameras: no demo episode is even loaded
    with pytest.raises(ConfigError, match="no instruction: give the task with --instruction"):
        resolve_instruction(live)
    assert resolve_instruction(live.replace(instruction="wipe the table")) == ("wipe the table", None)
    replay = RuntimeConfig(cameras=CameraConfig("replay", episode=str(demo_episode)))
    episode = replay_episode(replay)
    text, note = resolve_instruction(replay, episode)
    assert text == episode.instruction and "instruction from the replayed episode" in note


class FakePolicy:
    """What the loop drives (a RuntimePolicy's interface), without an artifact on disk."""

    def __init__(self, action_dim):
        preset = SimpleNamespace(action_dim=action_dim, views=("static", "gripper"), num_views=2, image_size=32)
        self.artifact = SimpleNamespace(preset=preset)
        self.preset = preset
        self.instruction = None

    def set_instruction(self, text):
        self.instruction = text
        return 0.0


def test_build_runtime_wires_the_loop_from_the_config(demo_episode):
    from vpp_edge.runtime.robot_config import load_robot_config

    robot = load_robot_config("sim")
    policy = FakePolicy(robot.action_dim)
    config = RuntimeConfig(instruction="stack the cups", duration_s=2.0, rt_priority=5, target_stream="per_tick",
                           cameras=CameraConfig("replay", episode=str(demo_episode)),
                           smoothing=SmoothingConfig("ensemble", crossfade_steps=5, ensemble_m=0.25, margin_steps=4,
                                                     action_dt=0.05))
    link, metrics = SimpleNamespace(close=lambda: None), SimpleNamespace(close=lambda: None)
    with build_runtime(config, policy=policy, link=link, metrics=metrics) as built:
        runtime = built.runtime
        assert built.robot == robot and built.instruction == policy.instruction == "stack the cups"
        assert (runtime.plan.smoothing, runtime.plan.crossfade_steps, runtime.plan.ensemble_m) == ("ensemble", 5, 0.25)
        assert runtime.plan.dt == 0.05 and runtime.options.margin_steps == 4
        assert (runtime.options.duration_s, runtime.options.realtime_priority) == (2.0, 5)
        assert runtime.options.target_stream == "per_tick" and RuntimeConfig().target_stream == "waypoints"
        assert [c.name for c in built.cameras] and built.owned == []  # the parts given stay the caller's
    with pytest.raises(ConfigError, match="no instruction"):
        build_runtime(RuntimeConfig(cameras=CameraConfig("zmq")), policy=policy, link=link, metrics=metrics)


def test_vpp_run_flags_then_the_file_then_set(tmp_path):
    from vpp_edge import cli

    (tmp_path / "art").mkdir()
    write_runtime_config(tmp_path / "rec.yaml", RuntimeConfig(tmp_path / "art", "onnxruntime", "int8", 2))

    def config(*argv):
        return cli._runtime_config(cli.build_parser().parse_args(["run", *argv]))

    plain, notes = config("--smoothing", "ensemble", "--ensemble-m", "0.3", "--cameras", "v4l2:0,2")
    assert (plain.smoothing.policy, plain.smoothing.ensemble_m, plain.cameras.spec(["a", "b"])) == \
        ("ensemble", 0.3, "v4l2:0,2") and notes == []
    got, notes = config("--runtime-config", str(tmp_path / "rec.yaml"), "--backend", "torch", "--smoothing", "none",
                        "--set", "precision=fp32", "--set", "smoothing.margin_steps=6")
    assert (Path(got.artifact), got.backend, got.precision, got.threads) == (tmp_path / "art", "onnxruntime", "fp32", 2)
    assert (got.smoothing.policy, got.smoothing.margin_steps) == ("none", 6)  # the file did not hold smoothing
    assert any("replacing --artifact, --backend and --precision" in n for n in notes)
    with pytest.raises(ConfigError, match="did you mean 'instruction'"):
        config("--set", "instructions=go")


def test_configs_are_frozen():
    config = RuntimeConfig()
    with pytest.raises(AttributeError):
        config.threads = 3  # type: ignore[misc]
    assert np.isfinite(config.duration_s)


def test_deploy_renders_a_checked_runtime_config():
    from vpp_edge.deploy.config import load_config
    from vpp_edge.deploy.units import runtime_command, runtime_config

    cfg = load_config(profile="linux", runtime={"cameras": "v4l2:/dev/video0,/dev/video2", "smoothing": "ensemble",
                                                "instruction": "sort the parts", "threads": 2})
    config = runtime_config(cfg)
    assert (config.instruction, config.smoothing.policy, config.threads) == ("sort the parts", "ensemble", 2)
    assert config.duration_s == float("inf") and config.cameras.spec(()) == "v4l2:/dev/video0,/dev/video2"
    argv = runtime_command(cfg)
    assert argv[argv.index("--instruction") + 1] == "sort the parts" and argv[argv.index("--threads") + 1] == "2"
    with pytest.raises(ConfigError, match="runtime.instruction: the task the robot runs"):
        runtime_config(load_config(profile="linux", runtime={"cameras": "auto:/dev/video0,/dev/video2"}))
    with pytest.raises(ConfigError, match="runtime settings: .*rt_priority"):
        runtime_config(load_config(profile="linux", runtime={"rt_priority": 150}))
    assert "--instruction" not in runtime_command(load_config(profile="linux"))  # replay: the episode's, said at start
