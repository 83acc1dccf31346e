"""Progress that suits both a person at a terminal and a cron log."""

from __future__ import annotations

import sys
import time


class Progress:
    """tqdm on a terminal; otherwise a plain line every `every` seconds (cron and CI logs). The plain
    line's rate counts what `update` says was `counted` (default: every item), so a run's progress and
    its final line can give one rate: fields inferred per second, not fields looked at."""

    def __init__(self, total: int, desc: str, every: float = 10.0, counts: str = ""):
        self.total, self.desc, self.every, self.n, self.counted = total, desc, every, 0, 0
        self.rate_unit = f"{counts}/s" if counts else "/s"
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True)

    def update(self, n: int, counted: int | None = None, **info) -> None:
        self.n += n
        self.counted += n if counted is None else counted
        if self.bar is not None:
            self.bar.update(n)
            if info:
                self.bar.set_postfix(info, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            seconds = max(now - self.t0, 1e-9)
            rate, pace = self.counted / seconds, self.n / seconds
            eta = (self.total - self.n) / pace if pace > 0 else float("inf")
            extra = " ".join(f"{k}={v}" for k, v in info.items())
            print(f"{self.desc}: {self.n}/{self.total} {rate:.1f}{self.rate_unit} eta {eta:.0f}s {extra}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
