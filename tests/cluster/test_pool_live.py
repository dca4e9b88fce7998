"""The pool controller with real shard actors on a local Ray: live placement changes and shard
deaths in the middle of a generation. Every generation must match a static run (logprobs
within 1e-4, identical greedy tokens: these checkpoints have no near-ties) with no failed
request; faults are healed (new table, status ready again) and counted."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from cluster.cli import main
from cluster.config import ClusterConfig
from cluster.launcher import ExpertPool, connect_expert_backend, init_ray
from tests.cluster.pool_helpers import PARAMS, PROMPTS, Steps, check_same
from workers.config import ModelConfig
from workers.dense_worker import DenseWorker
from workers.make_checkpoint import make_checkpoint

HEALTH = {"probe_interval_s": 0.2, "probe_timeout_s": 5.0, "probe_failures": 3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("m"), "tiny", seed=5, skew=(4, 2.5)))


@pytest.fixture(scope="module")
def static(model_dir):
    return DenseWorker(model_dir).generate(PROMPTS, PARAMS)  # local experts


@pytest.fixture(scope="module")
def ray_local():
    started = not ray.is_initialized()
    if started:
        init_ray(None, min_cpus=6)
    yield
    if started:
        ray.shutdown()


def pool_config(model_dir: str, **experts) -> ClusterConfig:
    experts = {"shards": 2, "num_cpus": 0.25, "health": HEALTH, "redundant_per_shard": 2,
               **experts}  # fmt: skip
    return ClusterConfig.from_dict({"model": model_dir, "experts": experts})


def test_live_ops_during_generation_match_a_static_run(
    model_dir, static, ray_local, tmp_path, capsys
):
    layers = ModelConfig.from_hf(model_dir).num_hidden_layers
    config = pool_config(model_dir)
    pool = ExpertPool.start(model_dir, config)
    c = pool.controller
    backend = connect_expert_backend(config)
    try:
        ops = {
            3: lambda: ray.get(c.add_replica.remote(1, 5, "shard-1")),
            2 * layers + 1: lambda: ray.get(c.drop_replica.remote(1, 5, "shard-0")),
            4 * layers: lambda: ray.get(c.move_expert.remote(2, 20, "shard-1", "shard-0")),
            6 * layers + 2: lambda: ray.get(c.add_shard.remote()),
            8 * layers: lambda: ray.get(c.rebalance_now.remote(force=True)),
            10 * layers + 1: lambda: ray.get(c.retire_shard.remote("shard-1")),
        }
        steps = Steps(backend, ops, wait=layers)
        outs = DenseWorker(model_dir, experts=steps).generate(PROMPTS, PARAMS)
        steps.done()
        assert not steps.errors, steps.errors
        assert len(steps.results) == len(ops)
        check_same(outs, static)
        table = ray.get(c.get.remote())
        assert table.shard_ids == ("shard-0", "shard-2") and "shard-1" in table.retired
        assert backend.placement.version == table.version  # the router followed
        m = backend.metrics()
        assert m["errors"] == 0
        status = ray.get(c.status.remote())
        assert status["ready"] and status["version"] == table.version
        report = ray.get(c.load_report.remote())
        assert sum(r["rows"] for r in report["layers"]) > 0  # the routed load arrived
        metrics = ray.get(c.metrics.remote())
        assert metrics["counters"]["expert_copies_loaded"] > 0
        png = tmp_path / "experts.png"  # `expertmesh experts` on the running pool
        assert main(["experts", "--ray-address", "auto", "--png", str(png)]) == 0
        printed = capsys.readouterr().out
        assert f"placement v{table.version}" in printed and "shard-2" in printed
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert metrics["counters"]["shards_added"] == metrics["counters"]["shards_retired"] == 1
    finally:
        backend.close()
        pool.shutdown()


def _pid(handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_dead_shard_is_replaced_mid_generation(model_dir, static, ray_local, how):
    config = pool_config(model_dir, recovery_timeout_s=120.0)
    pool = ExpertPool.start(model_dir, config)
    c = pool.controller
    backend = connect_expert_backend(config)
    try:
        victim = pool.shard_handles()["shard-0"]
        expected = ray.get(c.get.remote()).shard("shard-0").experts
        pid = _pid(victim)

        def kill():
            if how == "ray.kill":
                ray.kill(victim, no_restart=True)
            else:
                os.kill(pid, signal.SIGKILL)

        steps = Steps(backend, {10: kill}, wait=2)
        outs = DenseWorker(model_dir, experts=steps).generate(PROMPTS, PARAMS)
        steps.done()
        check_same(outs, static)  # the steps waited for the replacement: nothing failed
        table = ray.get(c.get.remote())
        assert "shard-0" in table.retired and not table.uncovered()
        new = [s for s in table.shards if s.shard_id not in ("shard-0", "shard-1")]
        assert len(new) == 1 and new[0].experts == expected and new[0].live
        counters = ray.get(c.metrics.remote())["counters"]
        assert counters["shard_faults"] == 1 and counters["recoveries"] == 1
        assert backend.metrics()["errors"] == 0 and ray.get(c.status.remote())["ready"]
    finally:
        backend.close()
        pool.shutdown()


def test_shard_restarted_by_ray_is_resynced(model_dir, static, ray_local):
    config = pool_config(model_dir, max_restarts=1, recovery_timeout_s=120.0)
    pool = ExpertPool.start(model_dir, config)
    c = pool.controller
    backend = connect_expert_backend(config)
    try:
        ray.get(c.add_replica.remote(0, 30, "shard-0"))  # not in its constructor's experts
        old = ray.get(c.get.remote()).shard("shard-0")
        pid = _pid(pool.shard_handles()["shard-0"])
        steps = Steps(backend, {6: lambda: os.kill(pid, signal.SIGKILL)}, wait=2)
        outs = DenseWorker(model_dir, experts=steps).generate(PROMPTS, PARAMS)
        steps.done()
        check_same(outs, static)
        for _ in range(300):  # the re-sync may finish after the generation
            table = ray.get(c.get.remote())
            if table.shard("shard-0").live and table.shard("shard-0").address != old.address:
                break
            time.sleep(0.1)
        spec = table.shard("shard-0")
        assert spec.live and spec.address != old.address and spec.experts == old.experts
        held = ray.get(pool.shard_handles()["shard-0"].holdings.remote())
        assert held == spec.assignment() and 30 in held[0]
        assert ray.get(c.metrics.remote())["counters"]["restarts_resynced"] == 1
    finally:
        backend.close()
        pool.shutdown()
