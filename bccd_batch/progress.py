"""Progress that suits both a person at a terminal and a cron log."""

from __future__ import annotations

import sys
import time


class Progress:
    """tqdm on a terminal; otherwise a plain line every `every` seconds (cron and CI logs)."""

    def __init__(self, total: int, desc: str, every: float = 10.0):
        self.total, self.desc, self.every, self.n = total, desc, every, 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True)

    def update(self, n: int, **info) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if info:
                self.bar.set_postfix(info, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            rate = self.n / max(now - self.t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            extra = " ".join(f"{k}={v}" for k, v in info.items())
            print(f"{self.desc}: {self.n}/{self.total} {rate:.1f}/s eta {eta:.0f}s {extra}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
