"""``python -m critbatch.jobs.train.launch``: torchrun's command line, with the trainer's exit code passed on.

What every rendered pod runs (k8s/templates; the Job, PyTorchJob, TrainJob and Indexed Job alike):

    # one process in the pod: no torchrun, the trainer runs in this process
    python -m critbatch.jobs.train.launch --standalone --nproc-per-node=1 -m critbatch.jobs.cli train --cell ...
    # four GPUs: torch.distributed.run starts four workers; the pod exits with the first failed one's code
    python -m critbatch.jobs.train.launch --standalone --nproc-per-node=4 -m critbatch.jobs.cli train --cell ...

Why it exists: torchrun exits 1 whatever its worker returned (2 for a bad cell, 202 for a store outage)
and 1 after a SIGTERM, so a failure policy keyed on exit codes - the Job's podFailurePolicy, the
PyTorchJob's ExitCode restart policy, the TrainJob runtime's - could not tell a bad cell, which
retrying cannot help, from a preemption or an outage, which a retry resumes. The table of codes is in
jobs/cell/errors.py and the README.

The arguments are torchrun's, parsed by torch.distributed.run itself, so the ``PET_*`` variables that
PyTorchJob and TrainJob inject count as they do for torchrun. Then:

- one node and one process per node: the training module runs in this process (``runpy``; a script or
  ``--no-python`` program replaces this process instead). The trainer is the container's process: it
  gets the kubelet's SIGTERM itself and its exit code is the container's.
- otherwise: torch.distributed.run's launch (workers' output, rendezvous, forwarding of SIGTERM to the
  workers, SIGKILL ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds later), and the exit code is the first
  failed worker's (128 + N for one killed by signal N), or 128 + N when the launcher itself got signal N
  (SIGTERM: the workers checkpointed and stopped). Each worker's entry point is wrapped in
  :func:`record_cause`, so the failure summary torchrun prints names the exception, not only a code.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def container_exit_code(returncode: int) -> int:
    """The code a container reports for a process that ended with ``returncode`` (-N: killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def record_cause(fn: F) -> F:
    """``fn`` under torch.distributed.elastic's ``@record`` when it runs as a torchrun worker.

    ``@record`` writes an exception's type, message and traceback to the worker's error file
    (``TORCHELASTIC_ERROR_FILE``, which torchrun sets), from which the launcher's failure summary takes the
    root cause; the exception still propagates, so the command maps it to its exit code as usual. Outside
    torchrun there is no error file and ``fn`` runs as it is.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
            return fn(*args, **kwargs)
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(fn)(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    min_nodes, max_nodes = torchrun.parse_min_max_nnodes(args.nnodes)
    if max_nodes == 1 and torchrun.determine_local_world_size(args.nproc_per_node) == 1:
        return _run_here(args)
    return _run_workers(torchrun, args)


def _run_here(args) -> int:
    """The training command in this process (a module) or instead of it (a script, a ``--no-python`` program)."""
    if args.module and not args.no_python and not args.run_path:
        sys.argv = [args.training_script, *args.training_script_args]
        try:
            runpy.run_module(args.training_script, run_name="__main__", alter_sys=True)
        except SystemExit as done:
            return _exit_status(done.code)
        return 0
    if args.no_python:
        command = [args.training_script, *args.training_script_args]
    else:
        command = [os.getenv("PYTHON_EXEC", sys.executable), "-u", args.training_script, *args.training_script_args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)
    raise AssertionError("unreachable: execvp returns only by raising")


def _exit_status(code: object) -> int:
    """What the interpreter would exit with for ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_workers(torchrun, args) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.run(args)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = container_exit_code(failure.exitcode)
        print(failed.format_msg(), file=sys.stderr)
        print(f"critbatch launch: rank {rank} failed first (exit code {failure.exitcode}); exit {code}",
              file=sys.stderr, flush=True)
        return code
    except SignalException as stopped:
        code = 128 + int(stopped.sigval)
        print(f"critbatch launch: got {stopped.sigval.name}, workers stopped; exit {code}", file=sys.stderr,
              flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
