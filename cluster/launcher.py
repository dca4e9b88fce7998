"""Launch and tear down the distributed parts on Ray: the expert pool (its controller, which
starts and owns the shards) and dense workers. Joins an existing Ray cluster when given an
address and starts a local one otherwise. Every actor is named (`expertmesh-placement`,
`expert-shard-{n}`, `dense-worker-{i}`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from cluster.config import ClusterConfig
from cluster.controllers import NAMESPACE, PLACEMENT_CONTROLLER
from cluster.pool_client import EventLog
from router.placement import PlacementHandle, PlacementTable

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 600.0
HEAD_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node


class LaunchError(RuntimeError):
    """The cluster could not be brought up; the message says which part and why."""


def init_ray(address: str | None, min_cpus: float = 0.0) -> None:
    """Connect to `address`, or start a local Ray with at least `min_cpus` logical CPUs."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        return
    cpus = max(os.cpu_count() or 1, int(min_cpus + 0.999))
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=cpus, namespace=NAMESPACE, include_dashboard=False,
                     log_to_driver=False)  # fmt: skip
            return
        except Exception as exc:  # Ray raises a bare Exception when its raylet never registers
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            log.warning("local Ray did not start (%s); retrying once", exc)
            ray.shutdown()


@dataclass
class ExpertPool:
    """A running expert pool: its controller actor (which owns the shard actors) and the
    placement it started with. Live changes go through `controller` (cluster/controllers.py)."""

    controller: Any
    table: PlacementTable  # the first published table (the controller has the current one)
    infos: list[dict[str, Any]]  # ready() of each first shard: shard_id, address, node_id
    config: ClusterConfig
    events: EventLog | None = None  # prints the pool's events on this process's console

    @classmethod
    def start(
        cls,
        model_dir: str,
        config: ClusterConfig,
        schedule_timeout_s: float = 60.0,
        on_shard_ready: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> ExpertPool:
        """Start the controller, which starts the shards. `on_shard_ready(index, ready() info)`
        is called as each first shard has loaded (progress)."""
        from cluster.controllers import PoolController

        # the token as this process sees it (EXPERTMESH_CLUSTER_TOKEN may be set only here)
        token = config.experts.cluster_token()
        config = dataclasses.replace(
            config, experts=dataclasses.replace(config.experts, token=token)
        )
        # on the head node: a worker node lost with shards must not take the controller along
        controller = (
            ray.remote(PoolController)
            .options(
                name=PLACEMENT_CONTROLLER,
                namespace=NAMESPACE,
                num_cpus=0,
                max_concurrency=1000,
                resources={HEAD_RESOURCE: 0.001},
            )  # fmt: skip
            .remote(model_dir, config)
        )
        try:
            started, seq = _wait_started(controller, schedule_timeout_s, on_shard_ready)
        except Exception as exc:
            _kill([controller])
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
            raise LaunchError(str(cause)) from None
        infos = started["infos"]
        log.info("expert pool up: %d shards %s", len(infos), [i["shard_id"] for i in infos])
        pool = cls(controller, started["table"], infos, config)
        pool.events = EventLog(controller, seq).start()
        return pool

    @property
    def shards(self) -> list[Any]:
        """Actor handles of the shards running now (table order)."""
        return list(self.shard_handles().values())

    def shard_handles(self) -> dict[str, Any]:
        """{shard_id: actor handle} of the shards running now."""
        return ray.get(self.controller.shard_handles.remote())

    def shutdown(self) -> None:
        if self.events is not None:
            self.events.stop()
        try:
            ray.get(self.controller.shutdown.remote(), timeout=60)
        except Exception as exc:  # the controller is gone: its shards went with it
            log.info("pool controller did not shut down cleanly: %s", exc)
        _kill([self.controller])


def _wait_started(controller: Any, schedule_timeout_s: float, on_ready) -> tuple[dict, int]:
    """controller.start()'s result and the last event number seen; `on_ready` hears of each
    shard_ready event while the shards load."""
    ref = controller.start.remote(schedule_timeout_s)
    deadline, seq = time.monotonic() + READY_TIMEOUT_S, 0
    while True:
        done, _ = ray.wait([ref], timeout=0.5)
        for event in ray.get(controller.events_since.remote(seq), timeout=30):
            seq = max(seq, event["seq"])
            if event["kind"] == "shard_ready" and on_ready is not None:
                on_ready(event["index"], event["info"])
        if done:
            return ray.get(ref), seq
        if time.monotonic() > deadline:
            raise TimeoutError(f"the expert pool did not start in {READY_TIMEOUT_S:.0f} s")


def _kill(actors: list[Any]) -> None:
    for a in actors:
        try:
            ray.kill(a)
        except Exception:
            pass


def connect_expert_backend(config: ClusterConfig, router_id: str | None = None):
    """Inside a dense worker: the backend its model uses (None = local experts).

    A RemoteExpertBackend to the running pool, wrapped in the counting wrapper, and a watcher
    thread that keeps the router on the controller's newest table, acknowledges versions,
    pushes the routed load and forwards shard faults (cluster/pool_client.py)."""
    if config.experts.shards == 0:
        return None
    from cluster.pool_client import PoolExpertBackend, PoolWatcher
    from router.client import RemoteExpertBackend

    try:
        controller = ray.get_actor(PLACEMENT_CONTROLLER, namespace=NAMESPACE)
    except ValueError as exc:
        raise LaunchError("no expert pool is running (start one with ExpertPool.start)") from exc
    table = ray.get(controller.get.remote())
    handle = PlacementHandle(table)
    watcher = PoolWatcher(controller, handle, router_id, (PLACEMENT_CONTROLLER, NAMESPACE))
    e = config.experts
    router = RemoteExpertBackend(
        handle, timeout_s=e.rpc_timeout_s,
        recovery_timeout_s=e.recovery_timeout_s, hedge_after_s=e.hedge_after_s,
        token=e.cluster_token(), tls_ca=e.tls.ca, tls_server_name=e.tls.server_name,
        max_message_mb=e.max_message_mb, on_fault=watcher.on_fault,
    )  # fmt: skip
    backend = PoolExpertBackend(router, watcher, table.num_layers, table.num_experts)
    watcher.start()
    return backend


class _RemoteDenseWorker:
    """A DenseWorker whose experts are the pool's shards (built inside the actor)."""

    def __init__(self, model_dir: str, config: ClusterConfig) -> None:
        from workers.dense_worker import DenseWorker
        from workers.resources import pin_torch_threads

        pin_torch_threads()
        self.worker = DenseWorker(
            model_dir,
            config.dtype,
            config.dense.engine_config(),
            experts=connect_expert_backend(config),
            micro_batches=config.dense.micro_batches,
            expert_dtype=config.experts.dtype,
            cache_config=config.dense.cache_config(),
        )

    def generate(self, prompts, params):
        return self.worker.generate(prompts, params)

    def router_metrics(self) -> dict:
        metrics = getattr(self.worker.experts, "metrics", None)
        return metrics() if metrics else {}


def start_dense_worker(model_dir: str, config: ClusterConfig, index: int = 0):
    return (
        ray.remote(_RemoteDenseWorker)
        .options(name=f"dense-worker-{index}", namespace=NAMESPACE, num_cpus=config.dense.num_cpus)
        .remote(model_dir, config)
    )


def generate_distributed(args, prompts, params):
    """`expertmesh generate --expert-shards N`: shards + one dense worker on Ray."""
    from cluster.cli import encode_prompts
    from workers.dense_worker import load_tokenizer

    n = len(args.prompt_ids or args.prompt)
    config = ClusterConfig.from_dict({
        "model": args.model, "dtype": args.dtype, "ray_address": args.ray_address,
        "experts": {"shards": args.expert_shards, "placement": args.placement,
                    "dtype": args.expert_dtype},
        "dense": {"max_num_seqs": max(1, n), "max_model_len": 1 << 30},
    })  # fmt: skip
    tokenizer = load_tokenizer(args.model)
    prompts = prompts or encode_prompts(tokenizer, args.prompt, args.chat, args.model)
    init_ray(config.ray_address, config.experts.shards * config.experts.num_cpus + 2)
    pool = ExpertPool.start(args.model, config)
    try:
        worker = start_dense_worker(args.model, config)
        results = ray.get(worker.generate.remote(prompts, params))
        ray.kill(worker)
        return results, tokenizer
    finally:
        pool.shutdown()
        if not config.ray_address:
            ray.shutdown()
