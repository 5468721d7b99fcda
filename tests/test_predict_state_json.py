"""vpp predict's JSON says what the actions are relative to (the preset's action_base) and,
for actions relative to the robot state (official XBot), gives the commands (absolute), the
model's prediction and the base, consistent with the printed table."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from vpp_edge.normalization import ACTION_BASE_MEANINGS, ACTION_BASES, describe_action_base

pytestmark = pytest.mark.slow

DIM = 7
LOW, HIGH = [0.0] * DIM, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0]


def test_every_action_base_has_its_meaning():
    assert set(ACTION_BASE_MEANINGS) == set(ACTION_BASES)
    assert describe_action_base("state", 38) == "the raw robot state: commands = predicted actions + state[0:38]"


def printed_table(text: str, rows: int, cols: int) -> np.ndarray:
    """The action values of vpp predict's table(s), in order: row t, dims left to right."""
    values = [[] for _ in range(rows)]
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) > 1 and cells[0].isdigit() and all(re.fullmatch(r"[+-]\d+\.\d{4}", c) for c in cells[1:]):
            values[int(cells[0])].extend(float(c) for c in cells[1:])
    assert all(len(v) == cols for v in values), [len(v) for v in values]
    return np.array(values)


def run_predict(tmp_path, capsys, episode, preset_dict, state, tag):
    from vpp_edge.cli import main

    preset = tmp_path / f"{tag}.yaml"
    preset.write_text(yaml.safe_dump(preset_dict))
    norm = tmp_path / f"{tag}_norm.json"
    norm.write_text(json.dumps({"mode": "bounds", "low": [-0.1] * DIM, "high": [0.2] * DIM,
                                "state": {"low": LOW, "high": HIGH}}))
    out = tmp_path / f"{tag}.json"
    capsys.readouterr()
    assert main(["predict", "--preset", str(preset), "--normalization", str(norm), "--episode",
                 str(episode), "--repeat", "1", "--state", *map(str, state), "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_predict_json_reports_the_action_base_and_the_absolute_commands(tiny_preset, demo_episode, tmp_path,
                                                                       capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one table: every dimension on one line
    state = [0.5, 1.5, 2.5, 0.25, 1.0, 2.0, 0.75]
    base = tiny_preset.replace(name="tiny_state", action_head={"use_proprio": True, "proprio_dim": DIM})
    relative = base.replace(name="tiny_relative", action_base="state")
    none_report, none_text = run_predict(tmp_path, capsys, demo_episode, base.to_dict(), state, "none")
    rel_report, rel_text = run_predict(tmp_path, capsys, demo_episode, relative.to_dict(), state, "relative")

    # action_base none: the actions are the commands; nothing else is reported.
    assert none_report["action_base"] == {"rule": "none", "relative_to": describe_action_base("none", DIM)}
    assert "predicted_actions" not in none_report
    assert "action_base 'none'" in none_text
    # action_base state: actions = the commands = predicted actions + state[0:A], to the float32 rounding.
    assert rel_report["action_base"]["rule"] == "state"
    assert rel_report["action_base"]["base"] == state[:DIM]
    assert "commands = predicted actions + state[0:7]" in rel_report["action_base"]["relative_to"]
    actions, predicted = np.array(rel_report["actions"]), np.array(rel_report["predicted_actions"])
    np.testing.assert_allclose(actions, predicted + np.array(state[:DIM]), atol=1e-6)
    # Same weights, same noise, same state: the prediction is the stateless-base one; only the base differs.
    np.testing.assert_allclose(predicted, np.array(none_report["actions"]), atol=1e-6)
    assert np.abs(actions - predicted).max() > 0.2, "the base was added"
    # The printed table is the JSON's actions (the commands), named as such.
    assert "commands [10 x 7]" in rel_text and "action_base 'state'" in rel_text
    np.testing.assert_allclose(printed_table(rel_text, 10, DIM), actions, atol=5e-5)
    np.testing.assert_allclose(printed_table(none_text, 10, DIM), np.array(none_report["actions"]), atol=5e-5)
