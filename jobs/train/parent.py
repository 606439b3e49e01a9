"""A trainer that dies with the process that started it (Linux: ``PR_SET_PDEATHSIG``).

``critbatch run`` starts its trainers in sessions of their own (so that Ctrl-C
reaches the executor alone, which turns it into a SIGTERM and a checkpoint) and
asks the kernel to SIGKILL each one when the executor dies, however it dies:
:func:`preexec` runs in the child between fork and exec. Under torchrun the
workers are torchrun's children, started in new sessions by torchrun itself;
the executor sets ``CRITBATCH_DIE_WITH_PARENT`` and each worker arms the same
signal for itself at start-up (:func:`arm_from_env`), so a SIGKILL of the
executor takes torchrun, and torchrun's death takes its workers. A parent that
died before the signal was armed is caught by comparing ``getppid()`` with the
executor's pid (torchrun's workers cannot know torchrun's, so a torchrun killed
in the second before a worker arms its signal leaves that worker running; its
lease then expires).

Elsewhere than Linux nothing is armed; the executor still stops its children
on every exit path it sees.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Callable

#: Set (to "1") in a trainer's environment: it arms PR_SET_PDEATHSIG for itself at start-up.
DIE_WITH_PARENT_ENV = "CRITBATCH_DIE_WITH_PARENT"

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _arm(parent: int, sig: int) -> bool:
    """PR_SET_PDEATHSIG for the calling process; if ``parent`` is already gone, die now."""
    if _LIBC is None or _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), sig)
    return True


def preexec(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` arming ``sig`` in the child when its parent (this process) dies;
    None where there is no such thing."""
    if _LIBC is None:
        return None
    parent = os.getpid()
    return lambda: (_arm(parent, sig), None)[1]


def arm_from_env() -> bool:
    """At a trainer's start: arm SIGKILL on the parent's death if ``CRITBATCH_DIE_WITH_PARENT`` is set."""
    if os.environ.get(DIE_WITH_PARENT_ENV) != "1":
        return False
    return _arm(os.getppid(), signal.SIGKILL)
