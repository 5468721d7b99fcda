"""The chunk-smoothing parameters reach the control loop from the command line (issue 21)."""

from types import SimpleNamespace

import pytest

from vpp_edge import cli
from vpp_edge.runtime.loop import RunOptions, Runtime
from vpp_edge.runtime.robot_config import load_robot_config


def _options(*flags: str) -> RunOptions:
    args = cli.build_parser().parse_args(["run", "--duration", "3", *flags])
    return cli._run_options(args, {"notes": []})


def test_smoothing_parameters_are_configurable_and_reach_the_plan():
    default = _options()
    assert (default.crossfade_steps, default.margin_steps, default.ensemble_m) == (3, 2, 0.1)
    options = _options("--smoothing", "ensemble", "--crossfade-steps", "5", "--margin-steps", "4",
                       "--ensemble-m", "0.25")
    assert (options.smoothing, options.crossfade_steps, options.margin_steps, options.ensemble_m) == \
        ("ensemble", 5, 4, 0.25)
    robot = load_robot_config("sim")
    policy = SimpleNamespace(preset=SimpleNamespace(action_dim=robot.action_dim))
    runtime = Runtime(policy, [], robot, link=None, options=options, metrics=None)
    assert (runtime.plan.smoothing, runtime.plan.crossfade_steps, runtime.plan.ensemble_m) == ("ensemble", 5, 0.25)


@pytest.mark.parametrize("flags", [("--ensemble-m", "-1"), ("--ensemble-m", "inf"), ("--margin-steps", "-2"),
                                   ("--crossfade-steps", "x")])
def test_bad_smoothing_parameters_are_usage_errors(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["run", *flags])
    assert exc.value.code == 2 and flags[0] in capsys.readouterr().err


def test_threads_reach_the_cpu_engines_and_not_tensorrt(monkeypatch):
    """``threads`` is an engine option of ONNX Runtime and OpenVINO, set globally for torch,
    and dropped for TensorRT (GPU), so a recommendation's thread count can be applied to any backend."""
    from vpp_edge.runtime import engines
    from vpp_edge.runtime.engines import onnxruntime, tensorrt

    made = []

    class Recorder:
        def __init__(self, artifact, precision, **options):
            made.append(options)

    monkeypatch.setattr(onnxruntime, "OrtEngine", Recorder)
    monkeypatch.setattr(tensorrt, "TrtEngine", Recorder)
    monkeypatch.setattr(engines, "available_backends", lambda: ["onnxruntime", "tensorrt"])
    artifact = SimpleNamespace(manifest={"engines": {}})
    engines.create_engine(artifact, "onnxruntime", "fp32", threads=3)
    engines.create_engine(artifact, "onnxruntime", "fp32")
    engines.create_engine(artifact, "tensorrt", "fp16", threads=3)
    assert made == [{"threads": 3}, {"threads": 0}, {}]


def test_a_runtime_configs_threads_are_applied(exported, tmp_path):
    from vpp_edge.calibrate.runtime_config import RuntimeConfig, write_runtime_config
    from vpp_edge.deploy.config import load_config
    from vpp_edge.deploy.units import runtime_command

    config = write_runtime_config(tmp_path / "recommended.yaml", RuntimeConfig(exported[0], "onnxruntime", "fp32", 2))
    args = cli.build_parser().parse_args(["run", "--runtime-config", str(config), "--threads", "7"])
    notes = cli._run_inputs(args)[3]
    assert args.threads == 2 and any("2 inference thread(s) (replacing --threads)" in n for n in notes)
    assert cli.build_parser().parse_args(["run"]).threads == 0

    argv = runtime_command(load_config(profile="linux", runtime={"backend": "onnxruntime", "threads": 2}))
    assert argv[argv.index("--threads") + 1] == "2"
    assert "--threads" not in runtime_command(load_config(profile="linux"))


def test_a_policy_sending_commands_relative_to_the_state_refuses_a_robot_with_delta_dimensions():
    """action_base 'state' (official XBot) makes the chunk absolute commands: a bridge that would
    add them up again as deltas is refused at the handshake, before anything moves."""
    robot = load_robot_config("sim")
    options = _options()

    class Link:
        def __init__(self, delta):
            self.delta = delta

        def handshake(self, name, action_dim):
            return {"robot": name, "delta_dims": self.delta}

    policy = SimpleNamespace(preset=SimpleNamespace(action_dim=robot.action_dim, action_base="state"))
    runtime = Runtime(policy, [], robot, link=Link([True] * robot.action_dim), options=options, metrics=None)
    with pytest.raises(ValueError, match=r"action_base 'state'.*delta dimensions \[0, 1, 2, 3, 4, 5, 6\]"):
        runtime.run()
