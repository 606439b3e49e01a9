"""The progress display of ``critbatch train`` (rank 0 alone shows one), updated at each host sync.

    bar    a tqdm bar on stderr (``auto`` on a terminal)
    lines  ``step 120/3000  loss 1.234  lr 0.1  41.2 steps/s`` every 10 s on stdout (``auto`` otherwise)
    json   one JSON object per line on stdout, every second, for programs (the local executor reads them):
           {"step": 120, "total": 3000, "loss": 1.234, "lr": 0.1, "steps_per_s": 41.2}
           (``loss`` is the last finite minibatch loss, null before there is one)
    none   nothing
"""

from __future__ import annotations

import json
import math
import sys
import time

MODES = ("auto", "bar", "lines", "json", "none")
#: Seconds between two progress lines (the last step is always shown).
LINE_SECONDS = {"lines": 10.0, "json": 1.0}


class Progress:
    def __init__(self, mode: str, total: int, start: int):
        if mode not in MODES:
            raise ValueError(f"progress: unknown mode {mode!r}; allowed: {', '.join(MODES)}")
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total = mode, total
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.last_line, self.last_step = time.monotonic(), start

    def update(self, step: int, loss: float, lr: float, force: bool = False) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", refresh=False)
            return
        now = time.monotonic()
        if self.mode not in LINE_SECONDS or not (force or now - self.last_line >= LINE_SECONDS[self.mode]):
            return
        rate = (step - self.last_step) / max(1e-9, now - self.last_line)
        if self.mode == "json":
            line = json.dumps({"step": step, "total": self.total, "loss": loss if math.isfinite(loss) else None,
                               "lr": lr, "steps_per_s": round(rate, 3)})
        else:
            line = f"step {step}/{self.total}  loss {loss:.4g}  lr {lr:.4g}  {rate:.1f} steps/s"
        print(line, flush=True)
        self.last_line, self.last_step = now, step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
