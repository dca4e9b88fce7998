"""What a step does when some of its pairs have no live, non-excluded holder: wait, bounded by
the recovery timeout, until the placement handle holds a newer table (the controller replaced
or re-placed the experts) or an excluded holder answers a probe (it was slow, not dead), then
re-plan. The router never declares a shard dead; that is the controller's call."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import torch

from router.channels import ShardChannels
from router.faults import Exclusions, ExpertsUnavailableError
from router.metrics import ClientMetrics
from router.placement import PlacementHandle, PlacementTable, ShardSpec
from router.planner import Step

log = logging.getLogger("router.client")


class Recovery:
    def __init__(
        self, placement: PlacementHandle, exclusions: Exclusions, channels: ShardChannels,
        metrics: ClientMetrics, recovery_timeout_s: float, probe_interval_s: float,
        probe_timeout_s: float,
    ) -> None:  # fmt: skip
        self.placement, self.exclusions, self.channels = placement, exclusions, channels
        self.metrics = metrics
        self.recovery_timeout_s, self.probe_interval_s = recovery_timeout_s, probe_interval_s
        self.probe_timeout_s = probe_timeout_s

    async def await_cover(self, step: Step, pairs: torch.Tensor, table: PlacementTable) -> None:
        """Return once a table newer than `table` is in the handle or an excluded holder of
        the pairs' experts answered a probe; ExpertsUnavailableError when the step's recovery
        time (counted from its first wait) is up."""
        now = time.monotonic()
        if step.deadline is None:
            step.deadline, step.wait_start = now + self.recovery_timeout_s, now
            self.metrics.add("waits")
        experts = torch.unique(step.ids.reshape(-1)[pairs]).tolist()
        log.warning("layer %d: no live shard holds experts %s; waiting for the pool to recover",
                    step.layer, experts[:16])  # fmt: skip
        next_probe, delay = now + min(self.probe_interval_s, 0.05), 0.005
        while self.placement.version <= table.version:
            now = time.monotonic()
            if now >= step.deadline:
                raise ExpertsUnavailableError(step.layer, experts, now - step.wait_start)
            if now >= next_probe:
                if await self.probe(table, step.layer, experts):
                    return
                next_probe = time.monotonic() + self.probe_interval_s
            await asyncio.sleep(min(delay, max(step.deadline - now, 0.0)))
            delay = min(2 * delay, 0.05)

    async def probe(self, table: PlacementTable, layer: int, experts: list[int]) -> bool:
        """Probe the excluded live holders of `experts`; un-exclude each that answers ready, as
        the shard the table names, holding the experts we need from it. True if any did."""
        probes = []
        for sid in self.exclusions.active(table):
            if sid not in table.shard_ids or not table.shard(sid).live:
                continue
            needed = {e for e in experts if table.holds(sid, layer, e)}
            if needed:
                probes.append(self._probe_one(table.shard(sid), layer, needed))
        return any(await asyncio.gather(*probes))

    async def _probe_one(self, spec: ShardSpec, layer: int, needed: set[int]) -> bool:
        self.metrics.add("probes")
        try:
            info = await self.channels.info(spec.address, self.probe_timeout_s)
        except grpc.aio.AioRpcError:
            return False
        if not (info.ready and info.shard_id == spec.shard_id):
            return False
        if not needed <= set(info.experts.get(layer, ())):
            return False
        self.exclusions.remove(spec.shard_id)
        self.metrics.add("probes_ok")
        log.info("expert shard %s answers again; back in this router's plans", spec.shard_id)
        return True
