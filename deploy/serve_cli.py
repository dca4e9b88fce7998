"""`expertmesh serve`: the model behind an OpenAI-compatible HTTP API and a gRPC API on Ray Serve.

expertmesh serve                                  # embedded demo model, 2 expert shards
expertmesh serve --model DIR --config deploy/configs/local-experts.yaml --http-port 8080
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.cli import UsageError
from cluster.config import ClusterConfig, ClusterConfigError
from deploy.auth import resolve_api_key
from deploy.console import Console, quiet_ray

APP_NAME = "expertmesh"
WATCH_INTERVAL_S = 1.0


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
    p.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="Ray's and Serve's logs at INFO (same as `expertmesh -v serve`)",
    )  # fmt: skip
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
    if config.ray_address is None:  # one machine: fail fast on a taken port, naming it
        check_ports_free(config)
    config = resolve_model(config, progress=True)
    if config.ray_address is None:  # one machine: refuse what cannot fit (cluster/plan.py)
        from cluster.plan import check_fits

        check_fits(config, config.model)
    try:
        cache_line(config)  # a cache budget that cannot hold one sequence: say so now
    except ValueError as exc:
        raise UsageError(f"dense.{exc}") from None
    run(config, verbose=args.verbose)
    # Everything is stopped and printed; the interpreter's native teardown (Ray's core worker,
    # gRPC) would take seconds more, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_ports_free(config: ClusterConfig) -> None:
    """UsageError naming the key and address when the HTTP or gRPC port is taken."""
    s = config.server
    for key, port in (("server.http_port", s.http_port), ("server.grpc_port", s.grpc_port)):
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((s.host, port))
            except OSError as exc:
                raise UsageError(
                    f"{key}: {s.host}:{port} is not available ({exc.strerror}); "
                    f"stop what uses it or pick another port"
                ) from None


def run(
    config: ClusterConfig,
    stop: threading.Event | None = None,
    verbose: bool = False,
    console: Console | None = None,
) -> None:
    """Start (or join) Ray, the expert pool and the Serve app, printing progress; block until
    `stop` is set (by SIGINT/SIGTERM when None), reporting faults and recoveries; then drain
    (server.drain_grace_s) and tear everything down."""
    import ray
    from ray import serve

    from cluster.launcher import ExpertPool, init_ray
    from deploy.app import build_app
    from deploy.bootstrap import pool_running

    con = console or Console()
    quiet_ray(verbose)
    d, e, s = config.dense, config.experts, config.server
    start_pool = e.shards > 0
    total = 3 + start_pool
    cpus = e.shards * e.num_cpus + d.num_cpus * d.autoscaling.max_replicas + 1
    where = f"joining {config.ray_address}" if config.ray_address else "local"
    with con.step(1, total, f"starting Ray ({where})"):
        init_ray(config.ray_address, cpus)
    signals = _Signals()
    stop = stop or signals.install()  # after ray.init, which installs its own SIGTERM handler
    pool, deployed = None, False
    try:
        if start_pool and not pool_running():
            with con.step(2, total, _pool_message(config)):
                pool = ExpertPool.start(config.model, config, on_shard_ready=_shard_printer(con))
        elif start_pool:
            con.line(f"[2/{total}] expert pool already running: reusing it")
        with con.step(total - 1, total, f"starting Ray Serve (HTTP on {s.host}:{s.http_port})"):
            serve.start(
                proxy_location="HeadOnly", http_options={"host": s.host, "port": s.http_port}
            )
        replicas = d.autoscaling.min_replicas
        what = f"deploying {replicas} dense replica(s) and the HTTP and gRPC front ends"
        with con.step(total, total, what, status=_deployment_status):
            deployed = True
            serve.run(build_app(config, config.model), name=APP_NAME, blocking=False)
        print_banner(con, config)
        _watch(con, stop, pool=start_pool)
    finally:
        _teardown(con, serve, ray, pool, config, deployed, signals)


def _pool_message(config: ClusterConfig) -> str:
    from workers.config import ModelConfig

    n = config.experts.shards
    try:
        m = ModelConfig.from_hf(config.model)
        size = _expert_bytes(m) / 2**20
        return f"starting {n} expert shards ({size:.0f} MiB of expert weights to load)"
    except Exception:
        return f"starting {n} expert shards"


def _expert_bytes(m: Any) -> int:
    from workers.config import COMPUTE_DTYPES

    itemsize = COMPUTE_DTYPES.get(m.torch_dtype, COMPUTE_DTYPES["float32"]).itemsize
    per_expert = 3 * m.moe_intermediate_size * m.hidden_size * itemsize
    return m.num_hidden_layers * m.num_experts * per_expert


def _shard_printer(con: Console) -> Callable[[int, dict[str, Any]], None]:
    start = time.monotonic()

    def report(index: int, info: dict[str, Any]) -> None:
        experts = info.get("experts", ())
        count = sum(len(v) for v in experts.values()) if isinstance(experts, dict) else len(experts)
        name = info.get("shard_id", f"shard-{index}")
        con.detail(f"{name} loaded ({count} experts) at {time.monotonic() - start:.1f} s")

    return report


def _deployment_status() -> str:
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return "waiting for the Serve controller"
    parts = []
    for name, dep in app.deployments.items():
        states = {str(k).split(".")[-1]: v for k, v in dep.replica_states.items()}
        total = sum(states.values())
        parts.append(f"{name} {states.get('RUNNING', 0)}/{total} running")
    return ", ".join(parts) or str(app.status)


def print_banner(con: Console, config: ClusterConfig) -> None:
    from deploy.bootstrap import is_demo_model, served_model_name

    s, e, d = config.server, config.experts, config.dense
    name = served_model_name(config, config.model)
    base = f"http://{s.host}:{s.http_port}"
    con.line(f"ready in {con.elapsed():.1f} s")
    con.detail(f"model:      {name} ({config.model})")
    if is_demo_model(config.model):
        con.detail("            the demo model has RANDOM weights: its output is random text")
        con.detail("            (replacement characters and control bytes included); pass")
        con.detail("            --model DIR to serve a real Qwen3-Next checkpoint")
    con.detail(f"OpenAI API: {base}/v1   (docs: {base}/docs)")
    con.detail(f"gRPC:       {s.host}:{s.grpc_port} (expertmesh.v1.Generation)")
    con.detail(f"health:     {base}/health/ready   metrics: {base}/metrics")
    experts = f"{e.shards} expert shards" if e.shards else "experts local to each replica"
    replicas = d.autoscaling.min_replicas
    con.detail(f"cluster:    {experts}; {replicas} dense replica(s)")
    con.detail(f"cache:      {cache_line(config)} per dense replica")
    if resolve_api_key(s.api_key):
        con.detail("API key:    required (Authorization: Bearer <key>)")
    example = json.dumps({"model": name, "prompt": "def fib(n):", "max_tokens": 16})
    con.detail(f"try:        curl {base}/v1/completions -H 'Content-Type: application/json' \\")
    con.detail(f"              -d '{example}'")
    con.detail(
        f"stop:       Ctrl-C or SIGTERM (in-flight requests get {s.drain_grace_s:g} s to finish)"
    )


def cache_line(config: ClusterConfig) -> str:
    """The hybrid cache's memory plan (each replica logs its own as it starts)."""
    from workers.cache_config import plan_cache
    from workers.config import ModelConfig, compute_dtype

    d = config.dense
    cache = d.cache_config()
    model = ModelConfig.from_hf(config.model)
    plan = plan_cache(model, compute_dtype(config.dtype), d.max_num_seqs, d.max_model_len, cache)
    return f"{plan.describe()}; prefix caching {'on' if cache.caches_prefixes else 'off'}"


