"""RemoteExpertBackend: the ExpertBackend seam over gRPC expert shards, surviving shard faults.

`submit` (called from the synchronous model code) takes one snapshot of the placement table,
plans the step's (token, expert) pairs onto live shards (router.planner), sends each shard ONE
call holding its tokens' hidden rows once, and returns a handle at once. The calls run on the
backend's own asyncio loop (a daemon thread); `handle.result()` waits and returns [T, H]: every
pair's weighted expert output, added exactly once in fp64, rounded once.

A shard fault (router.faults) never fails the step: only the failed call's pairs are planned
again, on the newest table without the shards this router saw fail (`Exclusions`); with no
live replica left, the pairs wait, bounded by `recovery_timeout_s`, for a newer table or for
the excluded shard to answer a probe. A call slower than `hedge_after_s` is also sent to
replicas and the first complete answer wins; the loser is cancelled, so its late reply is
dropped. `on_fault(shard_id, reason)` tells the cluster layer; the router itself never declares
a shard dead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc
import torch

from router import planner, wire
from router.channels import ShardChannels
from router.faults import Exclusions, ExpertRPCError, ExpertsUnavailableError, ShardFault, classify
from router.metrics import ClientMetrics
from router.placement import PlacementHandle, PlacementTable, ShardSpec
from router.planner import Step
from router.recovery import Recovery
from workers.experts import DoneHandle, UnknownExpertError

__all__ = ["ExpertRPCError", "ExpertsUnavailableError", "RemoteExpertBackend", "RemoteHandle"]
log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 2.0


class RemoteHandle:
    """Result of one submit: `result()` blocks until every pair is merged."""

    def __init__(self, future: concurrent.futures.Future, layer: int) -> None:
        self._future, self._layer = future, layer
        self._value: torch.Tensor | None = None

    def result(self, timeout: float | None = None) -> torch.Tensor:
        if self._value is None:
            try:
                self._value = self._future.result(timeout)
            except concurrent.futures.TimeoutError:
                raise TimeoutError(f"layer {self._layer}: shards did not answer in time") from None
        return self._value


class RemoteExpertBackend:
    """ExpertBackend that ships each layer-step's routed work to the shards in `placement`."""

    def __init__(
        self,
        placement: PlacementHandle | PlacementTable,
        *,
        timeout_s: float = 30.0,
        recovery_timeout_s: float = 60.0,
        hedge_after_s: float | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_server_name: str | None = None,
        on_fault: Callable[[str, str], None] | None = None,
        max_message_mb: float = 256.0,
        probe_interval_s: float = 0.5,
        local_sockets: bool = True,
    ) -> None:
        if isinstance(placement, PlacementTable):
            placement = PlacementHandle(placement)
        self.placement = placement
        self.timeout_s, self.recovery_timeout_s = timeout_s, recovery_timeout_s
        self.hedge_after_s = hedge_after_s or None  # 0 / None: no hedging
        self.probe_interval_s = probe_interval_s
        self.on_fault = on_fault
        self._channels = ShardChannels(
            max_message_mb, token, tls_ca, tls_server_name, local_sockets
        )
        self._exclusions = Exclusions()
        self._steps, self._turn = itertools.count(), itertools.count()
        self._metrics = ClientMetrics()
        self._recovery = Recovery(
            self.placement, self._exclusions, self._channels, self._metrics,
            recovery_timeout_s, probe_interval_s, min(timeout_s, PROBE_TIMEOUT_S),
        )  # fmt: skip
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rpc", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def submit(
        self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> RemoteHandle | DoneHandle:
        """Start layer `layer`'s routed work: hidden [T, H], ids [T, K] global, weights [T, K].
        The tensors must stay unchanged until `result()` (a re-plan reads them again)."""
        if self._closed:
            raise RuntimeError("RemoteExpertBackend is closed")
        start = time.perf_counter()
        table = self.placement.snapshot()
        ids = ids.long()
        pairs = (ids.reshape(-1) >= 0).nonzero().squeeze(1)
        if pairs.numel() == 0:
            self._metrics.record_step(layer, 0, int(hidden.shape[0]))
            return DoneHandle(torch.zeros_like(hidden))
        if not 0 <= layer < table.num_layers:
            raise UnknownExpertError(f"layer {layer} is not in the placement table")
        if int(ids.max()) >= table.num_experts:
            raise UnknownExpertError(f"expert {int(ids.max())} is not in the placement table")
        weights = weights.float()
        wire.check_step(hidden, weights)
        step = Step(layer, hidden, ids, weights, f"{next(self._steps)}:{layer}")
        shard_of = self._assign(table, step, pairs)
        covered = shard_of >= 0
        calls = self._build(table, step, pairs[covered], shard_of[covered])
        self._metrics.record_step(layer, len(calls), int(hidden.shape[0]))
        coro = self._run(step, table, calls, pairs[~covered])
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        self._metrics.add("dispatch_s", time.perf_counter() - start)
        return RemoteHandle(future, layer)

    def metrics(self) -> dict[str, Any]:
        out = self._metrics.snapshot()
        out["excluded_shards"] = sorted(self._exclusions.snapshot())
        out["placement_version"] = self.placement.version
        kinds = list(self._channels.transports().values())
        out["channels_unix"], out["channels_tcp"] = kinds.count("unix"), kinds.count("tcp")
        return out

    def reset_metrics(self) -> None:
        self._metrics.reset()

    def shard_info(self) -> list[wire.ShardInfo]:
        """Info from every shard of the current table; ExpertRPCError if a ready shard's
        holdings differ from the table's."""
        table = self.placement.snapshot()
        coro = asyncio.wait_for(self._info_all(table), self.timeout_s)
        infos = asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        for spec, info in zip(table.shards, infos, strict=True):
            held = {layer: list(ids) for layer, ids in info.experts.items()}
            if info.ready and held != spec.assignment():
                raise ExpertRPCError(spec.shard_id, spec.address, -1, "PLACEMENT_MISMATCH",
                                     "shard holdings differ from the placement table")  # fmt: skip
        return infos

    def close(self) -> None:
        """Close every channel and stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._channels.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> RemoteExpertBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ planning
    def _assign(self, table: PlacementTable, step: Step, pairs: torch.Tensor) -> torch.Tensor:
        excluded = self._exclusions.indices(table)
        experts = step.ids.reshape(-1)[pairs]
        return planner.assign(table, step.layer, experts, excluded, next(self._turn))

    def _build(self, table, step: Step, pairs, shard_of, tag: str = "") -> list[planner.Call]:
        return planner.build_calls(table, step.layer, step.hidden, step.ids, step.weights,
                                   pairs, shard_of, step.request_id + tag)  # fmt: skip

    # ------------------------------------------------------------------ serving (loop thread)
    async def _run(self, step, table, calls, uncovered) -> torch.Tensor:
        # made here, not in the caller's thread: a tensor born under the model's
        # torch.inference_mode could not be updated in place on this thread
        step.out = torch.zeros(step.hidden.shape, dtype=torch.float64)
        jobs = [self._serve_call(step, call) for call in calls]
        if uncovered.numel():
            jobs.append(self._wait_then_serve(step, uncovered, table))
        try:
            await _gather_all(jobs)
        except BaseException:
            self._metrics.add("errors")
            raise
        if step.deadline is not None:
            self._metrics.add("recovered")
            self._metrics.add("wait_s", time.monotonic() - step.wait_start)
        return step.out.to(step.hidden.dtype)

    async def _serve(self, step: Step, pairs: torch.Tensor) -> None:
        """Compute every pair in `pairs` exactly once, on the newest table."""
        table = self.placement.snapshot()
        shard_of = self._assign(table, step, pairs)
        covered = shard_of >= 0
        jobs = [self._serve_call(step, c) for c in self._build(
            table, step, pairs[covered], shard_of[covered], f":r{next(self._turn)}")]  # fmt: skip
        if not bool(covered.all()):
            jobs.append(self._wait_then_serve(step, pairs[~covered], table))
        await _gather_all(jobs)

    async def _wait_then_serve(self, step: Step, pairs: torch.Tensor, table) -> None:
        await self._recovery.await_cover(step, pairs, table)
        await self._serve(step, pairs)

    async def _serve_call(self, step: Step, call: planner.Call) -> None:
        if not await self._attempt(step, call):
            self._metrics.add("replans")
            await self._serve(step, call.pairs)

    async def _attempt(self, step: Step, call: planner.Call) -> bool:
        """Run `call` (hedged when slow); merge the first complete answer. False: every try
        was a shard fault (already recorded)."""
        if self.hedge_after_s is None:  # the common path: no racing tasks
            try:
                part = await self._call(step, call)
            except ShardFault:
                return False
            self._merge(step, (call,), (part,))
            return True
        primary = asyncio.ensure_future(self._call_all(step, [call]))
        racers = {primary: [call]}
        try:
            if self.hedge_after_s is not None:
                done, _ = await asyncio.wait({primary}, timeout=self.hedge_after_s)
                hedge = None if done else self._plan_hedge(step, call)
                if hedge:
                    self._metrics.add("hedges")
                    racers[asyncio.ensure_future(self._call_all(step, hedge))] = hedge
            pending = set(racers)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    error = task.exception()
                    if error is None:
                        self._merge(step, racers[task], task.result())
                        self._metrics.add("hedge_wins", int(task is not primary))
                        return True
                    if not isinstance(error, ShardFault):
                        raise error
            return False
        finally:
            for task in racers:
                task.cancel()

    def _plan_hedge(self, step: Step, call: planner.Call) -> list[planner.Call] | None:
        table = self.placement.snapshot()
        excluded = set(self._exclusions.indices(table))
        if call.shard_id in table.shard_ids:
            excluded.add(table.index(call.shard_id))
        experts = step.ids.reshape(-1)[call.pairs]
        shard_of = planner.assign(table, step.layer, experts, excluded, next(self._turn))
        if not bool((shard_of >= 0).all()):
            return None
        return self._build(table, step, call.pairs, shard_of, f":h{next(self._turn)}")

    def _merge(self, step: Step, calls: Sequence[planner.Call], parts) -> None:
        start = time.perf_counter()
        for call, part in zip(calls, parts, strict=True):
            if len(call.tokens) == len(step.out):  # every token (tokens are ascending)
                step.out.add_(part)
            else:
                step.out.index_add_(0, call.tokens, part.double())
        self._metrics.add("combine_s", time.perf_counter() - start)

    async def _call_all(self, step: Step, calls: Sequence[planner.Call]) -> list[torch.Tensor]:
        return await _gather_all([self._call(step, c) for c in calls])

    async def _call(self, step: Step, call: planner.Call) -> torch.Tensor:
        """One Compute; returns the validated partial [T_s, H]; raises ShardFault (recorded)
        or ExpertRPCError."""
        start = time.perf_counter()
        sent = call.message.ByteSize()
        rows = len(call.tokens)
        try:
            if not call.address:
                raise self._fault(call, ShardFault(call.shard_id, "NO_ADDRESS: not started"))
            reply = await self._channels.compute(call.address, call.message, self.timeout_s)
        except grpc.aio.AioRpcError as e:
            self._metrics.record_call(call.shard_id, step.layer, rows, sent, 0,
                                      time.perf_counter() - start)  # fmt: skip
            outcome = classify(e, call.shard_id, call.address, step.layer)
            if isinstance(outcome, ShardFault):
                raise self._fault(call, outcome) from None
            log.error("expert shard %s at %s: %s", call.shard_id, call.address, e.details())
            raise outcome from None
        self._metrics.record_call(call.shard_id, step.layer, rows, sent, reply.ByteSize(),
                                  time.perf_counter() - start)  # fmt: skip
        try:
            resp = wire.decode_response(reply, (rows, step.hidden.shape[1]), step.hidden.dtype)
            if (resp.shard_id, resp.request_id) != (call.shard_id, call.message.request_id):
                raise wire.WireError(
                    f"answer is for shard {resp.shard_id!r} request {resp.request_id!r}"
                )
        except wire.WireError as e:
            raise self._fault(call, ShardFault(call.shard_id, f"BAD_RESPONSE: {e}")) from None
        return resp.output

    def _fault(self, call: planner.Call, fault: ShardFault) -> ShardFault:
        """Record a fault: exclude the shard, tell on_fault, drop a broken channel."""
        self._metrics.record_fault(fault.shard_id)
        version = max(int(call.message.placement_version), self.placement.version)
        self._exclusions.add(fault.shard_id, version, fault.reason)
        log.warning("expert shard %s at %s failed (%s); re-planning its work",
                    fault.shard_id, call.address, fault.reason)  # fmt: skip
        if fault.connection:
            self._channels.drop(call.address)
        if self.on_fault is not None:
            try:
                self.on_fault(fault.shard_id, fault.reason)
            except Exception:  # the callback must not break the data plane
                log.exception("on_fault callback failed for shard %s", fault.shard_id)
        return fault

    async def _info_all(self, table: PlacementTable) -> list[wire.ShardInfo]:
        async def one(spec: ShardSpec) -> wire.ShardInfo:
            try:
                return await self._channels.info(spec.address, self.timeout_s)
            except grpc.aio.AioRpcError as e:
                raise ExpertRPCError(spec.shard_id, spec.address, -1, e.code().name,
                                     e.details() or "") from None  # fmt: skip

        return list(await asyncio.gather(*(one(spec) for spec in table.shards)))


async def _gather_all(coros: Sequence[Coroutine[Any, Any, Any]]) -> list[Any]:
    """gather; on the first error cancel the rest, let them unwind, and raise that error."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
