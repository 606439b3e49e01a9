"""A sweep on a cluster: its objects created, kept going and read back, joined with the store's markers.

    client.py    the API calls on plain dicts, retried through transient errors; what a pod says
    submit.py    ``critbatch submit``: create what is missing (suspended), resume within the cap, remember failures
    status.py    ``critbatch status``: one table of every cell's cluster state, store marker and verdict
    markers.py   the cells' _SUCCESS / _FAILED markers, read with one LIST per poll
    indexed.py   backend indexed: each cell's state from its class's Indexed Job's indexes

What each kind of object is and how its status reads is its backend's (critbatch.jobs.backends); the
objects themselves are rendered by critbatch.jobs.sweep.
"""
