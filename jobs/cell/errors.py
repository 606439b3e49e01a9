"""Errors every command maps to an exit code, and the table of those codes.

``ConfigError`` is bad input (exit code 2, reserved in the manifests'
``podFailurePolicy`` as "retrying cannot help"); ``StoreUnavailable`` is a
store that could not be reached after retries; ``LeaseHeld`` is a cell another
trainer is working on; ``DeviceMissing`` is a GPU asked for and not there. An
uncaught exception (a bug) exits 1 with its traceback.
"""

from __future__ import annotations

#: Exit code for bad configuration or usage. The Kubernetes manifests fail the
#: Job at once on this code instead of retrying.
EXIT_CONFIG = 2


#: Exit code of ``critbatch train`` when the cell asked for CUDA (``--device cuda``, what a GPU pod
#: renders) and torch sees no device: a node whose driver is older than the image's CUDA, or a pod
#: without its GPU. Permanent (below 128) like a bad configuration: the manifests fail at once rather
#: than train on the CPU or retry onto the same node pool.
EXIT_NO_DEVICE = 4

#: Exit code of ``critbatch train`` when the store stays unreachable. 202 = 128 + EX_IOERR (74): at
#: least 128, so every backend retries it - the PyTorchJob ExitCode policy treats 1-127 as permanent -
#: and above 128 + 64 (SIGRTMAX), so no signal death reports it.
EXIT_STORE_UNAVAILABLE = 202

#: Exit code after Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130

#: Exit code of ``critbatch train`` after a SIGTERM-triggered checkpoint (128 + SIGTERM, what a killed
#: process reports): the next attempt resumes.
EXIT_PREEMPTED = 143


#: Exit code of ``critbatch train`` when another trainer holds the cell's lease in the store (a
#: retried pod while the old one still terminates, a second ``critbatch run`` on the same store): the
#: cell is left untouched. 203 = 128 + EX_TEMPFAIL (75): >= 128, so the PyTorchJob ExitCode policy
#: (1-127 permanent, 128+ retryable) retries it like the Job's podFailurePolicy does (only exit 2
#: fails at once), and above 128 + 64 (SIGRTMAX), so no real signal death reports it.
EXIT_LEASE_HELD = 203

#: Exit code of ``critbatch analyze --strict`` when the report rests on an incomplete sweep (cells
#: listed in sweep.yaml but absent, step rows short of or past a ``_SUCCESS`` count, damaged parts).
#: The report is still written; the code only says it is not the whole sweep's answer.
EXIT_INCOMPLETE = 3


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
