"""vpp demo --log LOG --log-frames --rerun FILE.rrd, then vpp replay LOG --video OUT.mp4
(issue 22): one real closed-loop demo run (sim bridge in its own process) gives a rerun
recording of the demo and a run record whose annotated video is decoded back here."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from vpp_edge import cli
from vpp_edge.extras import is_available

from .test_cli_usability import assert_one_line_error, run_cli, sim_robot

av = pytest.importorskip("av")
cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def demo_run(exported, demo_episode, tmp_path_factory):
    """One 3 s ``vpp demo`` with --log, --log-frames and (with rerun-sdk) --rerun."""
    tmp = tmp_path_factory.mktemp("demo_run")
    log, rrd = tmp / "run.jsonl", tmp / "demo.rrd"
    argv = ["demo", "--artifact", exported[0], "--episode", demo_episode, "--duration", 3, "--quiet", "--sim",
            "kinematic", "--robot", sim_robot(tmp, 5.0), "--log", log, "--log-frames"]
    if is_available("rerun"):
        argv += ["--rerun", rrd]
    out, err = io.StringIO(), io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"  # rich sizes its tables from it off a terminal
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in argv])
    finally:
        if columns is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = columns
    assert code == 0, err.getvalue()
    return {"log": log, "rrd": rrd, "out": out.getvalue(), "tmp": tmp}


@pytest.mark.skipif(not is_available("rerun"), reason="rerun-sdk is not installed (optional extra)")
def test_the_demo_writes_a_rerun_recording(demo_run):
    from vpp_edge.rerun_view import read_entities

    rrd = demo_run["rrd"]
    assert f"rerun recording {rrd}: open it with 'rerun {rrd}'" in demo_run["out"]
    rows = read_entities(rrd)  # read back with rerun's own reader
    assert rows["/run"] == 1
    for view in (0, 1):  # the tiny model's two cameras, as the runtime fed them
        assert rows[f"/cameras/view{view}"] >= 5
    for series in ("predicted", "executed", "setpoint"):  # the demo's bridge answered: a closed loop
        assert rows[f"/actions/a0/{series}"] >= 5, series
    assert rows["/robot/joints/j0"] >= 5
    assert rows["/latency/end_to_end_ms"] >= 2


def test_the_demo_summary_tables_fit_80_columns(demo_run):
    tables = [line for line in demo_run["out"].splitlines() if line[:1] in "┏┃┡│└"]
    assert len(tables) >= 20  # latencies, counters, the bridge's counters
    assert max(map(len, tables)) <= 80, max(tables, key=len)


def test_log_frames_keeps_the_camera_views_beside_the_log(demo_run):
    from vpp_edge.run_video import SavedFrames, frames_dir

    folder = frames_dir(demo_run["log"])
    assert folder == demo_run["log"].with_name("run.jsonl.frames")
    saved = SavedFrames.read(folder)
    assert sorted(saved.stamps) == [0, 1]
    ticks = [r["t"] for r in map(json.loads, demo_run["log"].read_text().splitlines()) if r["record"] == "tick"]
    for view, stamps in saved.stamps.items():
        assert len(stamps) >= 10  # ~10 a second over a 3 s run
        assert np.all(np.diff(stamps) >= 0.1 - 1e-9)  # downsampled in time ...
        assert stamps[0] <= ticks[-1] and stamps[-1] >= ticks[0]  # ... on the log's clock
        image = cv2.imread(str(folder / saved.files[view][-1]))
        assert image.shape == (160, 160, 3)  # ... and in size (the tiny model sees 256 x 256)


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_replay_video_draws_the_run(demo_run, capsys):
    from vpp_edge.run_video import SavedFrames, frames_dir, layout

    log, video = demo_run["log"], demo_run["tmp"] / "run.mp4"
    code, out, err = run_cli(["replay", log, "--video", video, "--fps", 8], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in log.read_text().splitlines()]
    ticks = [r["t"] for r in records if r["record"] == "tick"]
    expected = int(np.floor((ticks[-1] - ticks[0]) * 8 + 1e-9)) + 1  # one frame per 1/8 s of the run
    assert f"wrote {video}: {expected} frames at 8 fps, camera views from {frames_dir(log)}" in out
    assert not log.with_suffix(".rrd").exists()  # --video alone: no recording
    frames = _decode(video)
    lay = layout(views=2, dims=7)  # the tiny model's two views, the sim robot's 7 actions
    assert len(frames) == expected
    assert frames[0].shape == (lay.height, lay.width, 3) == (480, 960, 3)

    def region(frame: np.ndarray, box, inset: int = 0) -> np.ndarray:
        x0, y0, x1, y1 = box
        return frame[y0 + inset:y1 - inset, x0 + inset:x1 - inset].astype(np.int16)

    # each camera panel shows its view as saved at that time (label corner left out)
    saved, last = SavedFrames.read(frames_dir(log)), len(frames) - 1
    t = ticks[0] + last / 8
    for view, box in enumerate(lay.cameras):
        side = box[2] - box[0] - 4
        own = [cv2.cvtColor(cv2.resize(cv2.imread(str(saved.folder / saved.at(v, t))), (side, side)),
                            cv2.COLOR_BGR2RGB)[40:, 40:].astype(np.int16) for v in (0, 1)]
        panel = region(frames[last], box, inset=2)[40:, 40:]
        assert np.abs(panel - own[view]).mean() < 12 < np.abs(panel - own[1 - view]).mean(), view

    # the text (time, tick, state) and every action plot change as the run goes on
    assert np.abs(region(frames[0], lay.text) - region(frames[last], lay.text)).max() > 100
    for d, box in enumerate(lay.plots):  # empty at first; the chunk's points and the targets' line later
        changed = np.abs(region(frames[0], box) - region(frames[last], box)).max(axis=2) > 60
        assert changed.sum() > 100, d
    # the robot holds before the first chunk: the status says so in red, later in black
    red = [np.sum((region(f, lay.text)[..., 0] > 150) & (region(f, lay.text)[..., 1] < 80)) for f in (frames[0],
                                                                                                   frames[last])]
    assert red[0] > 50 + red[1]

    # the same log without its frames: grey camera panels that say how to get them, same plots
    bare = demo_run["tmp"] / "bare" / "run.jsonl"
    bare.parent.mkdir()
    shutil.copy(log, bare)
    code, out, err = run_cli(["replay", bare, "--video", bare.with_suffix(".mp4"), "--fps", 8], capsys)
    assert code == 0, err
    assert "no camera views (record them with 'vpp run --log LOG --log-frames')" in out
    without = _decode(bare.with_suffix(".mp4"))
    assert len(without) == expected
    for box in lay.cameras:
        assert np.abs(region(frames[last], box, 2) - region(without[last], box, 2)).mean() > 30
    for box in lay.plots:
        assert np.abs(region(frames[last], box) - region(without[last], box)).mean() < 2


def test_video_inputs_fail_in_one_line(capsys, tmp_path):
    code, _, err = run_cli(["run", "--log-frames", "--duration", 1], capsys)
    assert_one_line_error(code, err, cli.EXIT_ERROR, match="--log-frames")
    log = tmp_path / "run.jsonl"
    log.write_text('{"t": 1.0, "record": "run"}\n')
    code, _, err = run_cli(["replay", log, "--video", tmp_path / "x.mp4"], capsys)
    assert_one_line_error(code, err, cli.EXIT_ERROR, match="fewer than two tick records")
    code, _, err = run_cli(["replay", log, "--video", tmp_path / "x.mp4", "--frames", tmp_path / "none"], capsys)
    assert_one_line_error(code, err, cli.EXIT_ERROR, match="--frames")
    code, _, err = run_cli(["replay", log, "--video", tmp_path / "x.mp4", "--fps", 0], capsys)
    assert code == 2 and "not a positive number" in err
