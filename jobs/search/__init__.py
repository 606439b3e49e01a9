"""``critbatch search``: a grid's critical batch size, with its interval, for a fraction of the full grid's compute.

    loop.py       threshold first, a coarse ladder, then the cells that narrow the interval, in waves
    decide.py     which batch sizes and seeds narrow B_crit's interval most per sample (pure)
    race.py       learning-rate trials at one batch size: successive halving on steps to eps (pure)
    state.py      <sweep>/search.json: what ran, why, what was decided; the search resumes from it
    backends.py   the cells as local subprocesses (the executor of ``critbatch run``)
    cluster.py    the cells as the cluster's objects (the submit path), paused by deleting them
    command.py    the command line, the lease that keeps one search per sweep, the summary

Each cell after the threshold's stops at eps (jobs/train/stop.py); the fit and
the curves are the analysis's own (critbatch.analysis), so the interval the
search stops on is the one the report prints.
"""
