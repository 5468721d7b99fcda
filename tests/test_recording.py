"""vpp run --record: the run as a LeRobot v3.0 dataset that vpp train reads back (issue 22)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vpp_edge import cli

from .test_cli_usability import _Bridge, assert_one_line_error, run_cli, run_on_sim_bridge


def test_a_recorded_run_round_trips_into_training(exported, demo_episode, capsys, tmp_path):
    from vpp_edge.training.data.sources import episode_refs, source_from_dict

    record, log = tmp_path / "rollout", tmp_path / "run.jsonl"
    code, out, err = run_on_sim_bridge(exported, demo_episode, tmp_path, capsys, 3, "--record", record, "--log", log)
    assert code == 0, err
    assert f"to {record} (LeRobot v3.0)" in out

    sent = [r["target"] for r in map(json.loads, log.read_text().splitlines())
            if r["record"] == "tick" and r["target"] is not None and r["state"]]
    episode = episode_refs(source_from_dict({"format": "lerobot", "path": str(record)}))[0].load()
    assert episode.instruction and episode.frames.num_views == 2
    np.testing.assert_allclose(episode.actions, np.asarray(sent, np.float32)[: len(episode.actions)])
    assert len(episode.actions) >= 3 and episode.states.shape == (len(episode.actions), 7)
    assert episode.frames.read(0).shape[0] == len(episode.actions)

    code, out, err = run_cli(["train", "policy", "--config", "policy_tiny", "--out", tmp_path / "train", "--quiet",
                              "--steps", 1, "--set", f"data.sources=[{{format: lerobot, path: '{record}'}}]",
                              "--set", "preset_overrides={name: tiny, action_dim: 7}",
                              "--set", "data.val_fraction=0"], capsys)
    assert code == 0, err
    assert "trained 1 steps" in out


def test_record_refuses_a_folder_in_use(exported, capsys, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("")
    with _Bridge() as bridge:
        code, _, err = run_cli(["run", "--artifact", exported[0], "--base-port", bridge.base, "--duration", 1,
                                "--record", tmp_path / "old"], capsys)
    assert_one_line_error(code, err, cli.EXIT_ERROR, match="exists and is not empty")


@pytest.mark.parametrize("broken", [ValueError("boom")])
def test_a_failing_record_sink_never_ends_the_log(broken, tmp_path):
    from vpp_edge.runtime.metrics import Metrics

    def sink(record):
        raise broken

    metrics = Metrics(tmp_path / "log.jsonl", sinks=[sink])
    metrics.record("tick", target=[1.0])
    metrics.record("tick", target=[2.0])
    metrics.close()
    assert metrics.counts["record_sink_failed"] == 1
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2
