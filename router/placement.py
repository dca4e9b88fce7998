"""Which shard holds which expert: an immutable, versioned placement table and a swappable holder.

A `PlacementTable` is the source of truth for both sides of the wire:

* the router asks `replicas(expert)` (shards holding an expert) and `row_of(expert, shard)`;
* a shard loads exactly `local_rows(shard)`, in that order, so local row r of shard s is global
  expert `local_rows(s)[r]`.

Tables never change; `with_replica` / `without_replica` / `with_addresses` / `with_shard`
return a new table with `version + 1`. A replica is appended to the end of its shard's rows so
the rows that shard already holds keep their positions. `PlacementHandle` holds the current
table; the autoscaler `swap`s in a new one while the router takes a `snapshot()` per step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch


class PlacementError(ValueError):
    """A placement is inconsistent; the message names the expert or shard."""


@dataclass(frozen=True)
class PlacementTable:
    """shard_experts[s]: global expert ids held by shard s in row order; addresses[s]: host:port.

    Every expert in [0, num_experts) must be held by at least one shard; an address may be ""
    while the shard is not started yet.
    """

    num_experts: int
    shard_experts: tuple[tuple[int, ...], ...]
    addresses: tuple[str, ...]
    version: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shard_experts", tuple(tuple(s) for s in self.shard_experts))
        object.__setattr__(self, "addresses", tuple(self.addresses))
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def contiguous(
        cls, num_experts: int, num_shards: int, addresses: Sequence[str] | None = None
    ) -> PlacementTable:
        """Contiguous expert ranges; sizes differ by at most one (the first shards get extra)."""
        if num_shards < 1 or num_shards > num_experts:
            raise PlacementError(f"need 1 <= num_shards <= {num_experts}, got {num_shards}")
        base, extra = divmod(num_experts, num_shards)
        rows, start = [], 0
        for s in range(num_shards):
            size = base + (1 if s < extra else 0)
            rows.append(tuple(range(start, start + size)))
            start += size
        addrs = tuple(addresses) if addresses is not None else ("",) * num_shards
        return cls(num_experts, tuple(rows), addrs)

    def _validate(self) -> None:
        if self.num_experts < 1:
            raise PlacementError(f"num_experts must be >= 1, got {self.num_experts}")
        if len(self.addresses) != len(self.shard_experts):
            raise PlacementError(
                f"{len(self.addresses)} addresses for {len(self.shard_experts)} shards"
            )
        held = [False] * self.num_experts
        for s, experts in enumerate(self.shard_experts):
            if len(set(experts)) != len(experts):
                dup = next(e for e in experts if experts.count(e) > 1)
                raise PlacementError(f"expert {dup} appears twice on shard {s}")
            for e in experts:
                if not 0 <= e < self.num_experts:
                    raise PlacementError(
                        f"expert {e} on shard {s} is outside [0, {self.num_experts})"
                    )
                held[e] = True
        if not all(held):
            raise PlacementError(f"expert {held.index(False)} is not placed on any shard")

    # ------------------------------------------------------------------ queries
    @property
    def num_shards(self) -> int:
        return len(self.shard_experts)

    def local_rows(self, shard: int) -> tuple[int, ...]:
        """Global expert ids held by `shard`, in the row order the shard loads them."""
        self._check_shard(shard)
        return self.shard_experts[shard]

    def replicas(self, expert: int) -> tuple[int, ...]:
        """Shards holding `expert`, ascending."""
        self._check_expert(expert)
        return self.expert_shards[expert]

    def row_of(self, expert: int, shard: int) -> int:
        """Local row of `expert` on `shard`; PlacementError if that shard does not hold it."""
        self._check_expert(expert)
        self._check_shard(shard)
        row = int(self.row_table[expert, shard])
        if row < 0:
            raise PlacementError(f"expert {expert} is not held by shard {shard}")
        return row

    @cached_property
    def expert_shards(self) -> tuple[tuple[int, ...], ...]:
        """expert -> shards holding it (the replica map)."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for s, experts in enumerate(self.shard_experts):
            for e in experts:
                out[e].append(s)
        return tuple(tuple(x) for x in out)

    @cached_property
    def row_table(self) -> torch.Tensor:
        """[num_experts, num_shards] long: local row of expert e on shard s, -1 if not held."""
        table = torch.full((self.num_experts, self.num_shards), -1, dtype=torch.long)
        for s, experts in enumerate(self.shard_experts):
            table[list(experts), s] = torch.arange(len(experts))
        return table

    @cached_property
    def primary_shard(self) -> torch.Tensor:
        """[num_experts] long: the first (lowest-index) shard holding each expert."""
        return torch.tensor([r[0] for r in self.expert_shards], dtype=torch.long)

    @cached_property
    def replicated_experts(self) -> tuple[int, ...]:
        """Experts held by more than one shard."""
        return tuple(e for e, r in enumerate(self.expert_shards) if len(r) > 1)

    def _check_shard(self, shard: int) -> None:
        if not 0 <= shard < self.num_shards:
            raise PlacementError(f"shard {shard} does not exist (table has {self.num_shards})")

    def _check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise PlacementError(f"expert {expert} is outside [0, {self.num_experts})")

    # ------------------------------------------------------------------ new versions
    def _next(self, shard_experts=None, addresses=None) -> PlacementTable:
        return PlacementTable(
            self.num_experts,
            self.shard_experts if shard_experts is None else shard_experts,
            self.addresses if addresses is None else addresses,
            self.version + 1,
        )

    def with_replica(self, expert: int, shard: int) -> PlacementTable:
        """Also place `expert` on `shard` (appended as that shard's last row)."""
        self._check_expert(expert)
        self._check_shard(shard)
        if expert in self.shard_experts[shard]:
            raise PlacementError(f"expert {expert} is already on shard {shard}")
        rows = list(self.shard_experts)
        rows[shard] = rows[shard] + (expert,)
        return self._next(shard_experts=tuple(rows))

    def without_replica(self, expert: int, shard: int) -> PlacementTable:
        """Remove `expert` from `shard`; refuses to drop an expert's last replica."""
        if shard not in self.replicas(expert):
            raise PlacementError(f"expert {expert} is not on shard {shard}")
        if len(self.replicas(expert)) == 1:
            raise PlacementError(f"expert {expert} has no other replica than shard {shard}")
        rows = list(self.shard_experts)
        rows[shard] = tuple(e for e in rows[shard] if e != expert)
        return self._next(shard_experts=tuple(rows))

    def with_addresses(self, addresses: Sequence[str] | dict[int, str]) -> PlacementTable:
        """Replace all addresses (a sequence) or some of them ({shard: address})."""
        if isinstance(addresses, dict):
            new = list(self.addresses)
            for s, addr in addresses.items():
                self._check_shard(s)
                new[s] = addr
            return self._next(addresses=tuple(new))
        return self._next(addresses=tuple(addresses))

    def with_shard(self, experts: Sequence[int], address: str = "") -> PlacementTable:
        """Append a new shard holding `experts` (replicas of existing ones); index = num_shards."""
        return self._next(
            shard_experts=self.shard_experts + (tuple(experts),),
            addresses=self.addresses + (address,),
        )


class PlacementHandle:
    """The current PlacementTable, swappable atomically while readers take per-step snapshots."""

    def __init__(self, table: PlacementTable) -> None:
        self._lock = threading.Lock()
        self._table = table

    def snapshot(self) -> PlacementTable:
        """The current table; it is immutable, so a step can use it without further locking."""
        with self._lock:
            return self._table

    @property
    def version(self) -> int:
        return self.snapshot().version

    def swap(self, new: PlacementTable) -> PlacementTable:
        """Install `new` (its version must be newer); returns the table it replaced."""
        with self._lock:
            old = self._table
            if new.version <= old.version:
                raise PlacementError(
                    f"placement version {new.version} is not newer than current {old.version}"
                )
            self._table = new
            return old

    def update(self, fn: Callable[[PlacementTable], PlacementTable]) -> PlacementTable:
        """Atomically install fn(current) (read-modify-write); returns the new table."""
        with self._lock:
            new = fn(self._table)
            if new.version <= self._table.version:
                raise PlacementError(
                    f"placement version {new.version} is not newer than current "
                    f"{self._table.version}"
                )
            self._table = new
            return new
