"""Which shard holds which expert of which layer: an immutable, versioned placement table.

Placement is per (layer, expert): a shard may hold expert 17 of layer 3 and not of layer 4 (a
hot expert gets a replica in its own layer only). Shards are named by stable string ids
(`"shard-0"`, `"shard-7"`) that are never reused: a retired id stays in `retired`, so a late
reply or a stale table can never be mistaken for a new shard's.

Invariant: every (layer, expert) is held by at least one shard in any state; `uncovered()`
lists the pairs with no "up" holder (the pool is degraded until a new version fixes that).
Routers send work to `live_holders` only ("up"); a "draining" shard finishes what it has and
gets nothing new; a "down" shard is known dead and waits to be replaced.

Tables never change: every `with_*` / `without_*` returns a new table with `version + 1`.
`PlacementHandle` holds the current table: a controller `swap`s in new versions while routers
take one `snapshot()` per layer step.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

STATES = ("up", "down", "draining")
_NUMBERED = re.compile(r"^shard-(\d+)$")


class PlacementError(ValueError):
    """A placement is inconsistent; the message names the layer, expert or shard."""


Assignment = Mapping[int, Sequence[int]]  # layer -> global expert ids held in that layer


@dataclass(frozen=True)
class ShardSpec:
    """One shard: `experts[l]` are the global expert ids it holds in MoE layer l (sorted)."""

    shard_id: str
    address: str = ""
    experts: tuple[tuple[int, ...], ...] = ()
    state: str = "up"

    def __post_init__(self) -> None:
        if not isinstance(self.shard_id, str) or not self.shard_id:
            raise PlacementError(f"shard id must be a non-empty string, got {self.shard_id!r}")
        if self.state not in STATES:
            raise PlacementError(
                f"shard {self.shard_id}: state {self.state!r} is not one of {list(STATES)}"
            )
        layers = []
        for layer, ids in enumerate(self.experts):
            ids = tuple(int(e) for e in ids)
            if len(set(ids)) != len(ids):
                dup = next(e for e in ids if ids.count(e) > 1)
                raise PlacementError(
                    f"shard {self.shard_id}: expert {dup} appears twice in layer {layer}"
                )
            layers.append(tuple(sorted(ids)))
        object.__setattr__(self, "experts", tuple(layers))

    @property
    def live(self) -> bool:
        return self.state == "up"

    def assignment(self) -> dict[int, list[int]]:
        """{layer: [expert ids]} of the layers where this shard holds anything."""
        return {layer: list(ids) for layer, ids in enumerate(self.experts) if ids}

    def num_pairs(self) -> int:
        """(layer, expert) pairs held."""
        return sum(len(ids) for ids in self.experts)

    @classmethod
    def from_assignment(
        cls, shard_id: str, num_layers: int, assignment: Assignment, address: str = "",
        state: str = "up",
    ) -> ShardSpec:  # fmt: skip
        """A spec from {layer: [ids]}; layers not named hold nothing."""
        bad = [layer for layer in assignment if not 0 <= int(layer) < num_layers]
        if bad:
            raise PlacementError(f"shard {shard_id}: layer {bad[0]} is outside [0, {num_layers})")
        experts = tuple(tuple(assignment.get(layer, ())) for layer in range(num_layers))
        return cls(shard_id, address, experts, state)


@dataclass(frozen=True)
class PlacementTable:
    """The whole pool's placement at one version (see the module docstring)."""

    num_layers: int
    num_experts: int
    shards: tuple[ShardSpec, ...]
    version: int = 0
    retired: tuple[str, ...] = field(default=())  # ids of removed shards: never reused

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", tuple(self.shards))
        object.__setattr__(self, "retired", tuple(self.retired))
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def contiguous(
        cls, num_layers: int, num_experts: int, shard_ids: Sequence[str] | int
    ) -> PlacementTable:
        """Every layer split into contiguous expert ranges (sizes differ by at most one; the
        first shards get the extra). `shard_ids` may be a count: ids "shard-0".."shard-{n-1}"."""
        ids = [f"shard-{i}" for i in range(shard_ids)] if isinstance(shard_ids, int) else shard_ids
        n = len(ids)
        if not 1 <= n <= num_experts:
            raise PlacementError(f"need 1 <= shards <= {num_experts} experts, got {n}")
        base, extra = divmod(num_experts, n)
        specs, start = [], 0
        for s, shard_id in enumerate(ids):
            size = base + (1 if s < extra else 0)
            rows = tuple(range(start, start + size))
            specs.append(ShardSpec(shard_id, "", (rows,) * num_layers))
            start += size
        return cls(num_layers, num_experts, tuple(specs))

    def _validate(self) -> None:
        if self.num_layers < 1 or self.num_experts < 1:
            raise PlacementError(
                f"need num_layers >= 1 and num_experts >= 1, got {self.num_layers}, "
                f"{self.num_experts}"
            )
        if self.version < 0:
            raise PlacementError(f"version must be >= 0, got {self.version}")
        seen: set[str] = set()
        for spec in self.shards:
            if spec.shard_id in seen:
                raise PlacementError(f"shard id {spec.shard_id} appears twice")
            if spec.shard_id in self.retired:
                raise PlacementError(f"shard id {spec.shard_id} was retired and is not reused")
            seen.add(spec.shard_id)
            if len(spec.experts) != self.num_layers:
                raise PlacementError(
                    f"shard {spec.shard_id}: experts for {len(spec.experts)} layers, table has "
                    f"{self.num_layers}"
                )
            for layer, ids in enumerate(spec.experts):
                if ids and not (0 <= ids[0] and ids[-1] < self.num_experts):
                    bad = ids[0] if ids[0] < 0 else ids[-1]
                    raise PlacementError(
                        f"shard {spec.shard_id}: expert {bad} in layer {layer} is outside "
                        f"[0, {self.num_experts})"
                    )
        holders = self._holders  # builds the holder lists
        for layer, per_expert in enumerate(holders):
            for expert, who in enumerate(per_expert):
                if not who:
                    raise PlacementError(
                        f"(layer {layer}, expert {expert}) is not placed on any shard"
                    )

    # ------------------------------------------------------------------ queries
    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def shard_ids(self) -> tuple[str, ...]:
        return tuple(s.shard_id for s in self.shards)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {s.shard_id: i for i, s in enumerate(self.shards)}

    @cached_property
    def _holders(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """[layer][expert] -> shard indices holding it (any state), in table order."""
        out = [[[] for _ in range(self.num_experts)] for _ in range(self.num_layers)]
        for s, spec in enumerate(self.shards):
            for layer, ids in enumerate(spec.experts):
                row = out[layer]
                for e in ids:
                    row[e].append(s)
        return tuple(tuple(tuple(x) for x in layer) for layer in out)

    def index(self, shard_id: str) -> int:
        """Position of `shard_id` in `shards`; PlacementError if the table has no such shard."""
        try:
            return self._index[shard_id]
        except KeyError:
            raise PlacementError(f"shard {shard_id} is not in placement v{self.version}") from None

    def shard(self, shard_id: str) -> ShardSpec:
        return self.shards[self.index(shard_id)]

    def holders(self, layer: int, expert: int) -> tuple[str, ...]:
        """Ids of the shards holding (layer, expert), any state, in table order."""
        self._check(layer, expert)
        return tuple(self.shards[s].shard_id for s in self._holders[layer][expert])

    def live_holders(self, layer: int, expert: int) -> tuple[str, ...]:
        """Ids of the "up" shards holding (layer, expert)."""
        self._check(layer, expert)
        return tuple(
            self.shards[s].shard_id for s in self._holders[layer][expert] if self.shards[s].live
        )

    def holds(self, shard_id: str, layer: int, expert: int) -> bool:
        self._check(layer, expert)
        return self.index(shard_id) in self._holders[layer][expert]

    def uncovered(self) -> tuple[tuple[int, int], ...]:
        """(layer, expert) pairs with no "up" holder, sorted."""
        live = [spec.live for spec in self.shards]
        return tuple(
            (layer, e)
            for layer, per_expert in enumerate(self._holders)
            for e, who in enumerate(per_expert)
            if not any(live[s] for s in who)
        )

    def live_holder_matrix(self, layer: int) -> torch.Tensor:
        """[num_experts, R] long: indices (into `shards`) of the "up" holders of each expert of
        `layer`, -1 padded (R = the most live holders any expert has, >= 1). For planners."""
        return self._live_matrices[layer]

    @cached_property
    def _live_matrices(self) -> tuple[torch.Tensor, ...]:
        out = []
        for per_expert in self._holders:
            live = [[s for s in who if self.shards[s].live] for who in per_expert]
            width = max(1, max(len(x) for x in live))
            m = torch.full((self.num_experts, width), -1, dtype=torch.long)
            for e, who in enumerate(live):
                if who:
                    m[e, : len(who)] = torch.tensor(who)
            out.append(m)
        return tuple(out)

    def next_shard_id(self) -> str:
        """A fresh id "shard-N": N above every numbered id this table has ever used."""
        numbers = [
            int(m.group(1))
            for sid in (*self.shard_ids, *self.retired)
            if (m := _NUMBERED.match(sid))
        ]
        return f"shard-{max(numbers, default=-1) + 1}"

    def _check(self, layer: int, expert: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise PlacementError(f"layer {layer} is outside [0, {self.num_layers})")
        if not 0 <= expert < self.num_experts:
            raise PlacementError(f"expert {expert} is outside [0, {self.num_experts})")

    # ------------------------------------------------------------------ new versions
    def _with_shards(self, shards: Iterable[ShardSpec], retired: Sequence[str] = ()):
        return PlacementTable(
            self.num_layers, self.num_experts, tuple(shards), self.version + 1,
            self.retired + tuple(retired),
        )  # fmt: skip

    def _replace_shard(self, shard_id: str, **changes) -> PlacementTable:
        i = self.index(shard_id)
        shards = list(self.shards)
        shards[i] = replace(shards[i], **changes)
        return self._with_shards(shards)

    def with_replica(self, layer: int, expert: int, shard_id: str) -> PlacementTable:
        """Also place (layer, expert) on `shard_id`."""
        self._check(layer, expert)
        spec = self.shard(shard_id)
        if expert in spec.experts[layer]:
            raise PlacementError(f"shard {shard_id} already holds (layer {layer}, expert {expert})")
        experts = list(spec.experts)
        experts[layer] = experts[layer] + (expert,)
        return self._replace_shard(shard_id, experts=tuple(experts))

    def without_replica(self, layer: int, expert: int, shard_id: str) -> PlacementTable:
        """Drop (layer, expert) from `shard_id`. Refuses to drop its last holder, and to drop a
        live holder when no other live holder is left (that would stall routers)."""
        self._check(layer, expert)
        spec = self.shard(shard_id)
        if expert not in spec.experts[layer]:
            raise PlacementError(f"shard {shard_id} does not hold (layer {layer}, expert {expert})")
        others = [h for h in self.holders(layer, expert) if h != shard_id]
        if not others:
            raise PlacementError(
                f"(layer {layer}, expert {expert}) has no other holder than shard {shard_id}"
            )
        if spec.live and not any(self.shard(h).live for h in others):
            raise PlacementError(
                f"(layer {layer}, expert {expert}) has no other live holder than shard {shard_id}"
            )
        experts = list(spec.experts)
        experts[layer] = tuple(e for e in experts[layer] if e != expert)
        return self._replace_shard(shard_id, experts=tuple(experts))

    def with_shard(self, spec: ShardSpec) -> PlacementTable:
        """Add a new shard (its id must be new: never used by this table or a retired one)."""
        if spec.shard_id in self._index:
            raise PlacementError(f"shard id {spec.shard_id} is already in the table")
        if spec.shard_id in self.retired:
            raise PlacementError(f"shard id {spec.shard_id} was retired and is not reused")
        return self._with_shards((*self.shards, spec))

    def without_shard(self, shard_id: str) -> PlacementTable:
        """Remove a shard; its id is retired. Every (layer, expert) must keep a holder."""
        i = self.index(shard_id)
        return self._with_shards(self.shards[:i] + self.shards[i + 1 :], retired=(shard_id,))

    def with_state(self, shard_id: str, state: str) -> PlacementTable:
        return self._replace_shard(shard_id, state=state)

    def with_address(self, shard_id: str, address: str) -> PlacementTable:
        return self._replace_shard(shard_id, address=address)

    def with_addresses(self, addresses: Mapping[str, str]) -> PlacementTable:
        """Several addresses in one new version ({shard_id: address})."""
        shards = list(self.shards)
        for shard_id, address in addresses.items():
            i = self.index(shard_id)
            shards[i] = replace(shards[i], address=address)
        return self._with_shards(shards)

    def with_assignment(
        self, shard_id: str, experts: Assignment | Sequence[Sequence[int]]
    ) -> PlacementTable:
        """Replace what `shard_id` holds: {layer: ids} (other layers empty) or one id tuple
        per layer."""
        if isinstance(experts, Mapping):
            spec = ShardSpec.from_assignment(shard_id, self.num_layers, experts)
            return self._replace_shard(shard_id, experts=spec.experts)
        return self._replace_shard(shard_id, experts=tuple(tuple(x) for x in experts))


def assignment_diff(
    current: Assignment, target: Assignment
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(additions, removals) that turn `current` holdings into `target` ({layer: ids})."""
    add: dict[int, list[int]] = {}
    drop: dict[int, list[int]] = {}
    for layer in sorted(set(current) | set(target)):
        have, want = set(current.get(layer, ())), set(target.get(layer, ()))
        if want - have:
            add[layer] = sorted(want - have)
        if have - want:
            drop[layer] = sorted(have - want)
    return add, drop


class PlacementHandle:
    """The current PlacementTable, swappable atomically while readers take per-step snapshots."""

    def __init__(self, table: PlacementTable) -> None:
        self._cond = threading.Condition()
        self._table = table

    def snapshot(self) -> PlacementTable:
        """The current table; it is immutable, so a step can use it without further locking."""
        with self._cond:
            return self._table

    @property
    def version(self) -> int:
        return self.snapshot().version

    def _install(self, new: PlacementTable) -> None:  # caller holds the lock
        if new.version <= self._table.version:
            raise PlacementError(
                f"placement version {new.version} is not newer than current {self._table.version}"
            )
        self._table = new
        self._cond.notify_all()

    def swap(self, new: PlacementTable) -> PlacementTable:
        """Install `new` (its version must be newer); returns the table it replaced."""
        with self._cond:
            old = self._table
            self._install(new)
            return old

    def update(self, fn: Callable[[PlacementTable], PlacementTable]) -> PlacementTable:
        """Atomically install fn(current) (read-modify-write); returns the new table."""
        with self._cond:
            new = fn(self._table)
            self._install(new)
            return new

    def wait_newer(self, version: int, timeout: float | None = None) -> PlacementTable | None:
        """Block until the table's version exceeds `version`; None on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._table.version > version, timeout):
                return None
            return self._table
