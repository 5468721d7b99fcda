"""CLI consistency (issue 22): every subcommand describes itself, every option says what it
does and its default, enumerations are argparse choices, and the old spellings still work."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from vpp_edge import cli

# Options whose help lists alternatives ("a | b | ...") but also takes open values, with why.
OPEN_VALUES = {
    ("run", "--cameras"): "device paths: v4l2:/dev/video0",
    ("demo", "--cameras"): "device paths: v4l2:/dev/video0",
    ("keys", "name"): "any operator's name",
    ("deploy", "--profile"): "a profile YAML",
}


def _subparsers(parser: argparse.ArgumentParser,
                path: tuple[str, ...] = ()) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield " ".join((*path, name)), sub
                yield from _subparsers(sub, (*path, name))


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)):
            yield action


def _enum_like(help_text: str) -> bool:
    """Help that lists plain-word alternatives, "a | b | c": an enumeration."""
    words = [w.strip() for w in help_text.split("(")[0].split(":")[-1].split("|")]
    return len(words) >= 2 and all(re.fullmatch(r"[a-z0-9_.-]+", w) for w in words)


SUBCOMMANDS = list(_subparsers(cli.build_parser()))


def test_the_walk_sees_every_subcommand():
    names = {name for name, _ in SUBCOMMANDS}
    assert {"run", "demo", "replay", "build-engines", "calibrate sweep", "calibrate knobs", "record", "eval",
            "train", "deploy", "bridge"} <= names


@pytest.mark.parametrize("name,parser", SUBCOMMANDS, ids=[n for n, _ in SUBCOMMANDS])
def test_every_subcommand_describes_itself_and_its_options(name, parser):
    assert parser.description and len(parser.description) > 30, f"vpp {name}: no description"
    for action in _options(parser):
        flag = "/".join(action.option_strings) or action.dest
        assert action.help, f"vpp {name} {flag}: no help text"
        if action.help == argparse.SUPPRESS:  # an old spelling kept working, not listed
            continue
        shown = parser._get_formatter()._expand_help(action)
        takes_value = action.nargs != 0
        if takes_value and action.default not in (None, [], argparse.SUPPRESS) and action.option_strings:
            assert "default" in shown, f"vpp {name} {flag}: its default {action.default!r} is not shown"
        if action.choices is None and (name, flag) not in OPEN_VALUES:
            assert not _enum_like(shown), f"vpp {name} {flag}: lists alternatives without choices= ({shown!r})"


def test_enumerations_refuse_typos_in_one_line(capsys):
    for argv in (["eval", "metaworld", "--artifact", "a", "--backend", "tensorrtt"],
                 ["eval", "metaworld", "--artifact", "a", "--smoothing", "crossfad"],
                 ["deploy", "--target", "u@h", "--robot", "pandaa"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "invalid choice" in err and "Traceback" not in err, argv


def test_artifact_is_one_option_everywhere():
    parser = cli.build_parser()
    for name, sub in _subparsers(parser):
        for action in _options(sub):
            if "artifact" in action.dest and action.help != argparse.SUPPRESS and action.dest != "artifact":
                pytest.fail(f"vpp {name}: the artifact is spelled {action.option_strings or action.dest}")
            if action.dest == "artifact":
                assert action.option_strings == ["--artifact"], f"vpp {name}: {action.option_strings}"
    new = parser.parse_args(["build-engines", "--artifact", "artifacts/x"])
    old = parser.parse_args(["build-engines", "artifacts/x"])  # the positional before --artifact still parses
    assert str(new.artifact) == str(old.artifact_old_spelling) == "artifacts/x"


@pytest.mark.parametrize("argv", [["presets"], ["calibrate", "knobs"], ["doctor"]], ids=" ".join)
def test_listings_fit_80_columns(argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # rich sizes its tables from it when not on a terminal
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 5
    assert max(map(len, lines)) <= 80, max(lines, key=len)


def test_the_readme_lists_every_command():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("## The command line", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    listed = [line.split()[1] for line in block.splitlines() if line.startswith("vpp ")]
    top = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(listed) == sorted(top.choices)
    assert max(map(len, block.splitlines())) <= 80
