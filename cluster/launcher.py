"""Launch and tear down the distributed parts on Ray: expert shards, their placement
controller, and dense workers. Joins an existing Ray cluster when given an address and
starts a local one otherwise. Every actor is named (`expert-shard-{i}`, `dense-worker-{i}`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ClusterConfig
from cluster.controllers import NAMESPACE, PLACEMENT_CONTROLLER, PlacementController
from router.placement import PlacementHandle, PlacementTable
from workers.config import ModelConfig

log = logging.getLogger(__name__)

STRATEGIES = {"spread": "SPREAD", "strict_spread": "STRICT_SPREAD", "pack": "PACK"}
READY_TIMEOUT_S = 600.0


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


def _bundle(num_cpus: float, num_gpus: float) -> dict[str, float]:
    bundle = {"CPU": num_cpus}
    if num_gpus:
        bundle["GPU"] = num_gpus
    return bundle


@dataclass
class ExpertPool:
    """The running expert shards of one model, and their placement controller."""

    table: PlacementTable
    shards: list[Any]  # actor handles
    infos: list[dict[str, Any]]
    controller: Any
    pg: Any
    config: ClusterConfig

    @classmethod
    def start(
        cls,
        model_dir: str,
        config: ClusterConfig,
        schedule_timeout_s: float = 60.0,
        on_shard_ready: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> ExpertPool:
        """`on_shard_ready(index, ready() info)` is called as each shard has loaded (progress)."""
        from workers.expert_shard import ExpertShardActor

        e = config.experts
        model = ModelConfig.from_hf(model_dir)
        table = PlacementTable.contiguous(model.num_hidden_layers, model.num_experts, e.shards)
        bundles = [_bundle(e.num_cpus, e.num_gpus)] * e.shards
        pg = placement_group(bundles, strategy=STRATEGIES[e.placement], name="expertmesh-experts")
        try:
            ray.get(pg.ready(), timeout=schedule_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            remove_placement_group(pg)
            raise LaunchError(
                f"placement group for {e.shards} expert shards ({e.placement}) could not be "
                f"scheduled: STRICT_SPREAD needs one node per shard; cluster has "
                f"{len([n for n in ray.nodes() if n['Alive']])} nodes"
            ) from exc
        actor_cls = ray.remote(ExpertShardActor)
        shards = [
            actor_cls.options(
                name=f"expert-shard-{i}", namespace=NAMESPACE, num_cpus=e.num_cpus,
                num_gpus=e.num_gpus, max_concurrency=64,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i),
            ).remote(model_dir, spec.shard_id, spec.assignment(), config.dtype,
                     max_message_mb=e.max_message_mb, torch_threads=max(1, int(e.num_cpus)),
                     expert_dtype=e.dtype, token=e.cluster_token(), tls=e.tls_files(),
                     host=e.bind_host)
            for i, spec in enumerate(table.shards)
        ]  # fmt: skip
        try:
            infos = _wait_ready(shards, on_shard_ready)
        except Exception as exc:
            _kill(shards)
            remove_placement_group(pg)
            raise LaunchError(f"expert shards failed to start: {exc}") from exc
        table = table.with_addresses({info["shard_id"]: info["address"] for info in infos})
        controller = (
            ray.remote(PlacementController)
            .options(name=PLACEMENT_CONTROLLER, namespace=NAMESPACE, num_cpus=0)
            .remote(table, infos)
        )
        log.info("expert pool up: %d shards at %s", e.shards, [i["address"] for i in infos])
        return cls(table, shards, infos, controller, pg, config)

    def shutdown(self) -> None:
        for s in self.shards:
            try:
                ray.get(s.shutdown.remote(), timeout=10)
            except Exception:  # already gone
                pass
        _kill([*self.shards, self.controller])
        remove_placement_group(self.pg)


def _wait_ready(
    shards: list[Any], on_ready: Callable[[int, dict[str, Any]], None] | None
) -> list[dict[str, Any]]:
    """Every shard's ready() info, in shard order; `on_ready` hears of each as it comes."""
    refs = [s.ready.remote() for s in shards]
    index = {ref: i for i, ref in enumerate(refs)}
    pending, deadline = list(refs), time.monotonic() + READY_TIMEOUT_S
    while pending:
        done, pending = ray.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise ray.exceptions.GetTimeoutError(f"shards not ready after {READY_TIMEOUT_S} s")
        if on_ready is not None:
            on_ready(index[done[0]], ray.get(done[0]))
    return ray.get(refs)


def _kill(actors: list[Any]) -> None:
    for a in actors:
        try:
            ray.kill(a)
        except Exception:
            pass


def connect_expert_backend(config: ClusterConfig):
    """Inside a dense worker: a RemoteExpertBackend to the running pool (None = local experts)."""
    if config.experts.shards == 0:
        return None
    from router.client import RemoteExpertBackend

    try:
        controller = ray.get_actor(PLACEMENT_CONTROLLER, namespace=NAMESPACE)
    except ValueError as exc:
        raise LaunchError("no expert pool is running (start one with ExpertPool.start)") from exc
    table = ray.get(controller.get.remote())
    e = config.experts
    return RemoteExpertBackend(
        PlacementHandle(table), timeout_s=e.rpc_timeout_s,
        recovery_timeout_s=e.recovery_timeout_s, hedge_after_s=e.hedge_after_s,
        token=e.cluster_token(), tls_ca=e.tls.ca, tls_server_name=e.tls.server_name,
        max_message_mb=e.max_message_mb,
    )  # fmt: skip


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
