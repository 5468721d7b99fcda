"""Issue 22: the CLI without surprises. Bad input is one line and exit 2 (never a
traceback), a run that did not do its job exits 5 saying why, ports move, the run log
records every tick and plots, wide actions print in full."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from vpp_edge.runtime import protocol as P

from vpp_edge import cli
from vpp_edge.errors import MissingDependencyError


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``vpp ARGV`` in this process: (exit code, stdout, stderr); argparse's exits included."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: usage + one error line, exit 2
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, expected: int = cli.EXIT_ERROR, match: str = "") -> None:
    assert code == expected, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vpp "), err
    assert match in last, last


@pytest.fixture()
def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "broken": "gates: [\n",
        "nested_typo": "gates: {fp32_cosin: 0.5}\n",
        "top_typo": "parity_sample: 3\n",
        "list": "- a\n- b\n",
        "mapping_for_value": "opset: {a: 1}\n",
        "value_for_mapping": "gates: 0.5\n",
        "not_json": "hello\n",
        "no_ticks": json.dumps({"t": 0, "record": "event", "kind": "x"}) + "\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "empty_dir").mkdir()
    return {name: tmp_path / name for name in [*files, "empty_dir"]}


# (argv, text the error line must contain); ${name} is a file of the bad_files fixture.
BAD_INPUTS = [
    (["run", "--smoothing", "foo"], "invalid choice: 'foo'"),
    (["run", "--backend", "nosuch"], "invalid choice: 'nosuch'"),
    (["run", "--precision", "fp8"], "invalid choice: 'fp8'"),
    (["run", "--dali-device", "tpu"], "invalid choice: 'tpu'"),
    (["run", "--duration", "soon"], "invalid float value"),
    (["run", "--base-port", "99999"], "not a port"),
    (["run", "--base-port", "http"], "not a port"),
    (["run", "--log-ticks", "-1"], "not a non-negative integer"),
    (["run", "--artifact", "/nonexistent"], "no such artifact: /nonexistent"),
    (["run", "--artifact", "${empty_dir}"], "manifest.json"),
    (["run", "--episode", "/nonexistent.json"], "--episode /nonexistent.json: no such file"),
    (["run", "--runtime-config", "/nonexistent.yaml"], "--runtime-config /nonexistent.yaml: no such file"),
    (["demo", "--sim", "bullet"], "invalid choice: 'bullet'"),
    (["demo", "--smoothing", "foo"], "invalid choice: 'foo'"),
    (["bridge", "--base-port", "0"], "not a port"),
    (["bridge", "--robot", "nosuch"], "nosuch"),
    (["build-engines", "--artifact", "/nonexistent"], "no such artifact: /nonexistent"),
    (["build-engines", "/nonexistent"], "no such artifact: /nonexistent"),  # the old positional spelling
    (["build-engines", "--artifact", "a", "b"], "two artifacts: --artifact a and b"),
    (["run", "--log-frames"], "--log-frames keeps the camera views beside a run log: it needs --log LOG"),
    (["replay", "${no_ticks}", "--video", "x.mp4"], "fewer than two tick records"),
    (["build-engines", "${empty_dir}"], "manifest.json"),
    (["export", "--config", "${broken}"], "line 2: not valid YAML"),
    (["export", "--config", "${nested_typo}"], "'gates.fp32_cosin' (did you mean 'gates.fp32_graph_cosine'?)"),
    (["export", "--config", "${top_typo}"], "'parity_sample' (did you mean 'parity_samples'?)"),
    (["export", "--config", "${list}"], "expected a mapping"),
    (["export", "--config", "${mapping_for_value}"], "'opset' takes a value"),
    (["export", "--config", "${value_for_mapping}"], "'gates' takes a mapping"),
    (["export", "--config", "/nonexistent.yaml"], "not found"),
    (["export", "--precisions", "fp32,fp8"], "fp8"),
    (["export", "--checkpoint", "/nonexistent"], "--checkpoint /nonexistent: no such file"),
    (["export", "--calibration-data", "/nonexistent"], "--calibration-data /nonexistent: no such file"),
    (["predict", "--episode", "/nonexistent.json"], "--episode /nonexistent.json: no such file"),
    (["predict", "--dataset", "/nonexistent"], "--dataset /nonexistent: no such file"),
    (["plot", "/nonexistent.jsonl"], "no such file"),
    (["plot", "${not_json}"], "line 1: not JSON"),
    (["plot", "${no_ticks}"], "no tick records"),
    (["doctor", "--backend", "nosuch"], "invalid choice: 'nosuch'"),
    (["presets", "nosuch"], "nosuch"),
]


@pytest.mark.parametrize("argv,match", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(argv, match, bad_files, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no artifacts/ here: nothing of the checkout is picked up
    argv = [str(bad_files[a[2:-1]]) if a.startswith("${") else a for a in argv]
    match = match.replace("${empty_dir}", str(bad_files["empty_dir"]))
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, match=match)


def test_bad_base_port_in_the_environment_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("VPP_BASE_PORT", "lots")
    code, _, err = run_cli(["bridge", "--duration", "0.1"], capsys)
    assert_one_line_error(code, err, match="VPP_BASE_PORT='lots'")


def test_demo_metaworld_without_the_trained_policy_says_so_first(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["demo", "--sim", "metaworld"], capsys)
    assert_one_line_error(code, err, match="no trained MetaWorld policy at models/metaworld-tiny or "
                                           "artifacts/metaworld_tiny")
    assert "closed loop" not in out  # nothing announced before the error


def test_demo_respects_an_explicit_artifact_over_the_metaworld_policy(monkeypatch, tmp_path):
    (tmp_path / "mw").mkdir()
    (tmp_path / "mw" / "manifest.json").write_text("{}")
    monkeypatch.setattr(cli, "METAWORLD_ARTIFACT", tmp_path / "mw")
    monkeypatch.setattr(cli, "METAWORLD_CHECKPOINT", tmp_path / "no-checkpoint")
    monkeypatch.setattr("vpp_edge.extras.is_available", lambda name: True)
    args = cli.build_parser().parse_args(["demo"])
    assert cli._use_metaworld(args)  # auto, no --artifact: the trained policy
    args = cli.build_parser().parse_args(["demo", "--artifact", "artifacts/tiny"])
    assert not cli._use_metaworld(args)
    monkeypatch.setattr("vpp_edge.extras.is_available", lambda name: False)
    with pytest.raises(MissingDependencyError, match="MetaWorld is not installed"):
        cli._use_metaworld(cli.build_parser().parse_args(["demo", "--sim", "metaworld"]))


def test_bridge_port_in_use_is_one_line(capsys):
    base = P.free_base_port(start=16101)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base))
        taken.listen()
        code, _, err = run_cli(["bridge", "--base-port", base, "--duration", "0.1"], capsys)
    assert_one_line_error(code, err, match=f"tcp://127.0.0.1:{base} is already in use")
    assert "--base-port" in err


def test_bridge_started_with_sigint_ignored_still_stops_on_it_and_prints_its_counters():
    """A non-interactive shell starts background jobs with SIGINT ignored, and the child
    inherits that; vpp demo stops its bridge with SIGINT, so the bridge sets its own handler."""
    import signal
    import subprocess
    import sys

    base = P.free_base_port(start=16151)
    proc = subprocess.Popen([sys.executable, "-m", "vpp_edge.cli", "bridge", "--robot", "sim", "--base-port",
                             str(base), "--duration", "60"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert "bridge up" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "bridge counters" in out


def test_base_port_moves_every_endpoint_and_free_ports_skip_taken_ones(monkeypatch):
    assert P.endpoint_on("127.0.0.1", P.ACTION_ENDPOINT) == P.ACTION_ENDPOINT  # default unchanged
    assert P.endpoint_on("10.0.0.2", P.EVENT_ENDPOINT, 6001) == "tcp://10.0.0.2:6004"
    from vpp_edge.firmware_bridge.bridge import Endpoints

    ends = Endpoints.on("127.0.0.1", 6001)
    assert [e.rsplit(":", 1)[1] for e in ends.__dict__.values()] == ["6001", "6002", "6004", "6003", "6005"]
    monkeypatch.setenv("VPP_BASE_PORT", "7001")
    assert P.base_port_from_env() == 7001
    base = P.free_base_port(start=16201)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 2))
        assert P.free_base_port(start=base) >= base + P.PORT_SPAN


def test_export_config_refuses_unknown_nested_keys_before_importing_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom vpp_edge import cli\nrc = cli.main(['export', '--config', sys.argv[1]])\n"
            "assert 'torch' not in sys.modules, 'torch imported before the config was checked'\nsys.exit(rc)")
    bad = Path(__file__).with_name("data") / "official_vpp_configs.yaml"  # a YAML file that is no export config
    proc = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == cli.EXIT_ERROR, proc.stderr
    assert "unknown export option" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_prints_every_value_of_a_wide_action(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    actions = np.arange(4 * 19, dtype=np.float32).reshape(4, 19) / 100
    report = {"preset": "x", "weights": "w", "episode": "e", "frame": 0, "views": ["a"], "instruction": "i",
              "seed": 0, "timings_ms": {"text": 1.0, "tvp": 2.0}, "predict_ms": 2.0,
              "action_base": {"rule": "none", "relative_to": "nothing: the predicted actions are the commands"}}
    cli._print_prediction(report, actions)
    out = capsys.readouterr().out
    assert "…" not in out and "..." not in out
    for value in actions.ravel():
        assert f"{value:+.4f}" in out
    assert max(len(line) for line in out.splitlines()) <= 80


# --- runs that end with a verdict -------------------------------------------------------------


def sim_robot(tmp_path: Path, stale_s: float) -> Path:
    """The sim robot config with another stale_observation_s: 0.001 refuses every chunk; a
    generous one keeps a run that must succeed from failing on a loaded CI machine."""
    robot = tmp_path / f"sim_stale_{stale_s}.yaml"
    from vpp_edge.robot_description import ROBOTS_DIR

    text = (ROBOTS_DIR / "sim.yaml").read_text()
    robot.write_text(text.replace("stale_observation_s: 0.5", f"stale_observation_s: {stale_s}"))
    return robot


class _Bridge:
    """The kinematic sim bridge in this process on free ports; ``stop_after_chunks`` closes it mid-run."""

    def __init__(self, stop_after_chunks: int | None = None):
        from vpp_edge.firmware_bridge.bridge import Bridge, Endpoints
        from vpp_edge.firmware_bridge.config import load_bridge_config
        from vpp_edge.firmware_bridge.driver import KinematicSimDriver

        self.base = P.free_base_port(start=16301)
        cfg = load_bridge_config("sim")
        self.bridge = Bridge(KinematicSimDriver(cfg.dim), cfg, Endpoints.on("127.0.0.1", self.base))
        self.stop_after = stop_after_chunks
        self._done = threading.Event()

    def __enter__(self) -> "_Bridge":
        self.bridge.start()
        if self.stop_after is not None:
            threading.Thread(target=self._kill_when_tracking, daemon=True).start()
        return self

    def _kill_when_tracking(self) -> None:
        while not self._done.is_set() and self.bridge.counts["accepted"] < self.stop_after:
            self._done.wait(0.02)
        self.bridge.close()  # the bridge vanishes: no state, no replies

    def __exit__(self, *exc) -> None:
        self._done.set()
        self.bridge.close()


def run_on_sim_bridge(exported, episode, tmp_path: Path, capsys, duration: float, *extra) -> tuple[int, str, str]:
    """``vpp run`` of ``episode`` against an in-process sim bridge on free ports, with a stale
    limit a loaded CI machine meets (a run that must succeed); ``extra``: more flags."""
    with _Bridge() as bridge:
        return run_cli(["run", "--artifact", exported[0], "--episode", episode, "--base-port", bridge.base,
                        "--duration", duration, "--quiet", "--robot", sim_robot(tmp_path, 5.0), *extra], capsys)


def test_run_with_a_bridge_that_dies_mid_run_fails_and_its_log_plots(exported, demo_episode, capsys, tmp_path):
    log = tmp_path / "run.jsonl"
    with _Bridge(stop_after_chunks=3) as bridge:
        code, out, err = run_cli(["run", "--artifact", exported[0], "--episode", demo_episode, "--base-port",
                                  bridge.base, "--duration", 3, "--quiet", "--log", log], capsys)
    assert_one_line_error(code, err, cli.EXIT_RUN_FAILED, match="the bridge went silent mid-run")
    assert "artifact" in out and "engine  onnxruntime" in out and "{'" not in out  # tables, not dicts
    records = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = {r["record"] for r in records}
    assert {"run", "handshake", "tick", "chunk"} <= kinds
    ticks = [r for r in records if r["record"] == "tick"]
    sent = [r for r in ticks if r["target"] is not None]
    assert sent and all(len(r["target"]) == 7 for r in sent)
    assert any(r["state"] and len(r["state"]["target"]) == 7 for r in ticks)
    assert ticks[-1]["state"] is None  # the bridge was gone at the end
    assert all(len(r["actions"][0]) == 7 for r in records if r["record"] == "chunk")

    code, out, _ = run_cli(["plot", log, "--out", tmp_path / "run.png"], capsys)
    assert code == 0 and (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_whose_chunks_are_all_stale_fails_and_resizing_is_said_once(exported, capsys, tmp_path):
    from vpp_edge.demo_data import write_demo_dataset

    robot = sim_robot(tmp_path, 0.001)
    small = write_demo_dataset(tmp_path / "small", steps=6, size=96)  # its annotation
    with _Bridge() as bridge:
        code, out, err = run_cli(["run", "--artifact", exported[0], "--episode", small, "--robot", robot,
                                  "--base-port", bridge.base, "--duration", 1.5, "--quiet"], capsys)
    assert_one_line_error(code, err, cli.EXIT_RUN_FAILED, match="stale_observation")
    assert out.count("camera frames of 96x96 were centre-cropped to squares and resized to") == 1


def test_run_with_cameras_that_do_not_exist_fails(exported, capsys):
    live = ["run", "--artifact", exported[0], "--cameras", "v4l2:/dev/vpp-none-8,/dev/vpp-none-9", "--duration", 5,
            "--quiet"]
    # Live cameras: the task comes from --instruction or the runtime config, never from demo data (issue 21).
    code, _, err = run_cli(live, capsys)
    assert_one_line_error(code, err, cli.EXIT_ERROR, match="no instruction: give the task with --instruction")
    with _Bridge() as bridge:
        code, _, err = run_cli([*live, "--instruction", "open the drawer", "--base-port", bridge.base], capsys)
    assert code == cli.EXIT_RUN_FAILED and "Traceback" not in err
    assert "/dev/vpp-none-" in err.strip().splitlines()[-1]


def test_verdicts_name_the_failure():
    from vpp_edge.runtime.verdict import run_verdict

    class Cam:
        def __init__(self, name, delivered, error=None):
            self.name, self.delivered, self.error = name, delivered, error

    ok = {"counts": {"chunks": 10, "chunk_rejected": 2, "targets_sent": 40}, "safety": {"chunk_stale_observation": 2}}
    assert run_verdict(ok, [Cam("replay", True)], 0.1) is None
    assert "camera 'v4l2:/dev/video8' (cannot open) never delivered" in run_verdict(
        ok, [Cam("v4l2:/dev/video8", False, "cannot open")], 0.1)
    assert "no robot state for 1.5 s" in run_verdict({"counts": {"chunks": 9, "bridge_silent": 15}}, [], 0.1)
    refused = {"counts": {"chunks": 2, "chunk_rejected": 8}, "safety": {"chunk_stale_observation": 7, "chunk_nan": 1}}
    assert "8 of 10 action chunks refused, most as chunk_stale_observation" in run_verdict(refused, [], 0.1)
    assert "the robot never moved" in run_verdict({"counts": {}}, [], 0.1)
    assert "no target reached the bridge (mostly 'estop')" in run_verdict(
        {"counts": {"chunks": 4, "estop": 30, "hold": 2}}, [], 0.1)


def test_demo_runs_beside_another_bridge_and_keeps_its_log_apart(exported, demo_episode, capsys, monkeypatch,
                                                                  tmp_path):
    base = P.free_base_port(start=16401)
    monkeypatch.setenv("VPP_BASE_PORT", str(base))
    with socket.socket() as taken:  # "another bridge" holds the configured ports
        taken.bind(("127.0.0.1", base))
        taken.listen()
        code, out, err = run_cli(["demo", "--artifact", exported[0], "--episode", demo_episode, "--duration", 2,
                                  "--quiet", "--sim", "kinematic", "--robot", sim_robot(tmp_path, 5.0)], capsys)
    assert code == 0, err
    assert "sim bridge up" in out and f":{base} " not in out.split("sim bridge up")[1].splitlines()[0]
    assert "bridge event" not in out + err  # the bridge's log lines went to its log file
    assert "bridge counters" in out.split("runtime summary")[1]  # after the runtime's summary, as a table
    assert (out + err).count("truncated") <= 1  # said once (as a note), not per inference


def test_a_runtime_config_and_views_left_out_are_said(exported, demo_episode, tmp_path):
    from vpp_edge.calibrate.runtime_config import RuntimeConfig, write_runtime_config

    config = write_runtime_config(tmp_path / "recommended.yaml", RuntimeConfig(exported[0], "onnxruntime", "fp32"))
    import shutil

    dataset = shutil.copytree(Path(demo_episode).parents[2], tmp_path / "dataset")  # the shared one stays as is
    annotation = json.loads(Path(demo_episode).read_text())
    annotation["videos"].append(dict(annotation["videos"][0]))  # a third camera the model does not take
    three = dataset / Path(demo_episode).relative_to(Path(demo_episode).parents[2]).with_name("three_views.json")
    three.write_text(json.dumps(annotation))
    args = cli.build_parser().parse_args(["run", "--runtime-config", str(config), "--episode", str(three),
                                          "--backend", "torch"])
    artifact, _, episode, notes = cli._run_inputs(args)
    assert args.backend == "onnxruntime" and artifact.root == exported[0]
    assert any("runtime config" in n and "replacing --artifact, --backend and --precision" in n for n in notes)
    assert any("the model takes 2 camera view(s): 1 of the episode's 3 left out" in n for n in notes)


def test_tick_records_default_to_none_for_an_endless_run():
    parse = cli.build_parser().parse_args
    run: dict = {"notes": []}
    assert cli._tick_record_every(parse(["run", "--log", "x.jsonl"]), run) == 1
    assert cli._tick_record_every(parse(["run", "--log", "x.jsonl", "--duration", "inf"]), run) == 0
    assert "per-tick" in run["notes"][-1]
    assert cli._tick_record_every(parse(["run", "--log", "x", "--duration", "inf", "--log-ticks", "5"]), run) == 5
    assert cli._tick_record_every(parse(["run", "--duration", "inf", "--log-ticks", "0", "--record", "d"]), run) == 1
