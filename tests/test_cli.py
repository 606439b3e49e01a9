"""The command's help: the train exit codes, and defaults shown once and only where they say something."""

from __future__ import annotations

import re

import pytest

from critbatch.jobs.cell.errors import (
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_LEASE_HELD,
    EXIT_NO_DEVICE,
    EXIT_PREEMPTED,
    EXIT_STORE_UNAVAILABLE,
)
from critbatch.jobs.cli import main

COMMANDS = ["train", "run", "render", "submit", "status", "presets", "cells", "analyze", "demo", "data"]


def help_of(command: str, capsys) -> str:
    with pytest.raises(SystemExit, match="0"):
        main([command, "--help"])
    return capsys.readouterr().out


def test_train_help_lists_the_exit_codes(capsys):
    text = help_of("train", capsys).split("exit codes:", 1)[1]
    codes = [int(m.group(1)) for m in re.finditer(r"^  (\d+) ", text, re.M)]
    assert codes == [0, 1, EXIT_CONFIG, EXIT_NO_DEVICE, EXIT_STORE_UNAVAILABLE, EXIT_INTERRUPTED, EXIT_PREEMPTED,
                     EXIT_LEASE_HELD]
    assert codes == [0, 1, 2, 4, 202, 130, 143, 203]
    assert re.search(r"^  202 +the store stayed unreachable", text, re.M)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_default_is_shown_once_and_never_as_none(command, capsys):
    text = re.sub(r"\s+", " ", help_of(command, capsys))
    assert "(default: None)" not in text and "(default: False)" not in text
    options = re.split(r" (?=--?[a-z])", text)
    assert all(option.count("default") <= 1 for option in options if "default" in option), text
