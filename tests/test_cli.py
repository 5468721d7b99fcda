"""The user's entry point: `vpp predict`, `vpp presets`, `vpp convert`."""

import json
import shutil
import subprocess
import sys

import pytest

from vpp_edge.cli import main
from vpp_edge.tokenizer import InstructionTruncatedWarning

from .test_checkpoints import write_official


def vpp(*args, check=True):
    exe = shutil.which("vpp") or f"{sys.executable} -m vpp_edge.cli"
    proc = subprocess.run([*exe.split(), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"vpp {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_predict_on_a_real_sample_episode_is_reproducible_across_processes(samples_dir, tmp_path):
    outs = []
    for i in range(2):
        vpp("predict", "--dataset", samples_dir / "xhand", "--index", 1, "--frame", 5, "--repeat", 1,
            "--json", tmp_path / f"{i}.json")
        outs.append(json.loads((tmp_path / f"{i}.json").read_text()))
    a, b = outs
    assert a["actions"] == b["actions"], "same inputs + same noise -> identical actions"
    assert len(a["actions"]) == 10 and len(a["actions"][0]) == 7
    assert a["instruction"] and a["episode"].endswith("50.json") and len(a["views"]) == 2
    assert set(a["timings_ms"]) == {"text", "tvp", "former", "action_head"}


def test_predict_prints_actions_and_timings(demo_episode):
    proc = vpp("predict", "--episode", demo_episode, "--repeat", 2, "--seed", 3)
    assert "action chunk [10 x 7]" in proc.stdout and "per-stage time (ms)" in proc.stdout
    assert "push the red block" in proc.stdout


def test_predict_errors_are_one_clear_line(demo_episode, capsys):
    assert main(["predict", "--preset", "calvn", "--episode", str(demo_episode)]) == 2
    assert "unknown preset 'calvn'; did you mean 'calvin'?" in capsys.readouterr().err
    assert main(["predict", "--preset", "xhand", "--video-model", "x"]) == 2
    assert "need both --video-model" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(demo_episode.parent)]) == 2
    assert "vpp_config.json: not found" in capsys.readouterr().err


def test_presets_lists_and_shows(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("calvin", "metaworld", "panda", "xhand", "tiny"))
    assert main(["presets", "calvin"]) == 0
    assert "queries_per_frame: 14" in capsys.readouterr().out


def test_convert_then_predict_matches_the_official_files(tiny_policy, tmp_path, demo_episode, capsys):
    policy, tok = tiny_policy
    video, clip, action = write_official(policy, tok, tmp_path)
    official = ["--preset", "tiny", "--video-model", video, "--clip", clip, "--action-model", action]
    assert main(["convert", *map(str, official), "--out", str(tmp_path / "ck")]) == 0
    results = []
    # Without --preset the action model's shapes pick it (not a silent 'tiny' default).
    for weights in (official, official[2:], ["--checkpoint", tmp_path / "ck"]):
        out = tmp_path / "r.json"
        # The demo instruction has 40 tokens: truncated for the video condition, visibly.
        with pytest.warns(InstructionTruncatedWarning, match="instruction of 40 tokens .* truncated to 20"):
            assert main(["predict", *map(str, weights), "--episode", str(demo_episode), "--repeat", "1",
                         "--json", str(out)]) == 0
        results.append(json.loads(out.read_text())["actions"])
    assert results[0] == results[1] == results[2]
    assert "converted_from" in (tmp_path / "ck" / "vpp_config.json").read_text()


@pytest.mark.parametrize("args", [["--help"], ["predict", "--help"]])
def test_help(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0 and "usage: vpp" in capsys.readouterr().out


def test_doctor_reports_optional_components(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "tensorrt" in out and "xhand_controller" in out and "torch" in out


def test_missing_optional_component_is_one_clear_error():
    from vpp_edge.errors import MissingDependencyError
    from vpp_edge.extras import is_available, require

    assert is_available("numpy") and not is_available("xhand_controller")
    assert require("numpy").__name__ == "numpy"
    with pytest.raises(MissingDependencyError, match="XHand driver.*'xhand_controller'.*not installed.*RobotEra"):
        require("xhand_controller")
