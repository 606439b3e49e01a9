"""The command's help: the train exit codes, and defaults shown once and only where they say something."""

from __future__ import annotations

import re

import pytest

from critbatch.jobs.cell.errors import ExitCode
from critbatch.jobs.cli import main

COMMANDS = ["train", "run", "render", "submit", "status", "presets", "cells", "analyze", "demo", "data"]


def help_of(command: str, capsys) -> str:
    with pytest.raises(SystemExit, match="0"):
        main([command, "--help"])
    return capsys.readouterr().out


def test_train_help_lists_the_exit_codes(capsys):
    """The table is ExitCode's: every code ``critbatch train`` ends with, in order, its retry column and meaning."""
    text = help_of("train", capsys).split("exit codes", 1)[1]
    rows = re.findall(r"^  (\d+) +(yes|no|-) +(.*(?:\n {13}\S.*)*)", text, re.M)
    expected = [c for c in ExitCode if c.source == "train"]
    assert [int(code) for code, _, _ in rows] == expected == [0, 1, 2, 4, 130, 143, 197, 202, 203]
    for (_, retry, meaning), code in zip(rows, expected):
        assert retry == {True: "yes", False: "no", None: "-"}[code.retryable]
        assert re.sub(r"\s+", " ", meaning) == code.meaning
    assert re.search(r"^  202  yes +the store stayed unreachable", text, re.M)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_default_is_shown_once_and_never_as_none(command, capsys):
    text = re.sub(r"\s+", " ", help_of(command, capsys))
    assert "(default: None)" not in text and "(default: False)" not in text
    options = re.split(r" (?=--?[a-z])", text)
    assert all(option.count("default") <= 1 for option in options if "default" in option), text
