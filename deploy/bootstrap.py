"""What the app needs before Serve deploys it: the cluster config (a YAML file plus inline
overrides), the model directory (the demo checkpoint by default) and a running expert pool.

`serve run` calls the app builder in a short-lived Ray task, so the pool is started inside a
detached owner actor that outlives it; a pool already running (e.g. started by `expertmesh
serve`) is reused. The owner lives as long as the Serve app: the app's HTTP ingress attaches
the app's name to it, and once no attached app exists any more (`serve delete`, `serve
shutdown`) the owner stops the pool and exits."""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from pathlib import Path

import ray

from cluster.config import ClusterConfig, load_config  # noqa: F401 (re-export)

log = logging.getLogger(__name__)
OWNER_NAME = "expertmesh-pool-owner"
APP_WATCH_INTERVAL_S = 2.0


DEMO_MODEL_NAME = "expertmesh-demo"


def resolve_model(config: ClusterConfig, progress: bool = False) -> ClusterConfig:
    """model None -> the embedded demo checkpoint (generated once; `progress` reports the
    generation on stderr); paths made absolute (the replicas may run in another working
    directory)."""
    if config.model:
        return dataclasses.replace(config, model=str(Path(config.model).resolve()))
    from workers.make_checkpoint import default_demo_dir, ensure_demo_checkpoint

    server = config.server
    if not server.model_name:  # a stable id for the demo, whatever its cache directory is
        server = dataclasses.replace(server, model_name=DEMO_MODEL_NAME)
    if progress and not default_demo_dir("small").is_dir():
        print(
            f"expertmesh: generating the demo checkpoint (random weights, ~400 MB, once) in "
            f"{default_demo_dir('small')}",
            file=sys.stderr,
            flush=True,
        )
    model = ensure_demo_checkpoint("small", progress=progress)
    return dataclasses.replace(config, model=str(model), server=server)


def is_demo_model(model_dir: str | Path) -> bool:
    """Whether model_dir is the embedded demo checkpoint (random weights)."""
    from workers.make_checkpoint import default_demo_dir

    return Path(model_dir).resolve() == default_demo_dir("small").resolve()


def served_model_name(config: ClusterConfig, model_dir: str) -> str:
    return config.server.model_name or Path(model_dir).name


class PoolOwner:
    """Holds a running ExpertPool (its shard actors are owned by this actor) for as long as
    a Serve app attached to it exists."""

    def __init__(self, model_dir: str, config: ClusterConfig) -> None:
        from cluster.launcher import ExpertPool

        self.pool = ExpertPool.start(model_dir, config)
        self.apps: set[str] = set()
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._watch_apps, name="app-watch", daemon=True).start()

    def ready(self) -> int:
        return len(self.pool.shards)

    def attach(self, app_name: str) -> None:
        """The pool serves `app_name`: stop it once that app (and every other attached one)
        is gone."""
        with self._lock:
            self.apps.add(app_name)

    def shutdown(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.pool.shutdown()

    def _watch_apps(self) -> None:
        while not self._stopped:
            time.sleep(APP_WATCH_INTERVAL_S)
            with self._lock:
                apps = set(self.apps)
            if not apps or serve_apps_exist(apps):
                continue
            log.warning("Serve app %s is gone: stopping its expert pool", sorted(apps))
            self.shutdown()
            ray.kill(ray.get_runtime_context().current_actor)


def serve_apps_exist(names: set[str]) -> bool:
    """Whether any of the Serve apps `names` exists (False once Serve itself is shut down)."""
    from ray import serve
    from ray.serve import context
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:  # no Serve controller: `serve shutdown`
        return False
    try:
        apps = serve.status().applications
    except Exception:  # a stale client or a busy controller: reconnect, decide next time
        context._disconnect()
        return True
    return any(name in apps for name in names)


def pool_owner_running() -> bool:
    """Whether the detached pool's owner actor (see PoolOwner) is alive."""
    return _owner() is not None


def pool_running() -> bool:
    from cluster.controllers import NAMESPACE, PLACEMENT_CONTROLLER

    try:
        ray.get_actor(PLACEMENT_CONTROLLER, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def ensure_expert_pool(model_dir: str, config: ClusterConfig) -> bool:
    """Start config.experts.shards shards in a detached owner unless a pool is running;
    True if this call started it (the app should then attach to it)."""
    from cluster.controllers import NAMESPACE

    if pool_running():
        log.info("expert pool already running: reusing it")
        return _owner() is not None
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
    return True


def _owner():
    from cluster.controllers import NAMESPACE

    try:
        return ray.get_actor(OWNER_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def attach_app_to_pool(app_name: str) -> ray.ObjectRef | None:
    """Tie the detached pool's lifetime to the Serve app `app_name` (see PoolOwner); returns
    the call's ref (None if there is no detached pool)."""
    owner = _owner()
    if owner is None:
        log.warning("no detached expert pool to attach app %r to", app_name)
        return None
    return owner.attach.remote(app_name)


def stop_detached_pool() -> bool:
    """Shut down a pool started by ensure_expert_pool; False if there was none."""
    owner = _owner()
    if owner is None:
        return False
    try:
        ray.get(owner.shutdown.remote(), timeout=60)
    except ray.exceptions.RayActorError:
        pass  # the owner stopped the pool and itself meanwhile (its app is gone)
    finally:
        ray.kill(owner)
    return True
