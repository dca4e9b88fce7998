"""Through Ray: an expert-shard actor is ray.kill'ed in the middle of a generation while
another shard holds replicas of all its experts; the generation goes on with tokens identical
to an undisturbed run and no error (issue 9, expert shard loss)."""

from __future__ import annotations

import pytest
import ray

from cluster.launcher import init_ray
from router.client import RemoteExpertBackend
from router.placement import PlacementTable, ShardSpec
from workers.config import ModelConfig
from workers.dense_worker import DenseWorker
from workers.expert_shard import ExpertShardActor
from workers.make_checkpoint import make_checkpoint
from workers.sampler import SamplingParams

PROMPTS = [list(range(3, 40)), [7, 8, 9], [42], list(range(100, 112))]
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True)


class KillingBackend:
    """Passes layer steps through; before step `kill_at` it kills `actor` and waits until Ray
    reports it dead, so the rest of the generation runs without that shard."""

    def __init__(self, inner: RemoteExpertBackend, actor, kill_at: int) -> None:
        self.inner, self.actor, self.kill_at, self.steps = inner, actor, kill_at, 0

    def submit(self, layer, hidden, ids, weights):
        self.steps += 1
        if self.steps == self.kill_at:
            ray.kill(self.actor, no_restart=True)
            with pytest.raises(ray.exceptions.RayActorError):
                for _ in range(600):
                    ray.get(self.actor.ping.remote(), timeout=30)
        return self.inner.submit(layer, hidden, ids, weights)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("m"), preset="tiny", seed=21))


def test_generation_survives_a_killed_shard_with_replicas(model_dir):
    config = ModelConfig.from_hf(model_dir)
    base = PlacementTable.contiguous(config.num_hidden_layers, config.num_experts, 2)
    base = base.with_shard(ShardSpec("shard-2", "", base.shard("shard-0").experts))
    started = not ray.is_initialized()
    if started:
        init_ray(None, min_cpus=4)
    try:
        actor = ray.remote(ExpertShardActor).options(num_cpus=0.25)
        shards = {
            s.shard_id: actor.remote(model_dir, s.shard_id, s.assignment()) for s in base.shards
        }
        infos = ray.get([a.ready.remote() for a in shards.values()], timeout=300)
        table = base.with_addresses({i["shard_id"]: i["address"] for i in infos})
        with RemoteExpertBackend(table) as backend:
            static = DenseWorker(model_dir, experts=backend).generate(PROMPTS, PARAMS)
        faults: list[tuple[str, str]] = []
        with RemoteExpertBackend(table, on_fault=lambda *f: faults.append(f)) as backend:
            killing = KillingBackend(
                backend, shards["shard-0"], kill_at=3 * config.num_hidden_layers
            )
            disturbed = DenseWorker(model_dir, experts=killing).generate(PROMPTS, PARAMS)
            m = backend.metrics()
        assert killing.steps > killing.kill_at  # the kill happened mid-generation
        for a, b in zip(disturbed, static, strict=True):
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
        assert m["errors"] == 0 and m["waits"] == 0
        assert m["faults"] >= 1 and {s for s, _ in faults} == {"shard-0"}
        assert m["excluded_shards"] == ["shard-0"]
        stats = ray.get(shards["shard-2"].stats.remote())
        assert stats["calls"] > 0 and stats["rejected"] == 0
        for sid in ("shard-1", "shard-2"):
            ray.get(shards[sid].shutdown.remote(), timeout=30)
    finally:
        if started:
            ray.shutdown()
