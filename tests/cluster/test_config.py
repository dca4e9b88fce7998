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
        ({"dense": {"torch_threads": 0}}, "dense.torch_threads: must be >= 1"),
        ({"dense": {"wide_step_threads": "all"}}, "dense.wide_step_threads: expected int"),
        ({"dense": {"wide_step_tokens": 0}}, "dense.wide_step_tokens: must be >= 1"),
        ({"dense": {"stream_interval": 0}}, "dense.stream_interval: must be >= 1"),
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
        ({"experts": {"recovery_timeout_s": 0}}, "experts.recovery_timeout_s: must be > 0"),
        ({"experts": {"hedge_after_s": -1}}, "experts.hedge_after_s: must be > 0 (or null"),
        ({"experts": {"token": "two words\n"}}, "experts.token: cluster token must be printable"),
        ({"experts": {"tls": {"cert": "a.pem"}}}, "experts.tls.key: required with TLS"),
        ({"experts": {"tls": {"server_name": "x"}}}, "experts.tls.cert: required with TLS"),
        (
            {"experts": {"tls": {"cert": "/nope/a", "key": "/nope/b", "ca": "/nope/c"}}},
            "experts.tls.cert: file not found: /nope/a",
        ),
        ({"experts": {"tls": {"crt": "a"}}}, "experts.tls.crt: unknown key"),
        ({"dense": {"kv_eviction": "lru"}}, "dense.kv_eviction: must be one of"),
        ({"dense": {"kv_window_tokens": 8}}, "dense.kv_window_tokens: must be >= kv_block_size"),
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


def test_elastic_pool_keys_load_and_bad_ones_name_the_key():
    c = ClusterConfig.from_dict({"experts": {
        "shards": 2, "redundant_per_shard": 3, "max_restarts": 1,
        "resources": {"expert_shard": 1},
        "load": {"window_s": 30, "collapse_top_n": 2, "collapse_share": 0.4},
        "rebalance": {"enabled": True, "interval_s": 10, "trigger": 1.1},
        "autoscaling": {"enabled": True, "min_shards": 1, "max_shards": 6, "target_load": 0.7},
        "health": {"probe_interval_s": 0.5, "probe_failures": 2},
    }})  # fmt: skip
    e = c.experts
    assert e.redundant_per_shard == 3 and e.resources == {"expert_shard": 1.0}
    assert e.load.window_s == 30.0 and e.rebalance.enabled and e.rebalance.trigger == 1.1
    assert e.autoscaling.max_shards == 6 and e.health.probe_failures == 2
    bad = [
        ({"redundant_per_shard": -1}, "experts.redundant_per_shard: must be >= 0"),
        ({"resources": {"CPU": 1}}, "experts.resources.CPU: use experts.num_cpus"),
        ({"resources": {"x": 0}}, "experts.resources.x: must be > 0"),
        ({"resources": ["x"]}, "experts.resources: expected a mapping"),
        ({"load": {"collapse_share": 1.5}}, "experts.load.collapse_share"),
        ({"rebalance": {"trigger": 0.9}}, "experts.rebalance.trigger: must be >= 1"),
        ({"rebalance": {"min_gain": 1.0}}, "experts.rebalance.min_gain"),
        ({"autoscaling": {"target_load": 0}}, "experts.autoscaling.target_load"),
        ({"autoscaling": {"min_shards": 3, "max_shards": 2}}, "autoscaling.max_shards"),
        ({"autoscaling": {"enabled": True, "min_shards": 3, "max_shards": 4}},
         "experts.shards: must be within autoscaling [3, 4]"),
        ({"shards": 0, "autoscaling": {"enabled": True}}, "needs expert shards"),
        ({"health": {"probe_failures": 0}}, "experts.health.probe_failures: must be >= 1"),
        ({"autoscaling": {"typo": 1}}, "experts.autoscaling.typo: unknown key"),
    ]  # fmt: skip
    for raw, message in bad:
        with pytest.raises(ClusterConfigError, match=message.replace("[", r"\[")):
            ClusterConfig.from_dict({"experts": raw})


def test_expert_rpc_security_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("EXPERTMESH_CLUSTER_TOKEN", raising=False)
    c = ClusterConfig.from_dict({})
    assert c.experts.cluster_token() is None and c.experts.tls_files() is None
    assert c.experts.hedge_after_s is None and c.experts.bind_host is None
    monkeypatch.setenv("EXPERTMESH_CLUSTER_TOKEN", "from-env")
    assert c.experts.cluster_token() == "from-env"
    assert ClusterConfig.from_dict({"experts": {"token": "yaml"}}).experts.cluster_token() == "yaml"
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    tls = {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem"),
           "ca": str(tmp_path / "ca.pem"), "server_name": "expertmesh-shard"}  # fmt: skip
    files = ClusterConfig.from_dict({"experts": {"tls": tls}}).experts.tls_files()
    assert files is not None and files.serves_tls and files.server_name == "expertmesh-shard"


def test_dense_resources_are_custom_ray_resources():
    c = ClusterConfig.from_dict({"dense": {"resources": {"dense_node": 1}}})
    assert c.dense.resources == {"dense_node": 1.0}
    for raw, message in [
        ({"CPU": 1}, "dense.resources.CPU: use dense.num_cpus"),
        ({"x": 0}, "dense.resources.x: must be > 0"),
    ]:
        with pytest.raises(ClusterConfigError, match=message):
            ClusterConfig.from_dict({"dense": {"resources": raw}})
