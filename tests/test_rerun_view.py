"""vpp run --rerun FILE.rrd: a rerun recording of a run, written headless from the metrics
thread (issue 22). Skipped where the optional rerun-sdk is not installed."""

from __future__ import annotations

import pytest

from vpp_edge import cli
from vpp_edge.extras import is_available

from .test_cli_usability import assert_one_line_error, run_cli, run_on_sim_bridge

needs_rerun = pytest.mark.skipif(not is_available("rerun"), reason="rerun-sdk is not installed (optional extra: "
                                                                   "pip install rerun-sdk==0.41.0)")


@needs_rerun
def test_a_run_writes_a_rerun_recording(exported, demo_episode, capsys, tmp_path):
    from vpp_edge.rerun_view import read_entities

    rrd, log = tmp_path / "run.rrd", tmp_path / "run.jsonl"
    code, out, err = run_on_sim_bridge(exported, demo_episode, tmp_path, capsys, 2, "--rerun", rrd, "--log", log)
    assert code == 0, err
    assert f"rerun recording {rrd}: open it with 'rerun {rrd}'" in out
    assert rrd.stat().st_size > 10_000  # camera frames, not just a header

    rows = read_entities(rrd)  # the file reads back with rerun's own reader
    assert rows["/run"] == 1
    for view in (0, 1):  # both cameras of the tiny model
        assert rows[f"/cameras/view{view}"] >= 2
    for series in ("predicted", "executed", "setpoint"):  # chunk vs targets sent vs the robot's setpoint
        assert rows[f"/actions/a0/{series}"] >= 3, series
    assert rows["/robot/joints/j0"] >= 3
    assert any(e.startswith("/latency/") and e != "/latency/end_to_end_ms" for e in rows)  # per stage
    assert rows["/latency/end_to_end_ms"] >= 2

    # vpp replay: the run log as a recording, the same series less the camera frames
    code, out, err = run_cli(["replay", log, "--out", tmp_path / "replay.rrd"], capsys)
    assert code == 0, err
    assert f"wrote {tmp_path / 'replay.rrd'}" in out
    replayed = read_entities(tmp_path / "replay.rrd")
    assert not any(e.startswith("/cameras/") for e in replayed)
    for entity in ("/run", "/actions/a0/predicted", "/actions/a0/executed", "/actions/a0/setpoint",
                   "/robot/joints/j0", "/latency/end_to_end_ms"):
        assert replayed[entity] == rows[entity], entity  # every record the live writer got is in the log


@needs_rerun
def test_replay_refuses_a_log_without_ticks(capsys, tmp_path):
    log = tmp_path / "run.jsonl"
    log.write_text('{"t": 1.0, "record": "run"}\n')
    code, _, err = run_cli(["replay", log], capsys)
    assert_one_line_error(code, err, cli.EXIT_ERROR, match="fewer than two tick records")
    code, _, err = run_cli(["replay", tmp_path / "nope.jsonl"], capsys)
    assert_one_line_error(code, err, cli.EXIT_ERROR, match="no such file")


def test_rerun_without_rerun_sdk_is_one_line_and_exit_3(capsys, tmp_path, monkeypatch):
    from vpp_edge import extras

    real = extras.is_available
    monkeypatch.setattr(extras, "is_available", lambda module: module != "rerun" and real(module))
    code, _, err = run_cli(["run", "--artifact", tmp_path / "none", "--duration", 1, "--rerun", tmp_path / "x.rrd"],
                           capsys)  # said before the artifact is even looked at
    assert_one_line_error(code, err, cli.EXIT_MISSING_DEPENDENCY, match="pip install rerun-sdk==0.41.0")
    assert not (tmp_path / "x.rrd").exists()
