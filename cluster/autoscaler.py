"""When to add or retire an expert shard, from how busy the shards are.

The signal is each shard's busy fraction (its compute thread's busy time over the load window,
0..1). The pool wants `ceil(sum(busy) / target_load)` shards, clipped to
[min_shards, max_shards]; like Ray Serve's autoscaler, a wish must hold for `upscale_delay_s`
(`downscale_delay_s`) before the pool changes, one shard at a time.

Scale-out is bounded by what the hardware can give: a new shard only adds compute where some
node has idle cores for its compute threads (measured, not Ray's logical CPUs, which are often
over-committed on one small machine). Where no node has them and no Ray autoscaler can add a
node (`add_nodes`), the decision is "blocked" with the numbers that say why; the pool stays
as it is rather than run away to `max_shards`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

IDLE_PER_THREAD = 0.5  # idle cores a node needs per compute thread of a new shard


@dataclass(frozen=True)
class ShardAutoscalingConfig:
    """Cluster YAML `experts.autoscaling` (`experts.shards` is the starting size)."""

    enabled: bool = False
    min_shards: int = 1
    max_shards: int = 8
    target_load: float = 0.6  # wanted busy fraction per shard (0..1)
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0
    # the Ray cluster has an autoscaler (e.g. KubeRay enableInTreeAutoscaling): when no node
    # has idle cores, a new shard is still requested and Ray brings up a node for it
    add_nodes: bool = False


@dataclass(frozen=True)
class NodeRoom:
    """What one Ray node can give a new shard."""

    node_id: str
    cores: float  # cores this node's processes may run on
    busy_cores: float  # measured: CPU utilisation x cores
    free_cpus: float  # Ray's logical CPUs not yet reserved
    shards: int  # expert shards of this pool on the node

    @property
    def idle_cores(self) -> float:
        return max(0.0, self.cores - self.busy_cores)


@dataclass(frozen=True)
class Decision:
    action: str  # "up" | "down" | "hold" | "blocked"
    shards: int  # the pool size this decision aims at
    reason: str
    node_id: str | None = None  # "up": the node with room (None: let Ray place it)


def find_room(
    nodes: Sequence[NodeRoom], shard_cpus: float, threads: int, add_nodes: bool
) -> tuple[str | None, bool, str]:
    """(node id or None, possible, why). A node qualifies with `shard_cpus` logical CPUs free
    and idle cores for the shard's threads; among those the one with the fewest shards."""
    need_idle = IDLE_PER_THREAD * max(1, threads)
    fits = [n for n in nodes if n.free_cpus >= shard_cpus and n.idle_cores >= need_idle]
    if fits:
        best = min(fits, key=lambda n: (n.shards, -n.idle_cores))
        return best.node_id, True, f"node {best.node_id[:12]} has {best.idle_cores:.1f} idle cores"
    busy = ", ".join(
        f"{n.node_id[:12]}: {n.busy_cores:.1f} of {n.cores:.0f} cores busy, "
        f"{n.free_cpus:g} Ray CPUs free" for n in nodes
    )  # fmt: skip
    if add_nodes:
        return None, True, f"no node has room ({busy}); asking Ray's autoscaler for a node"
    return (
        None,
        False,
        (
            f"a new shard would only share busy cores (needs {need_idle:.1f} idle cores and "
            f"{shard_cpus:g} Ray CPUs; {busy}) and no Ray autoscaler adds nodes "
            f"(experts.autoscaling.add_nodes: false)"
        ),
    )


class ShardAutoscaler:
    """Stateful decisions: call `decide` every tick with the current busy fractions."""

    def __init__(self, config: ShardAutoscalingConfig) -> None:
        self.config = config
        self._want_up_since: float | None = None
        self._want_down_since: float | None = None

    def desired(self, busy: Mapping[str, float], current: int) -> int:
        c = self.config
        if not busy:
            return max(c.min_shards, min(c.max_shards, current))
        want = math.ceil(sum(busy.values()) / c.target_load - 1e-9)
        return max(c.min_shards, min(c.max_shards, want))

    def decide(
        self, busy: Mapping[str, float], current: int, nodes: Sequence[NodeRoom] = (),
        shard_cpus: float = 1.0, threads: int = 1, now: float | None = None,
    ) -> Decision:  # fmt: skip
        """What to do now with `current` live shards whose busy fractions are `busy`."""
        now = time.monotonic() if now is None else now
        c = self.config
        if not c.enabled:
            return Decision("hold", current, "autoscaling is off")
        want = self.desired(busy, current)
        total = sum(busy.values())
        load = (
            f"busy {total:.2f} shard-equivalents over {current} shards (target {c.target_load:.3g})"
        )
        if current < c.min_shards:
            want = c.min_shards  # below the floor (e.g. after a loss): no delay
            self._want_up_since = now - c.upscale_delay_s
        if want > current:
            self._want_down_since = None
            self._want_up_since = self._want_up_since if self._want_up_since is not None else now
            waited = now - self._want_up_since
            if waited < c.upscale_delay_s:
                return Decision("hold", want, f"{load}: wants {want}, waiting {waited:.0f}s")
            node, possible, why = find_room(nodes, shard_cpus, threads, c.add_nodes)
            if not possible:
                return Decision("blocked", current, f"{load}: wants {want}, but {why}")
            self._want_up_since = None
            return Decision("up", current + 1, f"{load}: {why}", node)
        if want < current:
            self._want_up_since = None
            since = self._want_down_since
            self._want_down_since = since = now if since is None else since
            if now - since < c.downscale_delay_s:
                return Decision("hold", want, f"{load}: wants {want}, waiting {now - since:.0f}s")
            self._want_down_since = None
            return Decision("down", current - 1, load)
        self._want_up_since = self._want_down_since = None
        return Decision("hold", current, load)
