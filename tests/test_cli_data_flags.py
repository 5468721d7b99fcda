"""One spelling for "folders of datasets in the sample format": --data, in vpp export and
vpp calibrate sweep/dataset alike (issue 22); the old export spelling still works, unlisted."""

from __future__ import annotations

from pathlib import Path

import pytest

from vpp_edge import cli

from .test_cli_usability import assert_one_line_error, run_cli


@pytest.mark.parametrize("command", [["export"], ["calibrate", "sweep"], ["calibrate", "dataset", "--out", "x.npz"]])
def test_data_is_one_repeatable_multi_value_flag(command):
    args = cli.build_parser().parse_args([*command, "--data", "a", "b", "--data", "c"])
    assert args.data == [Path("a"), Path("b"), Path("c")]


def test_export_keeps_the_old_spelling_unlisted(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["export", "--calibration-data", "old"])
    assert args.data_old_spelling == [Path("old")] and args.data is None
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--help"])
    help_text = capsys.readouterr().out
    assert "--data DIR" in help_text and "--calibration-data" not in help_text


def test_export_names_the_missing_data_folder(capsys):
    code, _, err = run_cli(["export", "--data", "/nonexistent"], capsys)
    assert_one_line_error(code, err, cli.EXIT_ERROR, match="--data /nonexistent: no such file")