def _ingresses() -> list[Any]:
    from ray import serve

    return [serve.get_deployment_handle(n, APP_NAME) for n in ("OpenAIIngress", "GrpcIngress")]


def _watch(con: Console, stop: threading.Event, pool: bool) -> None:
    """Until stop: print the faults and recoveries the front ends saw and the expert pool's
    events (replica and shard logs do not reach this console)."""
    handles = _ingresses()
    seen = [_last_event(h) for h in handles]
    pool_events = PoolEvents() if pool else None
    while not stop.wait(WATCH_INTERVAL_S):
        for i, handle in enumerate(handles):
            try:
                events = handle.events.remote(seen[i]).result(timeout_s=WATCH_INTERVAL_S * 5)
            except Exception:  # a busy or restarting ingress: try again next time
                continue
            for seq, _, message in events:
                seen[i] = max(seen[i], seq)
                con.line(message)
        if pool_events is not None:
            for message in pool_events.new():
                con.line(message)


class PoolEvents:
    """New events of the expert pool's controller (`events_since(seq)`: shard faults,
    replacements, scaling); nothing from a controller without them."""

    def __init__(self) -> None:
        self.seq: int | None = None
        self.supported = True

    def new(self) -> list[str]:
        import ray

        from cluster.controllers import NAMESPACE, PLACEMENT_CONTROLLER

        if not self.supported:
            return []
        try:
            controller = ray.get_actor(PLACEMENT_CONTROLLER, namespace=NAMESPACE)
            events = ray.get(controller.events_since.remote(self.seq or 0), timeout=5)
        except AttributeError:
            self.supported = False
            return []
        except Exception:  # the controller is restarting: next time
            return []
        fresh = self.seq is None  # the first call only learns where the log is
        self.seq = max([self.seq or 0, *(e["seq"] for e in events)])
        if fresh:
            return []
        return [f"expert pool: {e['message']}" for e in events]


