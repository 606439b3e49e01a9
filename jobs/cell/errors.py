"""Errors every command maps to an exit code, and the one table of those codes: :class:`ExitCode`.

``ConfigError`` is bad input (``ExitCode.CONFIG``, which the manifests'
failure policies read as "retrying cannot help"); ``StoreUnavailable`` is a
store that could not be reached after retries; ``LeaseHeld`` is a cell another
trainer is working on; ``DeviceMissing`` is a GPU asked for and not there; ``BasePending`` is a branch
whose base's checkpoint is not in the store yet. An
uncaught exception (a bug) exits 1 with its traceback.

``ExitCode`` is the only place a code's number, meaning and retryability are
written: ``critbatch train --help`` prints its table from it, the backends'
failure-policy tables and the rendered manifests' permanent codes are keyed by
it, and a test holds the README's "Exit codes" table to it.
"""

from __future__ import annotations

import textwrap
from enum import IntEnum
from typing import Literal


class ExitCode(IntEnum):
    """An exit code: its number (the member's value), ``meaning``, ``retryable`` and ``source``.

    ``retryable``: True when a retry can cure the failure (the next attempt resumes from the cell's
    checkpoint), False when it cannot (the manifests fail the cell at once), None when the code is not a
    failure. ``source``: who ends with it - ``train`` (``critbatch train``, and the launcher that passes its
    code on), ``kubelet`` (a signal death the kubelet reports for the container) or ``analyze``.

    Why these numbers: 1-127 are the trainer's permanent answers (the PyTorchJob ExitCode policy treats
    every one of them as permanent), 128 + n a signal death; the retryable codes of our own are
    128 + a sysexits code, above 128 + 64 (SIGRTMAX) so that no signal death reports them.
    """

    meaning: str
    retryable: bool | None
    source: Literal["train", "kubelet", "analyze"]

    def __new__(cls, value: int, meaning: str, retryable: bool | None, source: str = "train") -> "ExitCode":
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        member.retryable = retryable
        member.source = source  # type: ignore[assignment]
        return member

    __str__ = int.__repr__  # "2", not "ExitCode.CONFIG", in every message (Python 3.10 too)

    OK = (0, "done, reached its stop threshold, diverged (a result, not a crash), already finished (its "
             "_SUCCESS exists), or paused at --pause-at (checkpointed, no _SUCCESS)", None)
    #: A bug: the traceback is printed. The Job and the TrainJob retry it; the PyTorchJob cannot tell it
    #: from a permanent code.
    CRASH = (1, "a crash: a bug, with its traceback", True)
    #: Bad configuration or usage: nothing is written, and the manifests fail the cell at once.
    CONFIG = (2, "bad input: the cell, the data, the options or the store settings; nothing written", False)
    #: ``critbatch analyze --strict`` on an incomplete sweep (cells listed in sweep.yaml but absent, step
    #: rows short of or past a ``_SUCCESS`` count, damaged parts). The report is still written; the code
    #: only says it is not the whole sweep's answer.
    INCOMPLETE = (3, "analyze --strict: the report rests on an incomplete sweep (the report is still written)",
                  None, "analyze")
    #: The cell asked for CUDA (``--device cuda``, what a GPU pod renders) and torch sees no device: a node
    #: whose driver is older than the image's CUDA, or a pod without its GPU. Permanent like a bad
    #: configuration: the manifests fail at once rather than train on the CPU or retry onto the same pool.
    NO_DEVICE = (4, "--device cuda, and torch sees no CUDA device (a driver older than the image's CUDA, a pod "
                    "without its GPU)", False)
    #: Ctrl-C: 128 + SIGINT.
    INTERRUPTED = (130, "interrupted (Ctrl-C, SIGINT)", True)
    #: SIGKILL (128 + 9): never the trainer's own code, but every failure-policy table answers for it.
    KILLED = (137, "killed (SIGKILL: an OOM kill, a grace period exceeded)", True, "kubelet")
    #: 128 + SIGTERM, what a killed process reports, after the SIGTERM-triggered checkpoint.
    PREEMPTED = (143, "stopped by SIGTERM (preemption, eviction, a deleted pod) after a checkpoint", True)
    #: 128 + EX_UNAVAILABLE (69): the cell is a branch whose base has not yet written the kept checkpoint it
    #: starts from, after waiting ``--base-wait`` seconds (a cluster creates a base and its branches at once);
    #: nothing of the branch was written, and a retry waits again.
    BASE_PENDING = (197, "a branch whose base has not written the checkpoint it starts from within --base-wait "
                         "seconds; nothing of the branch was written", True)
    #: 128 + EX_IOERR (74): the store stayed unreachable. At least 128, so every backend retries it.
    STORE_UNAVAILABLE = (202, "the store stayed unreachable past the retries", True)
    #: 128 + EX_TEMPFAIL (75): another trainer holds the cell's lease in the store (a retried pod while the
    #: old one still terminates, a second ``critbatch run`` on the same store); the cell is left untouched,
    #: and the next attempt finds it finished or takes it over once the lease expires.
    LEASE_HELD = (203, "another trainer holds the cell's lease; nothing of the cell was touched", True)

    @property
    def in_pod(self) -> bool:
        """Whether a cell's pod can end with this code (what every backend's failure policy answers for)."""
        return self.source in ("train", "kubelet")

    @property
    def permanent(self) -> bool:
        """A failure no retry can cure: the manifests fail the cell at once."""
        return self.retryable is False


def exit_code_table(source: str = "train", width: int = 100) -> str:
    """The codes ``source`` ends with, as ``--help`` prints them: the number, whether a retry can cure it
    (yes, no, or - for a code that is not a failure), the meaning."""
    lines = ["  code retry meaning"]
    for code in ExitCode:
        if code.source == source:
            retry = {True: "yes", False: "no", None: "-"}[code.retryable]
            lines.append(textwrap.fill(code.meaning, width=width, initial_indent=f"  {int(code):<4} {retry:<5} ",
                                       subsequent_indent=" " * 13))
    return "\n".join(lines)


class ConfigError(ValueError):
    """One or more problems with user input, each naming its field."""

    def __init__(self, problems: str | list[str]):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StoreUnavailable(RuntimeError):
    """The object store could not be reached (after the retries allowed)."""


class DeviceMissing(RuntimeError):
    """The cell asked for a device (CUDA) that this process cannot see."""


class LeaseHeld(RuntimeError):
    """Another live trainer holds the cell's lease; this one must not touch the cell."""


class BasePending(RuntimeError):
    """A branch's base has not yet written the kept checkpoint the branch starts from (the wait ran out)."""
