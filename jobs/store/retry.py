"""Waiting out a store outage: the one retry loop above botocore's.

Two layers, one per time scale:

- a single S3 call is retried by botocore itself (standard mode: connection
  errors, timeouts, throttling and 5xx, with jittered exponential backoff;
  a few seconds in all). What is still transient after that reaches the
  caller as :class:`StoreUnavailable` (:mod:`.s3`). A local directory raises
  nothing transient.
- an outage of minutes is waited out here, by the callers that can afford to
  wait: the log stream's uploader (training goes on meanwhile, and the parts
  cut in the meantime wait in the spool on local disk) and the trainer's final
  writes (``model.pt``, ``_SUCCESS``). Past its deadline the wait ends in
  :class:`StoreUnavailable`, which ``critbatch train`` exits with as code 202:
  retryable, and the next attempt resumes from the last checkpoint.

Everything else is raised at once: a refused request or a bug is not an outage.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from typing import Callable, TypeVar

from ..cell.errors import StoreUnavailable

T = TypeVar("T")


def wait_out_outage(fn: Callable[[], T], *, what: str, deadline: float | None, stop: threading.Event | None = None,
                    base_delay: float = 0.5, max_delay: float = 30.0,
                    on_error: Callable[[StoreUnavailable], None] | None = None, note: str = "") -> T:
    """``fn()``, called again after every :class:`StoreUnavailable` until it succeeds.

    The pause between tries doubles from ``base_delay`` up to ``max_delay``
    (each jittered down by up to half, so that writers do not retry in step).
    ``deadline`` is a :func:`time.monotonic` value (None: no deadline); the
    last try is made at it. A set ``stop`` event ends the wait at once. Either
    way the wait ends in StoreUnavailable, chained to the last error.
    ``on_error`` sees every failure; one line goes to stderr when the outage
    starts (``what`` failed, plus ``note``) and one when it ends.
    """
    started = time.monotonic()
    failures = 0
    while True:
        try:
            result = fn()
        except StoreUnavailable as err:
            failures += 1
            if on_error is not None:
                on_error(err)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise StoreUnavailable(f"cannot {what}: the store is still unavailable after {now - started:.0f} s "
                                       f"({err})") from err
            if failures == 1:
                until = "" if deadline is None else f" for up to {deadline - now:.0f} s"
                print(f"store: cannot {what} ({err}); retrying{until}{note}", file=sys.stderr, flush=True)
            pause = min(max_delay, base_delay * 2 ** min(failures - 1, 30)) * (0.5 + random.random() / 2)
            if deadline is not None:
                pause = min(pause, deadline - now)
            if stop is None:
                time.sleep(pause)
            elif stop.wait(pause):
                raise StoreUnavailable(f"cannot {what}: stopped while waiting for the store ({err})") from err
            continue
        if failures:
            print(f"store: {what}: done after {failures} failed tries ({time.monotonic() - started:.0f} s)",
                  file=sys.stderr, flush=True)
        return result
