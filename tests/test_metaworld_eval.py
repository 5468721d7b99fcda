"""MetaWorld through the stack: oracle demonstrations in the sample format, and the
closed-loop evaluation (simulator bridge + streamed cameras + ONNX Runtime runtime)."""

import ctypes.util
import json

import numpy as np
import pytest

from vpp_edge.errors import ConfigError
from vpp_edge.extras import is_available

from .conftest import export_fp32

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not is_available("metaworld"), reason="metaworld is not installed (make install)"),
              pytest.mark.skipif(ctypes.util.find_library("EGL") is None,
                                 reason="no libEGL for off-screen rendering (make system-deps)")]


def test_oracle_demos_are_recorded_in_the_sample_format(tmp_path):
    from vpp_edge.episodes import list_episodes, load_episode
    from vpp_edge.evaluation.metaworld import record_demos

    summary = record_demos(["reach-v3"], 2, tmp_path, image_size=64, progress=False)
    assert summary["episodes"] == 2 and summary["steps_per_action"] == 4
    files = list_episodes(tmp_path, "train")
    assert len(files) == 2
    episode = load_episode(files[0])
    assert episode.instruction == "reach" and episode.num_views == 2
    frames = episode.frames(0)
    assert frames.shape[1:] == (64, 64, 3) and len(frames) == len(episode.actions) == len(episode.states)
    # One action = the hand target's change over 4 MetaWorld steps (at most 1 cm each).
    assert np.abs(episode.actions[:, :3]).max() <= 0.04 + 1e-6
    assert np.abs(episode.actions[:, :3]).sum() > 0.05, "the oracle moved the hand"
    meta = json.loads(files[0].read_text())
    assert meta["metaworld_task"] == "reach-v3"
    with pytest.raises(ConfigError, match="unknown MetaWorld task"):
        record_demos(["reach-v9"], 1, tmp_path, progress=False)


def test_closed_loop_evaluation_runs_the_runtime_against_the_simulator(tmp_path, exported):
    from vpp_edge.evaluation.commands import AnnotatedVideo
    from vpp_edge.evaluation.metaworld import EvalOptions, evaluate, write_report
    from vpp_edge.presets import get_preset
    from vpp_edge.training.models import build_policy

    with pytest.raises(ConfigError, match="acts in 7 dims, MetaWorld takes 4"):
        evaluate(exported[0], EvalOptions(tasks=("reach-v3",), episodes=1), progress=False)

    out = export_fp32(build_policy(get_preset("metaworld_tiny"), seed=0), tmp_path / "mw")
    videos = tmp_path / "videos"
    results = evaluate(out, EvalOptions(tasks=("reach-v3",), episodes=2, max_steps=40, video_dir=str(videos),
                                        video=AnnotatedVideo()), progress=False)
    task = results["tasks"]["reach-v3"]
    assert task["episodes"] == 2 and 0.0 <= task["success_rate"] <= 1.0
    for episode in task["episodes_detail"]:
        assert episode["chunks"] >= 1, "the runtime produced chunks from the streamed cameras"
        assert episode["steps"] > 0, "the simulator advanced"
    from vpp_edge.episodes import decode_video

    clip = decode_video(videos / "reach-v3_1000.mp4")  # annotated: views, instruction, chunk vs targets
    assert clip.shape[0] >= 5 and clip.shape[2] == 960, "vpp replay's annotated video of the episode"
    assert (videos / "reach-v3_1000.jsonl").is_file() and not (videos / "reach-v3_1000.jsonl.frames").exists()
    for key in ("boundary_jump", "action_jerk", "starved_ticks"):
        assert np.isfinite(task[key]) and np.isfinite(results[key])
    from vpp_edge.runlog import read_records

    header = next(r for r in read_records(videos / "reach-v3_1000.jsonl") if r["record"] == "run")
    assert header["instruction"] == "reach", "the video's caption"
    report = write_report(results, tmp_path / "report")
    assert "| reach-v3 |" in report.read_text() and (tmp_path / "report" / "results.json").is_file()


def test_vpp_demo_runs_the_metaworld_policy_and_says_each_episode(tmp_path, monkeypatch, capsys):
    from vpp_edge import cli
    from vpp_edge.presets import get_preset
    from vpp_edge.training.models import build_policy

    out = export_fp32(build_policy(get_preset("metaworld_tiny"), seed=0), tmp_path / "mw")
    monkeypatch.setattr(cli, "METAWORLD_ARTIFACT", out)
    monkeypatch.chdir(tmp_path)
    code = cli.main(["demo", "--sim", "metaworld", "--task", "reach-v3", "--episodes", "1"])
    printed = capsys.readouterr().out
    outcome = "success at step" if "Average success: **1.000**" in printed else "failed after 200 steps"
    assert code == (0 if outcome.startswith("success") else 5), "exit 5 when no episode succeeds"
    assert f"reach-v3 seed 1000: {outcome}" in printed, "one line per episode, MetaWorld's verdict"
    assert (tmp_path / "results" / "demo" / "reach-v3_1000.mp4").is_file()
