"""Starting expert-shard actors through Ray, and what each node can give a new one.

The first shards of a pool share one placement group (the `experts.placement` strategy spreads
or packs them). A shard added later reuses a bundle a retired or dead shard left behind (Ray
moves a dead node's bundles to a node with room), or else asks Ray for its resources directly:
on a node with idle cores when one exists, otherwise wherever Ray finds room, which on a cluster
with an autoscaler (KubeRay) brings up a node. Every shard asks for `experts.num_cpus`,
`num_gpus` and the custom `experts.resources` (e.g. `expert_shard: 1` to keep shards on their
own worker group).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from cluster.autoscaler import NodeRoom
from cluster.config import ClusterConfig

log = logging.getLogger(__name__)
NAMESPACE = "expertmesh"
STRATEGIES = {"spread": "SPREAD", "strict_spread": "STRICT_SPREAD", "pack": "PACK"}
NODE_PROBE_S = 0.5  # CPU utilisation sample per node


@dataclass(frozen=True)
class Bundle:
    """One reserved slot of a placement group."""

    pg: PlacementGroup
    index: int


def shard_bundle(config: ClusterConfig) -> dict[str, float]:
    e = config.experts
    bundle = {"CPU": e.num_cpus, **e.resources}
    if e.num_gpus:
        bundle["GPU"] = e.num_gpus
    return bundle


def shard_threads(config: ClusterConfig) -> int:
    return max(1, int(config.experts.num_cpus))


def gang_placement_group(config: ClusterConfig, count: int) -> PlacementGroup:
    """The placement group of a pool's first `count` shards (not waited for)."""
    bundles = [shard_bundle(config)] * count
    return placement_group(
        bundles, strategy=STRATEGIES[config.experts.placement], name="expertmesh-experts"
    )


def remove_pg(pg: PlacementGroup) -> None:
    try:
        remove_placement_group(pg)
    except Exception as exc:  # the cluster is going away
        log.info("placement group not removed: %s", exc)


def start_shard(
    model_dir: str,
    config: ClusterConfig,
    shard_id: str,
    assignment: Mapping[int, Sequence[int]],
    *,
    bundle: Bundle | None = None,
    node_id: str | None = None,
) -> Any:
    """Create the actor (returns its handle at once; `ready()` says when it serves)."""
    from workers.expert_shard import ExpertShardActor

    e = config.experts
    if bundle is not None:
        strategy: Any = PlacementGroupSchedulingStrategy(bundle.pg, bundle.index)
    elif node_id is not None:  # soft: if that node is gone, anywhere with room
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=True)
    else:
        strategy = "SPREAD" if e.placement != "pack" else "DEFAULT"
    options: dict[str, Any] = dict(
        name=f"expert-{shard_id}", namespace=NAMESPACE, num_cpus=e.num_cpus,
        num_gpus=e.num_gpus, max_concurrency=64, max_restarts=e.max_restarts,
        max_task_retries=0, scheduling_strategy=strategy,
    )  # fmt: skip
    if e.resources and bundle is None:
        options["resources"] = dict(e.resources)
    layers = {int(k): [int(x) for x in v] for k, v in assignment.items()}
    return (
        ray.remote(ExpertShardActor)
        .options(**options)
        .remote(model_dir, shard_id, layers, config.dtype, **shard_kwargs(config))
    )


def shard_kwargs(config: ClusterConfig) -> dict[str, Any]:
    """The shard constructor's keyword arguments from the config (storage, RPC security)."""
    e = config.experts
    return dict(
        max_message_mb=e.max_message_mb, torch_threads=shard_threads(config),
        token=e.cluster_token(), tls=e.tls_files(), host=e.bind_host, expert_dtype=e.dtype,
    )  # fmt: skip


def choose_node(
    config: ClusterConfig, shards_per_node: Mapping[str, int], exclude: Collection[str] = ()
) -> str | None:
    """An alive node with Ray resources free for one more shard: the one with the fewest of
    this pool's shards ("spread" / "strict_spread"; a node without one first) or the most
    ("pack"), never one in `exclude` (a node suspected dead that Ray still lists alive). None
    when no node has room (Ray then queues the shard: an autoscaler may add a node for it)."""
    from ray._private.state import available_resources_per_node  # DeveloperAPI

    need = shard_bundle(config)
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")} - set(exclude)
    free = available_resources_per_node()
    fits = [n for n in alive if all(free.get(n, {}).get(k, 0.0) >= v for k, v in need.items())]
    if not fits:
        return None
    pack = config.experts.placement == "pack"
    return min(fits, key=lambda n: (-1 if pack else 1) * shards_per_node.get(n, 0))


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


# ------------------------------------------------------------------------------- node room
def busy_fraction(interval_s: float = NODE_PROBE_S) -> float:
    """Fraction of the machine's CPU time spent busy over `interval_s` (/proc/stat; else the
    1-minute load average over the core count)."""
    import time

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = sample()
    if first is None:
        return min(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    time.sleep(interval_s)
    second = sample() or first
    total, idle = second[0] - first[0], second[1] - first[1]
    return 1.0 - idle / total if total > 0 else 0.0


@ray.remote(num_cpus=0)
def _measure_node() -> tuple[str, float, float]:
    """(node id, cores this process may use, cores busy) on the node it runs on."""
    affinity = getattr(os, "sched_getaffinity", None)
    cores = float(len(affinity(0)) if affinity else os.cpu_count() or 1)
    busy = busy_fraction() * (os.cpu_count() or cores)
    return ray.get_runtime_context().get_node_id(), cores, min(cores, busy)


async def node_rooms(shards_per_node: Mapping[str, int], timeout_s: float = 10.0) -> list[NodeRoom]:
    """Measure every alive node: cores, busy cores, free Ray CPUs, this pool's shards."""
    from ray._private.state import available_resources_per_node  # DeveloperAPI

    alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    free = available_resources_per_node()
    refs = [
        _measure_node.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)
        ).remote()
        for n in alive
    ]
    rooms = []
    for node, ref in zip(alive, refs, strict=True):
        try:
            _, cores, busy = await _wait(ref, timeout_s)
        except Exception as exc:  # a node that cannot run a probe has no room to give
            log.warning("node %s did not answer a resource probe: %s", node[:12], exc)
            continue
        rooms.append(NodeRoom(node, cores, busy, free.get(node, {}).get("CPU", 0.0),
                              shards_per_node.get(node, 0)))  # fmt: skip
    return rooms


async def _wait(ref: Any, timeout_s: float) -> Any:
    import asyncio

    return await asyncio.wait_for(ref, timeout_s)
