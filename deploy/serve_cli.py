"""`expertmesh serve`: the model behind an OpenAI-compatible HTTP API and a gRPC API on Ray Serve.

expertmesh serve                                  # embedded demo model, 2 expert shards
expertmesh serve --model DIR --config deploy/configs/local-experts.yaml --http-port 8080
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

from cluster.cli import UsageError
from cluster.config import ClusterConfig, ClusterConfigError

APP_NAME = "expertmesh"


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the model over HTTP (OpenAI API) and gRPC")
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: the demo model)")
    p.add_argument("--config", default=None, help="cluster YAML (see deploy/configs/)")
    p.add_argument("--host", default=None, help="bind address (server.host)")
    p.add_argument("--http-port", type=int, default=None, help="server.http_port")
    p.add_argument("--grpc-port", type=int, default=None, help="server.grpc_port")
    p.add_argument("--model-name", default=None, help="served model id (server.model_name)")
    p.add_argument(
        "--expert-shards",
        type=int,
        default=None,
        metavar="N",
        help="experts.shards (0 = experts local in every dense replica)",
    )
    p.add_argument(
        "--dense-replicas",
        type=int,
        default=None,
        metavar="N",
        help="fixed number of dense replicas (autoscaling min = max = N)",
    )
    p.set_defaults(func=_serve)
    return p


def serve_config(args: argparse.Namespace) -> ClusterConfig:
    """--config file (or the defaults) with the command-line overrides applied."""
    from cluster.config import load_config

    overrides: dict[str, Any] = {}
    if args.model is not None:
        overrides["model"] = args.model
    server = {
        "host": args.host,
        "http_port": args.http_port,
        "grpc_port": args.grpc_port,
        "model_name": args.model_name,
    }
    if any(v is not None for v in server.values()):
        overrides["server"] = {k: v for k, v in server.items() if v is not None}
    if args.expert_shards is not None:
        overrides["experts"] = {"shards": args.expert_shards}
    if args.dense_replicas is not None:
        n = args.dense_replicas
        overrides["dense"] = {"autoscaling": {"min_replicas": n, "max_replicas": n}}
    try:
        return load_config({"config": args.config, **overrides})
    except ClusterConfigError as exc:
        raise UsageError(f"{args.config or 'config'}: {exc}") from None


def _serve(args: argparse.Namespace) -> int:
    from deploy.bootstrap import resolve_model

    config = serve_config(args)
    if config.model and not Path(config.model, "config.json").is_file():
        raise UsageError(f"--model: no config.json in {config.model}")
    config = resolve_model(config)
    if config.ray_address is None:  # one machine: refuse what cannot fit (cluster/plan.py)
        from cluster.plan import check_fits

        check_fits(config, config.model)
    run(config)
    return 0


def run(config: ClusterConfig, stop: threading.Event | None = None) -> None:
    """Start (or join) Ray, the expert pool and the Serve app; block until `stop` is set (by
    SIGINT/SIGTERM when None); then tear everything down."""
    import ray
    from ray import serve

    from cluster.launcher import ExpertPool, init_ray
    from deploy.app import build_app
    from deploy.bootstrap import pool_running, served_model_name

    d, e, s = config.dense, config.experts, config.server
    init_ray(
        config.ray_address, e.shards * e.num_cpus + d.num_cpus * d.autoscaling.max_replicas + 1
    )
    stop = stop or _signal_event()  # after ray.init, which installs its own SIGTERM handler
    pool = None
    try:
        if e.shards > 0 and not pool_running():
            pool = ExpertPool.start(config.model, config)
        serve.start(http_options={"host": s.host, "port": s.http_port})
        serve.run(build_app(config, config.model), name=APP_NAME, blocking=False)
        _print_endpoints(config, served_model_name(config, config.model))
        while not stop.wait(1.0):
            pass
    finally:
        _teardown(serve, ray, pool, joined=bool(config.ray_address))


def _print_endpoints(config: ClusterConfig, model_name: str) -> None:
    s = config.server
    print(f"expertmesh: serving model {model_name!r} ({config.model})")
    print(f"  OpenAI API: http://{s.host}:{s.http_port}/v1")
    print(f"  gRPC:       {s.host}:{s.grpc_port} (expertmesh.v1.Generation)")
    n = config.experts.shards
    experts = f"{n} expert-shard actors" if n else "local to every dense replica"
    print(f"  experts:    {experts}; Ctrl-C to stop", flush=True)


def _signal_event() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _teardown(serve: Any, ray: Any, pool: Any, joined: bool) -> None:
    print("expertmesh: shutting down", flush=True)
    try:
        if joined:  # leave the other apps of a shared cluster alone
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    finally:
        if pool is not None:
            pool.shutdown()
        ray.shutdown()
