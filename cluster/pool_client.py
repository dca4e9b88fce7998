"""The dense side's link to the pool controller: a watcher thread per router.

Each dense worker / replica runs one `PoolWatcher`. In a loop it long-polls the controller's
`sync` with the placement version its router runs (that is the acknowledgement the controller
waits for before releasing rows) and the routed load counted since the last call; a newer table
comes back at once and is swapped into the router's PlacementHandle (routers pick it up at the
next layer step). Shard faults the router reports (`on_fault`, called on the router's loop
thread) are forwarded fire-and-forget, at most once a second per shard.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import ray

from router.placement import PlacementError, PlacementHandle
from workers.expert_load import CountingExpertBackend
from workers.experts import ExpertBackend

log = logging.getLogger(__name__)
LONG_POLL_S = 1.0  # how long one sync may wait for a newer table
FAULT_REPORT_EVERY_S = 1.0


class PoolWatcher:
    """Keeps `handle` on the controller's newest table; pushes load; forwards faults."""

    def __init__(self, controller: Any, handle: PlacementHandle, router_id: str | None = None,
                 controller_name: tuple[str, str] | None = None) -> None:  # fmt: skip
        self.controller, self.handle = controller, handle
        self.router_id = router_id or f"router-{uuid.uuid4().hex[:8]}"
        self.controller_name = controller_name  # (name, namespace): look it up again if lost
        self.counting: CountingExpertBackend | None = None
        self._faults_sent: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-watcher", daemon=True)
        self.swaps = 0

    def start(self) -> PoolWatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def on_fault(self, shard_id: str, reason: str) -> None:
        """The router's fault callback: never blocks (runs on the router's event loop)."""
        now = time.monotonic()
        with self._lock:
            if now - self._faults_sent.get(shard_id, -1e9) < FAULT_REPORT_EVERY_S:
                return
            self._faults_sent[shard_id] = now
        try:
            self.controller.report_fault.remote(self.router_id, shard_id, reason)
        except Exception as exc:  # the controller is being replaced; the watcher reconnects
            log.warning("could not report a fault of %s to the pool controller: %s", shard_id, exc)

    def sync_once(self, wait_s: float = 0.0) -> bool:
        """One sync; True if a newer table was installed."""
        load = self.counting.take().numpy() if self.counting is not None else None
        if load is not None and not load.any():
            load = None
        ref = self.controller.sync.remote(self.router_id, self.handle.version, load, wait_s)
        table = ray.get(ref, timeout=wait_s + 30.0)
        if table is None:
            return False
        try:
            self.handle.swap(table)
        except PlacementError:  # raced with a newer one
            return False
        self.swaps += 1
        log.info("router %s now on placement v%d", self.router_id, table.version)
        return True

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                swapped = self.sync_once(LONG_POLL_S)
                backoff = 0.5
                if swapped:
                    continue  # acknowledge the new version at once
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("pool controller unreachable (%s); retrying in %.1f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                self._reconnect()

    def _reconnect(self) -> None:
        if self.controller_name is None:
            return
        try:
            self.controller = ray.get_actor(self.controller_name[0],
                                            namespace=self.controller_name[1])  # fmt: skip
        except ValueError:
            pass


class PoolExpertBackend(CountingExpertBackend):
    """The dense side's expert backend on a pool: the router, counted, kept current by its
    watcher. `close()` stops the watcher and closes the router."""

    def __init__(self, router: ExpertBackend, watcher: PoolWatcher, num_layers: int,
                 num_experts: int) -> None:  # fmt: skip
        super().__init__(router, num_layers, num_experts)
        self.watcher = watcher
        watcher.counting = self

    def close(self) -> None:
        self.watcher.stop()
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> PoolExpertBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventLog:
    """Prints the pool controller's events (faults, recoveries, scaling) on this process's
    console, e.g. the terminal of `expertmesh serve` (actor logs only reach Ray's files)."""

    def __init__(self, controller: Any, seq: int = 0) -> None:
        self.controller = controller
        self.log = logging.getLogger("expertmesh.pool")
        self.log.setLevel(logging.INFO)  # recoveries too, whatever the root level says
        if not self.log.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s expert pool: %(message)s"))
            self.log.addHandler(handler)
            self.log.propagate = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-events", daemon=True)
        self.seq = seq  # events up to this one were seen already

    def start(self) -> EventLog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                events = ray.get(self.controller.events_since.remote(self.seq, 2.0), timeout=30)
            except Exception:  # the pool is shutting down or restarting
                if self._stop.wait(1.0):
                    return
                continue
            for e in events:
                self.seq = max(self.seq, e["seq"])
                self.log.log(e.get("level", logging.INFO), "%s: %s", e["kind"], e["message"])
