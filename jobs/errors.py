"""Errors every command maps to an exit code.

``ConfigError`` is bad input (exit code 2, reserved in the manifests'
``podFailurePolicy`` as "retrying cannot help"); ``StoreUnavailable`` is a
store that could not be reached after retries.
"""

from __future__ import annotations

#: Exit code for bad configuration or usage. The Kubernetes manifests fail the
#: Job at once on this code instead of retrying.
EXIT_CONFIG = 2


class ConfigError(ValueError):
    """One or more problems with user input, each naming its field."""

    def __init__(self, problems: str | list[str]):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StoreUnavailable(RuntimeError):
    """The object store could not be reached (after the retries allowed)."""
