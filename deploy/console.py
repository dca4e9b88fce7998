"""What `expertmesh serve` prints: numbered start-up steps with progress while they run, the
banner once ready, faults and recoveries while serving, and one line when it stops. Ray's and
Serve's own INFO logging is held back unless --verbose."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

PREFIX = "expertmesh:"
TICK_S = 5.0  # a still-running step reports progress this often


class Console:
    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.t0 = time.monotonic()
        self._lock = threading.Lock()

    def line(self, message: str) -> None:
        self._print(f"{PREFIX} {message}")

    def detail(self, message: str) -> None:
        self._print(f"  {message}")

    def _print(self, text: str) -> None:
        with self._lock:
            print(text, file=self.out, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @contextmanager
    def step(
        self, number: int, total: int, what: str, status: Callable[[], str] | None = None
    ) -> Iterator[None]:
        """`[n/total] what`; while it runs, every TICK_S seconds: the time so far and
        `status()` (e.g. which replicas are still starting)."""
        self.line(f"[{number}/{total}] {what}")
        start, done = time.monotonic(), threading.Event()

        def tick() -> None:
            while not done.wait(TICK_S):
                extra = ""
                if status is not None:
                    try:
                        extra = status()
                    except Exception:  # progress is best effort
                        extra = ""
                waited = time.monotonic() - start
                self.detail(f"... {waited:.0f} s" + (f": {extra}" if extra else ""))

        ticker = threading.Thread(target=tick, name="progress", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join(timeout=1.0)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_ray(verbose: bool) -> None:
    """Ray's and Serve's driver-side INFO lines at WARNING unless verbose; never the misleading
    'Connecting to existing Serve app' that serve.run logs right after our serve.start."""
    level = logging.INFO if verbose else logging.WARNING
    for name in ("ray._private.worker", "ray.serve"):
        logging.getLogger(name).setLevel(level)
    # "Token authentication is enabled for this Ray cluster" (Ray's default on a local cluster)
    auth = logging.INFO if verbose else logging.ERROR
    logging.getLogger("ray._private.authentication").setLevel(auth)
    logging.getLogger("ray.serve").addFilter(_DropMessages(("Connecting to existing Serve app",)))
