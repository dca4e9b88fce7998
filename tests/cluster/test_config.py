"""Cluster YAML config: defaults, overrides, and errors that name the key path."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.config import ClusterConfig, ClusterConfigError


def test_defaults_and_nested_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "experts:\n  shards: 4\n  placement: strict_spread\ndense:\n  micro_batches: 2\n"
    )
    c = ClusterConfig.from_yaml(path)
    assert c.experts.shards == 4 and c.experts.placement == "strict_spread"
    assert c.dense.micro_batches == 2 and c.dense.max_num_seqs == 32
    assert c.dense.engine_config().max_num_seqs == 32
    assert c.dense.cache_config().prefix_caching and c.dense.cache_config().kv_block_size == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.dtype = "bfloat16"  # type: ignore[misc]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"expertz": {}}, "expertz: unknown key"),
        ({"experts": {"shardz": 1}}, "experts.shardz: unknown key"),
        ({"experts": {"placement": "ring"}}, "experts.placement: expected one of"),
        ({"experts": {"shards": "two"}}, "experts.shards: expected int"),
        ({"dense": {"max_num_seqs": 0}}, "dense.max_num_seqs"),
        ({"dense": {"micro_batches": 0}}, "dense.micro_batches: must be in [1, 8]"),
        ({"dense": {"autoscaling": {"min_replicas": 3}}}, "dense.autoscaling.max_replicas"),
        ({"server": [1]}, "server: expected a mapping"),
        ({"server": {"http_port": 70000}}, "server.http_port"),
        ({"dtype": "int8"}, "dtype: expected one of"),
        ({"experts": {"dtype": "fp8"}}, "experts.dtype: expected one of"),
        ({"experts": {"dtype": 8}}, "experts.dtype: expected str or NoneType"),
        ({"dense": {"kv_block_size": 12}}, "dense.kv_block_size: must be a power of two"),
        ({"dense": {"kv_cache_gb": -1}}, "dense.kv_cache_gb: must be > 0"),
        ({"dense": {"kv_cache_gb": 1, "kv_cache_fraction": 0.5}}, "dense.kv_cache_gb: set"),
        ({"dense": {"kv_cache_fraction": 1.5}}, "dense.kv_cache_fraction: must be in (0, 0.95]"),
        ({"dense": {"prefix_snapshot_every": 100}}, "dense.prefix_snapshot_every: must be a"),
        ({"dense": {"prefix_caching": "yes"}}, "dense.prefix_caching: expected bool"),
    ],
)
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ClusterConfigError) as exc:
        ClusterConfig.from_dict(raw)
    assert message in str(exc.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ClusterConfigError, match="not found"):
        ClusterConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: [unclosed\n")
    with pytest.raises(ClusterConfigError, match="not valid YAML"):
        ClusterConfig.from_yaml(bad)
