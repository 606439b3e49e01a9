"""The ``critbatch`` command.

    critbatch demo                                  # MNIST-1D + linreg sweeps, analysis, report (local)
    critbatch run GRID [--store DIR|s3://B/P] [--parallel N]
    critbatch train --cell CELL.json --store s3://critbatch/runs
    torchrun --standalone --nproc-per-node=2 -m critbatch.jobs.cli train --cell CELL.json
    critbatch render GRID | kubectl apply -f -
    critbatch submit GRID ; critbatch status GRID
    critbatch analyze --store s3://critbatch/runs --sweep NAME
    critbatch search GRID [--store DIR|s3://B/P] [--parallel N] [--cluster]  # B_crit from part of the grid
    critbatch import shallue DIR --store S --sweep NAME  # Shallue et al.'s released trials

Every subcommand's options are defined here, so ``--help`` is fast (nothing
heavy is imported until a command runs). Bad input, a missing file or an
unreachable store prints one line and exits with ``ExitCode.CONFIG`` (``train``:
``ExitCode.STORE_UNAVAILABLE`` for the store, which a retry can cure). The codes
are one enum, critbatch.jobs.cell.errors.ExitCode; ``critbatch train --help``
prints the trainer's from it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable

from . import __version__
from .cell.analysis_args import add_analyze_options
from . import backends
from .cell.errors import ConfigError, DeviceMissing, ExitCode, StoreUnavailable, exit_code_table


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(ExitCode.CONFIG)


class _FMT(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" where it says something: not to a None or False default, nor to a help that
    already names its default. Epilogs keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


#: ``critbatch train --help``'s table, made from the one definition of the codes.
_TRAIN_EXIT_CODES = "exit codes (critbatch.jobs.cell.errors.ExitCode; retry: whether a retry can cure it):\n" \
    + exit_code_table("train")


def _store_arg(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--store",
        default=None if required else os.environ.get("CRITBATCH_STORE", "./critbatch-out"),
        required=required,
        help="object store: a directory, or s3://BUCKET/PREFIX (endpoint and keys from AWS_* variables); "
        "env CRITBATCH_STORE",
    )


def _command(sub, name: str, target: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=_FMT)
    p.set_defaults(_target=target)
    return p


def _lost_grace(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lost-grace", type=float, default=None, metavar="SECONDS",
                   help="a cell whose Job succeeded this long ago with no _SUCCESS in the store is lost "
                   "(default: a minute; more for a store that takes long to show a write)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="critbatch",
        description="Measure how SGD training speed scales with batch size and find the critical batch size.",
        epilog="examples:\n"
        "  critbatch demo                                   # two small sweeps on this machine, then their reports\n"
        "  critbatch run digits --store ./out               # a preset's cells here, resuming what was interrupted\n"
        "  critbatch render table2-cifar10-resnet34 | kubectl apply -f -   # a Kubernetes Job per cell, and the analysis",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"critbatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # ---- train: one cell ---------------------------------------------------
    p = _command(sub, "train", "critbatch.jobs.train.main:main", "train one cell and stream its logs to the store",
                 epilog=_TRAIN_EXIT_CODES)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--cell", help="the cell: a JSON file, or inline JSON starting with '{'")
    which.add_argument("--cell-from-sweep", metavar="SWEEP",
                       help="the cell at --index in --resource-class of the store's SWEEP/sweep.yaml (an Indexed "
                       "Job's pod: backend indexed)")
    p.add_argument("--resource-class", help="with --cell-from-sweep: the class of cells, e.g. 1gpu")
    p.add_argument("--sweep-digest", help="with --cell-from-sweep: the digest of the class's cells the Job was "
                   "rendered for; a sweep.yaml whose class differs is refused (exit 2)")
    p.add_argument("--index", type=int, default=None,
                   help="with --cell-from-sweep: the cell's index in its class (default: env JOB_COMPLETION_INDEX, "
                   "which an Indexed Job sets)")
    _store_arg(p)
    p.add_argument("--data-root", default=os.environ.get("CRITBATCH_DATA", "~/.cache/critbatch/data"),
                   help="where datasets live: a directory, or a store URL they were staged to; env CRITBATCH_DATA")
    p.add_argument("--download", action="store_true", help="download a missing dataset (needs internet)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    p.add_argument("--flush-steps", type=int, default=500, help="flush a log part every N steps")
    p.add_argument("--flush-seconds", type=float, default=15.0, help="... or every T seconds, whichever first")
    p.add_argument("--checkpoint-seconds", type=float, default=300.0, help="checkpoint at most this often")
    p.add_argument("--checkpoint-steps", type=int, default=0, help="also checkpoint every N steps (0: time only)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--force", action="store_true", help="train again even if the cell's _SUCCESS exists")
    p.add_argument("--pause-at", type=int, default=None,
                   help="evaluate, checkpoint and exit 0 at this step, without _SUCCESS; a later run resumes "
                   "(the learning-rate race of `critbatch search`)")
    p.add_argument("--lease-seconds", type=float, default=None,
                   help="the cell's lease in the store lives this long without a renewal, renewed every third of "
                   "it (default: env CRITBATCH_LEASE_SECONDS, else 60)")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "json", "none"],
                   help="progress display: a bar on a terminal, periodic lines otherwise; json: one JSON "
                   "object per line, for programs")
    p.add_argument("--base-wait", type=float, default=None,
                   help=f"a branch: seconds to wait for its base's kept checkpoint before exiting "
                   f"{ExitCode.BASE_PENDING}, a retry waits again (default: env CRITBATCH_BASE_WAIT, else 600)")

    # ---- data: staging datasets into the store ------------------------------
    p = _command(sub, "data", "critbatch.jobs.data.datasets:cli_main", "stage datasets into the store for clusters without internet")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    dsub.required = True
    s = dsub.add_parser("stage", help="upload a dataset's files to <store>/datasets/NAME", formatter_class=_FMT)
    s.add_argument("name", help="dataset name (mnist, cifar10, cifar100, svhn, wikitext2, cityscapes)")
    s.add_argument("--from", dest="source", required=True, help="directory holding the dataset in its standard format")
    _store_arg(s)

    # ---- render / submit / status: Kubernetes --------------------------------
    p = _command(sub, "render", "critbatch.jobs.sweep.render:cli_render", "render a grid to Kubernetes manifests")
    p.add_argument("grid", help="grid spec YAML, or the name of a preset (see `critbatch presets`)")
    p.add_argument("-o", "--output", default="-", help="directory for one file per object, or - for a stream")
    p.add_argument("--backend", default=None, choices=backends.NAMES,
                   help=f"override the grid's backend: {backends.help_text()} (default: "
                   f"{backends.DEFAULT_ONE_NODE.name} for one node, {backends.DEFAULT_MULTI_NODE.name} for several)")
    p.add_argument("--analysis", action="store_true",
                   help="the analysis Job alone, which starts at once: apply it when every cell has finished "
                   "(the cells' stream leaves it out, so re-applying that never touches a running analysis)")
    p.add_argument("--store", default=None, help="override the grid's store (s3://BUCKET/PREFIX)")
    p.add_argument("--image", default=None, help="override the grid's image")
    p.add_argument("--namespace", default=None, help="override the grid's namespace")

    p = _command(sub, "submit", "critbatch.jobs.cluster.submit:cli_submit", "create a grid's objects on the cluster")
    p.add_argument("grid", help="grid spec YAML or preset name")
    p.add_argument("--namespace", default=None, help="namespace (default: the grid's, else critbatch)")
    p.add_argument("--max-active", type=int, default=0,
                   help="cap on cells running at once; the rest wait suspended (default: the grid's max_active; "
                   "0: no cap)")
    p.add_argument("--store", default=None, help="override the grid's store (s3://BUCKET/PREFIX)")
    p.add_argument("--image", default=None, help="override the grid's image (the placeholder critbatch:latest is refused)")
    p.add_argument("--backend", default=None, choices=backends.NAMES,
                   help=f"override the grid's backend: {backends.help_text()}")
    p.add_argument("--retry-failed", action="store_true",
                   help="delete failed cells' objects and _FAILED markers and create them anew")
    p.add_argument("--wait", action="store_true",
                   help="keep submitting until every cell has finished, then start the analysis Job")
    p.add_argument("--poll-seconds", type=float, default=30.0, help="polling interval with --wait")
    p.add_argument("--timeout", type=float, default=0.0, help="give up waiting after this many seconds (0: never)")
    _lost_grace(p)
    p.add_argument("--dry-run", action="store_true", help="say what would be created, create nothing")

    p = _command(sub, "status", "critbatch.jobs.cluster.status:cli_status", "one table of every cell's cluster and store state")
    p.add_argument("grid", help="grid spec YAML or preset name")
    p.add_argument("--namespace", default=None, help="namespace (default: the grid's, else critbatch)")
    p.add_argument("--store", default=None, help="override the grid's store")
    p.add_argument("--backend", default=None, choices=backends.NAMES,
                   help="the backend the cells were submitted with, if not the grid's")
    p.add_argument("--no-cluster", action="store_true", help="read only the store")
    _lost_grace(p)

    p = _command(sub, "presets", "critbatch.jobs.sweep.grid:cli_presets", "list the grid presets shipped with critbatch")

    _command(sub, "plugins", "critbatch.jobs.cell.registry:cli_plugins",
             "list the models and datasets installed (critbatch's and other packages' plug-ins; docs/plugins.md)")

    p = _command(sub, "cells", "critbatch.jobs.sweep.grid:cli_cells",
                 "expand a grid, print its plan (devices, micro-batch, accumulation) to stderr and its cells")
    p.add_argument("grid", help="grid spec YAML or preset name")
    p.add_argument("--sweep-yaml", action="store_true",
                   help="print the sweep.yaml the grid writes to <store>/<sweep>/ instead (backend indexed with "
                   "kubectl apply: upload it before the Jobs)")

    _command(sub, "schema", "critbatch.jobs.sweep.grid:cli_schema",
             "print the grid spec's JSON Schema (editors complete and check a grid with it)")

    # ---- run: local executor --------------------------------------------------
    p = _command(sub, "run", "critbatch.jobs.local.executor:cli_run", "run a grid's cells on this machine")
    p.add_argument("grid", help="grid spec YAML or preset name")
    p.add_argument("--store", default=None,
                   help="directory or s3://BUCKET/PREFIX (default: the grid's store if local, else ./critbatch-out)")
    p.add_argument("--parallel", type=int, default=1, help="cells at once; CPU threads are divided among them")
    p.add_argument("--data-root", default=os.environ.get("CRITBATCH_DATA", "~/.cache/critbatch/data"),
                   help="where datasets live")
    p.add_argument("--log-dir", default=None, help="where each cell's output goes (default: <store>/.logs or ./critbatch-logs)")

    # ---- search: the critical batch size from part of a grid ------------------------
    p = _command(sub, "search", "critbatch.jobs.search.command:cli_search",
                 "find a grid's critical batch size from a fraction of its compute (the grid's search: block)")
    p.add_argument("grid", help="grid spec YAML, preset name, or the grid as inline JSON")
    p.add_argument("--store", default=None,
                   help="directory or s3://BUCKET/PREFIX (default: the grid's store if local, else ./critbatch-out; "
                   "with --cluster: the grid's)")
    p.add_argument("--parallel", type=int, default=1, help="cells at once on this machine")
    p.add_argument("--data-root", default=os.environ.get("CRITBATCH_DATA", "~/.cache/critbatch/data"),
                   help="where datasets live")
    p.add_argument("--log-dir", default=None, help="where each cell's output goes (default: <store>/.logs)")
    p.add_argument("--cluster", action="store_true",
                   help="run the cells as the cluster's Jobs (the submit path); this process decides")
    p.add_argument("--controller", action="store_true",
                   help="print the search controller's manifests (a Job with its ServiceAccount and Role) for "
                   "kubectl apply, instead of searching")
    p.add_argument("--image", default=None, help="with --cluster/--controller: override the grid's image")
    p.add_argument("--namespace", default=None, help="with --cluster/--controller: override the grid's namespace")
    p.add_argument("--poll-seconds", type=float, default=30.0,
                   help="how often the cluster (or another search being followed) is looked at")

    # ---- analyze: the report ----------------------------------------------------
    p = _command(sub, "analyze", "critbatch.analysis.report:cli_analyze", "aggregate a sweep's logs into the report")
    _store_arg(p)
    p.add_argument("--sweep", action="append", required=True, help="sweep name; repeat to analyse several together")
    add_analyze_options(p)
    p.add_argument("--output", default=None, help="also copy the report to this local directory")

    # ---- import: another study's measurements as a sweep -----------------------------
    p = _command(sub, "import", "critbatch.analysis.importers:cli_import",
                 "read another study's released measurements into a sweep in the store")
    isub = p.add_subparsers(dest="source", metavar="SOURCE", parser_class=_Parser)
    isub.required = True
    s = isub.add_parser("shallue", formatter_class=_FMT,
                        help="Shallue et al. (2018)'s trials: dataset/model/optimizer/batch_size/{study.json, "
                        "trial_id/metadata.json, trial_id/measurements.csv}")
    s.add_argument("dir", help="the extracted batch_science directory, or a part of it")
    _store_arg(s)
    s.add_argument("--sweep", required=True, help="name of the new sweep")
    s.add_argument("--curve", default="train/cross_entropy_error",
                   help="the measurements.csv column that is each trial's training-loss curve")
    s.add_argument("--workload", action="append", default=None,
                   help="only workloads (dataset/model/optimizer) matching this glob; repeatable")

    # ---- demo ------------------------------------------------------------------------
    p = _command(sub, "demo", "critbatch.jobs.local.demo:cli_demo", "run the MNIST-1D and linreg sweeps and write the reports")
    p.add_argument("--store", default=None, help="directory for the demo (default ./critbatch-out)")
    p.add_argument("--s3", action="store_true", help="use an S3 server started on loopback (SeaweedFS) instead")
    p.add_argument("--parallel", type=int, default=2, help="cells at once")
    p.add_argument("--quick", action="store_true", help="a reduced demo (fewer batch sizes, epochs and seeds)")
    return parser


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_resolve(args._target)(args) or 0)
    except ConfigError as err:
        for problem in err.problems:
            print(f"critbatch {args.command}: error: {problem}", file=sys.stderr)
        return ExitCode.CONFIG
    except StoreUnavailable as err:
        print(f"critbatch {args.command}: error: store unreachable: {err}", file=sys.stderr)
        # In a pod, a store outage is worth a retry (which resumes); exit code 2 would fail the Job for good.
        return ExitCode.STORE_UNAVAILABLE if args.command == "train" else ExitCode.CONFIG
    except DeviceMissing as err:
        print(f"critbatch {args.command}: error: {err}", file=sys.stderr)
        return ExitCode.NO_DEVICE
    except FileNotFoundError as err:
        print(f"critbatch {args.command}: error: no such file: {err.filename or err}", file=sys.stderr)
        return ExitCode.CONFIG
    except BrokenPipeError:
        # The reader went away (`critbatch presets | head`): stop quietly, as the Python docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"critbatch {args.command}: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
