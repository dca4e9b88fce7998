"""Cluster controllers (Ray actors).

`PlacementController` owns the versioned expert placement table of a running expert pool.
Dense workers read it when they connect and poll its version; an autoscaler or rebalancer
publishes a new table with `publish` (versions only move forward), and every router swaps
to it atomically between layer steps.
"""

from __future__ import annotations

from typing import Any

from router.placement import PlacementError, PlacementTable

NAMESPACE = "expertmesh"
PLACEMENT_CONTROLLER = "expertmesh-placement"


class PlacementController:
    def __init__(self, table: PlacementTable, shards: list[dict[str, Any]]) -> None:
        self._table = table
        self._shards = shards  # ready() info of each shard actor: address, experts, node_id

    def get(self) -> PlacementTable:
        return self._table

    def version(self) -> int:
        return self._table.version

    def shards(self) -> list[dict[str, Any]]:
        return list(self._shards)

    def publish(self, table: PlacementTable) -> int:
        if table.version <= self._table.version:
            raise PlacementError(
                f"version {table.version} is not newer than the current {self._table.version}"
            )
        if table.num_experts != self._table.num_experts:
            raise PlacementError(f"num_experts {table.num_experts} != {self._table.num_experts}")
        self._table = table
        return table.version
