"""What the app needs before Serve deploys it: the cluster config (a YAML file plus inline
overrides), the model directory (the demo checkpoint by default) and a running expert pool.

`serve run` calls the app builder in a short-lived Ray task, so the pool is started inside a
detached owner actor that outlives it; a pool already running (e.g. started by `expertmesh
serve`) is reused."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import ray

from cluster.config import ClusterConfig, load_config  # noqa: F401 (re-export)

log = logging.getLogger(__name__)
OWNER_NAME = "expertmesh-pool-owner"


DEMO_MODEL_NAME = "expertmesh-demo"


def resolve_model(config: ClusterConfig) -> ClusterConfig:
    """model None -> the embedded demo checkpoint (generated once); paths made absolute (the
    replicas may run in another working directory)."""
    if config.model:
        return dataclasses.replace(config, model=str(Path(config.model).resolve()))
    from workers.make_checkpoint import ensure_demo_checkpoint

    server = config.server
    if not server.model_name:  # a stable id for the demo, whatever its cache directory is
        server = dataclasses.replace(server, model_name=DEMO_MODEL_NAME)
    return dataclasses.replace(config, model=str(ensure_demo_checkpoint("small")), server=server)


def served_model_name(config: ClusterConfig, model_dir: str) -> str:
    return config.server.model_name or Path(model_dir).name


class PoolOwner:
    """Holds a running ExpertPool (its shard actors are owned by this actor)."""

    def __init__(self, model_dir: str, config: ClusterConfig) -> None:
        from cluster.launcher import ExpertPool

        self.pool = ExpertPool.start(model_dir, config)

    def ready(self) -> int:
        return len(self.pool.shards)

    def shutdown(self) -> None:
        self.pool.shutdown()


def pool_running() -> bool:
    from cluster.controllers import NAMESPACE, PLACEMENT_CONTROLLER

    try:
        ray.get_actor(PLACEMENT_CONTROLLER, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def ensure_expert_pool(model_dir: str, config: ClusterConfig) -> None:
    """Start config.experts.shards shards in a detached owner unless a pool is running."""
    from cluster.controllers import NAMESPACE

    if pool_running():
        log.info("expert pool already running: reusing it")
        return
    owner = (
        ray.remote(PoolOwner)
        .options(
            name=OWNER_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            get_if_exists=True,
        )
        .remote(model_dir, config)
    )
    try:
        shards = ray.get(owner.ready.remote())
    except Exception:
        ray.kill(owner)
        raise
    log.info("expert pool up: %d shards (owner %s)", shards, OWNER_NAME)


def stop_detached_pool() -> bool:
    """Shut down a pool started by ensure_expert_pool; False if there was none."""
    from cluster.controllers import NAMESPACE

    try:
        owner = ray.get_actor(OWNER_NAME, namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(owner.shutdown.remote(), timeout=60)
    finally:
        ray.kill(owner)
    return True