def _last_event(handle: Any) -> int:
    try:
        events = handle.events.remote(0).result(timeout_s=30)
    except Exception:
        return 0
    return max((seq for seq, _, _ in events), default=0)


class _Signals:
    """First SIGINT/SIGTERM: stop (drain, then tear down); a second one: skip the drain."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.force = threading.Event()

    def install(self) -> threading.Event:
        def handler(*_: Any) -> None:
            (self.force if self.stop.is_set() else self.stop).set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)
        return self.stop


def _drain(con: Console, grace_s: float, force: threading.Event) -> dict[str, int]:
    """Ask both front ends to drain; wait for them (or a second Ctrl-C)."""
    try:
        calls = [h.drain.remote(grace_s) for h in _ingresses()]
    except Exception:
        return {}
    summary = {"inflight": 0, "finished": 0, "cut": 0}
    start = time.monotonic()
    deadline, told = start + grace_s + 10.0, False
    for call in calls:
        while not force.is_set() and time.monotonic() < deadline:
            try:
                result = call.result(timeout_s=0.25)
            except TimeoutError:
                if not told and time.monotonic() - start > 0.5:
                    con.line(
                        f"stopping: in-flight requests get up to {grace_s:g} s to finish "
                        f"(Ctrl-C again to stop now)"
                    )
                    told = True
                continue
            except Exception:
                break
            for k in summary:
                summary[k] += int(result.get(k, 0))
            break
    return summary


def _teardown(
    con: Console,
    serve: Any,
    ray: Any,
    pool: Any,
    config: ClusterConfig,
    deployed: bool,
    signals: _Signals,
) -> None:
    """Drain the front ends, stop the app (only ours on a shared cluster), the pool we
    started, and Ray (a local Ray takes every process of this cluster with it)."""
    start = time.monotonic()
    joined = bool(config.ray_address)
    summary: dict[str, int] = {}
    try:
        if deployed:
            summary = _drain(con, config.server.drain_grace_s, signals.force)
        if joined and deployed:
            serve.delete(APP_NAME)
    except Exception as exc:
        con.line(f"stopping the app failed: {exc!r}")
    finally:
        if pool is not None:
            pool.shutdown()
        ray.shutdown()
    words = [f"stopped in {time.monotonic() - start:.1f} s"]
    if summary.get("inflight"):
        words.append(
            f"({summary['finished']} in-flight request(s) finished, {summary['cut']} cut off "
            f"after the {config.server.drain_grace_s:g} s grace)"
        )
    con.line(" ".join(words))
