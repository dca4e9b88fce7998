"""Shard autoscaler decisions on synthetic busy fractions: delays, bounds, one step at a time,
and no scale-out onto busy cores (it says so and stays put instead of running to max)."""

from __future__ import annotations

from cluster.autoscaler import (
    Decision,
    NodeRoom,
    ShardAutoscaler,
    ShardAutoscalingConfig,
    find_room,
)

CONFIG = ShardAutoscalingConfig(enabled=True, min_shards=1, max_shards=4, target_load=0.5,
                                upscale_delay_s=10, downscale_delay_s=60)  # fmt: skip
ROOMY = [NodeRoom("node-a", 8, 2.0, 6.0, 2), NodeRoom("node-b", 8, 1.0, 8.0, 0)]
BUSY = [NodeRoom("node-a", 2, 1.95, 1.0, 2)]


def run(scaler, busy_of, start, seconds, nodes=ROOMY, step=1.0):
    """Tick once a second; apply up/down decisions to the shard count; return the decisions."""
    shards, t, out = start, 0.0, []
    while t <= seconds:
        d = scaler.decide(busy_of(t, shards), shards, nodes, shard_cpus=1.0, now=t)
        out.append((t, d))
        if d.action in ("up", "down"):
            shards = d.shards
        t += step
    return shards, out


def spread(total):
    return lambda t, n: {f"s{i}": total(t) / n for i in range(n)}


def test_sustained_load_scales_up_after_the_delay_one_shard_at_a_time():
    scaler = ShardAutoscaler(CONFIG)
    shards, log = run(scaler, spread(lambda t: 1.8), start=2, seconds=40)
    ups = [(t, d) for t, d in log if d.action == "up"]
    assert [d.shards for _, d in ups] == [3, 4]  # ceil(1.8 / 0.5) = 4, one step at a time
    assert ups[0][0] >= 10 and ups[1][0] - ups[0][0] >= 10
    assert ups[0][1].node_id == "node-b"  # the node with room and the fewest shards
    assert shards == 4


def test_short_spike_does_not_scale_and_max_bounds():
    scaler = ShardAutoscaler(CONFIG)
    spike = spread(lambda t: 3.0 if t < 5 else 0.6)
    shards, log = run(scaler, spike, start=2, seconds=30)
    assert shards == 2 and all(d.action == "hold" for _, d in log)
    scaler = ShardAutoscaler(CONFIG)
    shards, _ = run(scaler, spread(lambda t: 50.0), start=2, seconds=200)
    assert shards == 4  # max_shards


def test_falling_load_scales_down_after_the_longer_delay_to_min():
    scaler = ShardAutoscaler(CONFIG)
    shards, log = run(scaler, spread(lambda t: 0.1), start=4, seconds=200)
    downs = [t for t, d in log if d.action == "down"]
    assert downs[0] >= 60 and shards == 1
    assert all(b - a >= 60 for a, b in zip(downs, downs[1:], strict=False))


def test_busy_cores_block_scale_out_with_a_reason_and_no_runaway():
    scaler = ShardAutoscaler(CONFIG)
    shards, log = run(scaler, spread(lambda t: 1.9), start=2, seconds=60, nodes=BUSY)
    assert shards == 2
    blocked = [d for _, d in log if d.action == "blocked"]
    assert blocked and "only share busy cores" in blocked[0].reason
    assert "1.9 of 2 cores busy" in blocked[0].reason and "add_nodes" in blocked[0].reason


def test_a_ray_autoscaler_may_add_the_node():
    config = ShardAutoscalingConfig(**{**CONFIG.__dict__, "add_nodes": True})
    scaler = ShardAutoscaler(config)
    shards, log = run(scaler, spread(lambda t: 1.9), start=2, seconds=15, nodes=BUSY)
    ups = [d for _, d in log if d.action == "up"]
    assert shards == 3 and ups[0].node_id is None and "autoscaler" in ups[0].reason


def test_below_min_scales_up_at_once_and_off_means_hold():
    config = ShardAutoscalingConfig(**{**CONFIG.__dict__, "min_shards": 3})
    d = ShardAutoscaler(config).decide({"a": 0.0}, 1, ROOMY, now=0.0)
    assert d == Decision("up", 2, d.reason, "node-b")
    off = ShardAutoscaler(ShardAutoscalingConfig(enabled=False))
    assert off.decide({"a": 1.0}, 1, ROOMY, now=0.0).action == "hold"


def test_find_room_needs_logical_cpus_and_idle_cores():
    nodes = [NodeRoom("a", 4, 0.0, 0.5, 0), NodeRoom("b", 4, 3.8, 4.0, 0)]
    assert find_room(nodes, 1.0, 1, add_nodes=False)[:2] == (None, False)
    nodes.append(NodeRoom("c", 4, 2.0, 2.0, 1))
    assert find_room(nodes, 1.0, 2, add_nodes=False)[:2] == ("c", True)
    assert find_room(nodes, 1.0, 8, add_nodes=False)[:2] == (None, False)  # 4 idle cores needed
