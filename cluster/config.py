"""Cluster/runtime configuration: frozen dataclasses loaded from YAML and validated.

Unknown keys and bad values are rejected with a message naming the full key path
(e.g. `experts.placement: expected one of [...]`). Per-actor variants are made with
`dataclasses.replace`, never by mutation.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.autoscaler import ShardAutoscalingConfig
from cluster.expert_load import LoadThresholds
from cluster.rebalancer import RebalanceConfig
from router.security import TOKEN_ENV, SecurityConfigError, TLSFiles, check_token
from workers.cache_config import CacheConfig
from workers.config import COMPUTE_DTYPES
from workers.quant import EXPERT_DTYPES
from workers.requests import EngineConfig

ROOT = Path(__file__).resolve().parents[1]  # the repository (relative config paths)
PLACEMENTS = ("spread", "strict_spread", "pack")
DTYPES = tuple(COMPUTE_DTYPES)


class ClusterConfigError(ValueError):
    """A cluster YAML key is unknown or its value invalid; the message names the key path."""


@dataclass(frozen=True)
class HealthConfig:
    """How the pool controller tells a dead shard from a slow one (`experts.health`)."""

    probe_interval_s: float = 1.0  # ping every shard this often
    probe_timeout_s: float = 10.0  # a ping slower than this is a failed probe
    probe_failures: int = 3  # consecutive failed probes = dead (Ray's actor death: at once)
    start_timeout_s: float = 300.0  # a new shard must be serving within this


@dataclass(frozen=True)
class TLSConfig:
    """TLS of the expert RPC (PEM paths, present on every node)."""

    cert: str | None = None  # shard certificate; with `key`, shards serve TLS only
    key: str | None = None
    ca: str | None = None  # CA bundle routers verify shard certificates with
    server_name: str | None = None  # name checked in the certificate instead of the shard IP


@dataclass(frozen=True)
class ExpertsConfig:
    shards: int = 2  # expert-shard actors (0 = experts local in every dense replica)
    placement: str = "spread"  # Ray placement-group strategy for the shards
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    rpc_timeout_s: float = 30.0  # one shard call; past it the call is a shard fault
    max_message_mb: int = 256
    # routed-expert storage: float32 | bfloat16 | int8 | int4 (weight-only, fp32 scales;
    # workers/quant.py); null = the compute dtype (`dtype`). Shards and local experts alike.
    dtype: str | None = None
    # extra (layer, expert) copies a shard may hold per layer beyond its share ceil(E / shards)
    # (the rebalancer's memory budget: redundant_per_shard x layers x one expert's bytes)
    redundant_per_shard: int = 0
    # Ray restarts a dead shard actor in place up to this many times (the pool controller then
    # re-syncs its experts and address); 0: the controller starts a replacement instead
    max_restarts: int = 0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per shard
    load: LoadThresholds = field(default_factory=LoadThresholds)
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)
    autoscaling: ShardAutoscalingConfig = field(default_factory=ShardAutoscalingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    # how long a step may wait for the pool to bring back experts with no live replica
    recovery_timeout_s: float = 60.0
    # send a call slower than this to a replica as well (first answer wins); null = off
    hedge_after_s: float | None = None
    token: str | None = None  # cluster token of the expert RPC (or EXPERTMESH_CLUSTER_TOKEN)
    bind_host: str | None = None  # shards bind this address; null = the node IP
    tls: TLSConfig = field(default_factory=TLSConfig)

    def cluster_token(self) -> str | None:
        """`token`, else the EXPERTMESH_CLUSTER_TOKEN environment variable, else None."""
        return self.token or os.environ.get(TOKEN_ENV) or None

    def tls_files(self) -> TLSFiles | None:
        t = self.tls
        return TLSFiles(t.cert, t.key, t.ca, t.server_name) if t.cert else None


@dataclass(frozen=True)
class AutoscalingConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0


@dataclass(frozen=True)
class DenseConfig:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_prefill_chunk: int = 512
    max_model_len: int = 4096
    max_queue: int = 256
    # ping-pong micro-batches per step (2 overlaps dense compute with expert calls when the
    # shards are on other nodes; on one small node it only adds calls)
    micro_batches: int = 1
    # torch threads of a step: below wide_step_tokens tokens (low-concurrency decode)
    # torch_threads (null: the replica's CPUs - 1, a core left to streaming), from it
    # wide_step_threads (null: all its CPUs); workers/resources.py StepThreads
    torch_threads: int | None = None
    wide_step_threads: int | None = None
    wide_step_tokens: int = 16
    # tokens per streamed delta after a request's first (vLLM's --stream-interval; the last
    # delta goes at once): each delta costs the serving path the same CPU, so a few tokens per
    # delta leave the cores to the model (workers/async_engine.py); 1 = every token on its own
    stream_interval: int = 4
    # hybrid cache (workers/cache_config.py): one memory budget for KV blocks, DeltaNet states
    # and prefix snapshots; kv_cache_gb, or kv_cache_fraction of the memory available at
    # start, or (neither) what max_num_seqs full-length sequences need
    kv_cache_gb: float | None = None
    kv_cache_fraction: float | None = None
    kv_block_size: int = 16
    prefix_caching: bool = True
    prefix_snapshot_every: int = 512
    prefix_snapshot_fraction: float = 0.1
    # opt-in KV eviction: "sink_window" keeps kv_sink_tokens + the last kv_window_tokens of
    # each sequence in the attention layers (inexact; such sequences skip the prefix cache)
    kv_eviction: str = "none"
    kv_sink_tokens: int = 64
    kv_window_tokens: int = 2048
    # Serve routes a request to the replica holding its prompt's prefix unless that replica
    # has more than prefix_routing_imbalance ongoing requests above the least loaded one
    prefix_routing: bool = True
    prefix_routing_imbalance: int = 8
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    # custom Ray resources each dense replica needs (e.g. one only the dense nodes have)
    resources: dict[str, float] = field(default_factory=dict)

    def cache_config(self) -> CacheConfig:
        names = [f.name for f in dataclasses.fields(CacheConfig)]
        return CacheConfig(**{name: getattr(self, name) for name in names})

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_prefill_chunk=self.max_prefill_chunk,
            max_model_len=self.max_model_len,
            max_queue=self.max_queue,
        )


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    model_name: str = ""  # served model id; default: the checkpoint directory's name
    # clients must send `Authorization: Bearer <key>` (HTTP) or the same metadata (gRPC);
    # "" = the EXPERTMESH_API_KEY environment variable, or no key. Health probes stay open.
    api_key: str = ""
    drain_grace_s: float = 5.0  # on SIGTERM: seconds in-flight requests get to finish
    max_body_mb: float = 8.0  # larger HTTP bodies / gRPC messages are refused (413)
    # a request whose dense replica died waits this long for a live one to resume on
    replica_loss_timeout_s: float = 60.0
    # custom Ray resources the HTTP and gRPC ingress replicas need (e.g. a resource only the
    # head node has, so that the front ends stay where the proxy is)
    resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterConfig:
    model: str | None = None  # HF checkpoint dir; None = the embedded demo model
    dtype: str = "float32"
    ray_address: str | None = None  # join this Ray cluster; None = start a local one
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as exc:
            raise ClusterConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ClusterConfigError(f"{path}: not valid YAML ({exc})") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> ClusterConfig:
        return _build(cls, raw, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "config"
        raise ClusterConfigError(f"{where}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ClusterConfigError(f"{path}: unknown key (expected one of {sorted(fields)})")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ClusterConfigError as exc:
        raise ClusterConfigError(f"{prefix}{exc}") from None


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{path}.")
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ClusterConfigError(f"{path}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(hint)
        return {
            _coerce(key_type, k, f"{path}.{k}"): _coerce(value_type, v, f"{path}.{k}")
            for k, v in value.items()
        }
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for t in options:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t in (int, str, bool) and type(value) is t:
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise ClusterConfigError(f"{path}: expected {names}, got {value!r}")


def _validate(c: ClusterConfig) -> None:
    rules: list[tuple[bool, str, str]] = [
        (c.dtype in DTYPES, "dtype", f"expected one of {list(DTYPES)}"),
        (c.experts.dtype is None or c.experts.dtype in EXPERT_DTYPES, "experts.dtype",
         f"expected one of {list(EXPERT_DTYPES)} or null"),
        (c.experts.placement in PLACEMENTS, "experts.placement",
         f"expected one of {list(PLACEMENTS)}"),
        (c.experts.shards >= 0, "experts.shards", "must be >= 0"),
        (c.experts.num_cpus >= 0, "experts.num_cpus", "must be >= 0"),
        (c.experts.num_gpus >= 0, "experts.num_gpus", "must be >= 0"),
        (c.experts.rpc_timeout_s > 0, "experts.rpc_timeout_s", "must be > 0"),
        (c.experts.max_message_mb > 0, "experts.max_message_mb", "must be > 0"),
        *_expert_pool_rules(c.experts),
        (c.experts.recovery_timeout_s > 0, "experts.recovery_timeout_s", "must be > 0"),
        (c.experts.hedge_after_s is None or c.experts.hedge_after_s > 0,
         "experts.hedge_after_s", "must be > 0 (or null: no hedging)"),
        (c.experts.bind_host != "", "experts.bind_host", "must be an address (or null: node IP)"),
        (c.dense.num_cpus >= 0, "dense.num_cpus", "must be >= 0"),
        (1 <= c.dense.micro_batches <= 8, "dense.micro_batches", "must be in [1, 8]"),
        (c.dense.torch_threads is None or c.dense.torch_threads >= 1, "dense.torch_threads",
         "must be >= 1 (or null: the replica's CPUs - 1)"),
        (c.dense.wide_step_threads is None or c.dense.wide_step_threads >= 1,
         "dense.wide_step_threads", "must be >= 1 (or null: the replica's CPUs)"),
        (c.dense.wide_step_tokens >= 1, "dense.wide_step_tokens", "must be >= 1"),
        (c.dense.stream_interval >= 1, "dense.stream_interval", "must be >= 1 token"),
        (c.dense.prefix_routing_imbalance >= 0, "dense.prefix_routing_imbalance", "must be >= 0"),
        (c.dense.autoscaling.min_replicas >= 1, "dense.autoscaling.min_replicas", "must be >= 1"),
        (c.dense.autoscaling.max_replicas >= c.dense.autoscaling.min_replicas,
         "dense.autoscaling.max_replicas", "must be >= min_replicas"),
        (c.dense.autoscaling.target_ongoing_requests > 0,
         "dense.autoscaling.target_ongoing_requests", "must be > 0"),
        (0 <= c.server.http_port < 65536, "server.http_port", "must be a port number"),
        (0 <= c.server.grpc_port < 65536, "server.grpc_port", "must be a port number"),
        (c.server.drain_grace_s >= 0, "server.drain_grace_s", "must be >= 0"),
        (c.server.max_body_mb > 0, "server.max_body_mb", "must be > 0"),
        (c.server.replica_loss_timeout_s > 0, "server.replica_loss_timeout_s", "must be > 0"),
    ]  # fmt: skip
    for name, amount in c.dense.resources.items():
        rules.append((name not in ("CPU", "GPU", "memory", ""), f"dense.resources.{name}",
                      "use dense.num_cpus / num_gpus for CPU and GPU"))  # fmt: skip
        rules.append((amount > 0, f"dense.resources.{name}", "must be > 0"))
    for name, amount in c.server.resources.items():
        rules.append((name not in ("CPU", "GPU", "memory", ""), f"server.resources.{name}",
                      "custom resources only (each ingress takes 0.1 CPU)"))  # fmt: skip
        rules.append((amount > 0, f"server.resources.{name}", "must be > 0"))
    for ok, key, message in rules:
        if not ok:
            raise ClusterConfigError(f"{key}: {message}")
    try:
        c.dense.engine_config()
        c.dense.cache_config()
    except ValueError as exc:
        raise ClusterConfigError(f"dense.{exc}") from None
    _validate_security(c.experts)


def _validate_security(e: ExpertsConfig) -> None:
    try:
        check_token(e.token)
    except SecurityConfigError as exc:
        raise ClusterConfigError(f"experts.token: {exc}") from None
    t = e.tls
    given = {name: getattr(t, name) for name in ("cert", "key", "ca")}
    if any(given.values()) or t.server_name:
        missing = [name for name, path in given.items() if not path]
        if missing:
            raise ClusterConfigError(
                f"experts.tls.{missing[0]}: required with TLS (cert, key and ca go together)"
            )
    for name in ("cert", "key", "ca"):
        path = getattr(t, name)
        if path and not Path(path).is_file():
            raise ClusterConfigError(f"experts.tls.{name}: file not found: {path}")


def _expert_pool_rules(e: ExpertsConfig) -> list[tuple[bool, str, str]]:
    """Rules of the elastic pool's keys (load window, rebalancer, autoscaler, health)."""
    a, r, w, h = e.autoscaling, e.rebalance, e.load, e.health
    rules = [
        (e.redundant_per_shard >= 0, "experts.redundant_per_shard", "must be >= 0"),
        (e.max_restarts >= 0, "experts.max_restarts", "must be >= 0"),
        (w.window_s > 0, "experts.load.window_s", "must be > 0"),
        (w.collapse_top_n >= 1, "experts.load.collapse_top_n", "must be >= 1"),
        (0 < w.collapse_share <= 1, "experts.load.collapse_share", "must be in (0, 1]"),
        (w.min_pairs >= 0, "experts.load.min_pairs", "must be >= 0"),
        (r.interval_s >= 0, "experts.rebalance.interval_s", "must be >= 0"),
        (r.trigger >= 1, "experts.rebalance.trigger", "must be >= 1 (max/mean imbalance)"),
        (0 <= r.min_gain < 1, "experts.rebalance.min_gain", "must be in [0, 1)"),
        (r.min_pairs >= 0, "experts.rebalance.min_pairs", "must be >= 0"),
        (h.probe_interval_s > 0, "experts.health.probe_interval_s", "must be > 0"),
        (h.probe_timeout_s > 0, "experts.health.probe_timeout_s", "must be > 0"),
        (h.probe_failures >= 1, "experts.health.probe_failures", "must be >= 1"),
        (h.start_timeout_s > 0, "experts.health.start_timeout_s", "must be > 0"),
        (0 < a.target_load <= 1, "experts.autoscaling.target_load", "must be in (0, 1]"),
        (a.upscale_delay_s >= 0, "experts.autoscaling.upscale_delay_s", "must be >= 0"),
        (a.downscale_delay_s >= 0, "experts.autoscaling.downscale_delay_s", "must be >= 0"),
        (a.min_shards >= 1, "experts.autoscaling.min_shards", "must be >= 1"),
        (a.max_shards >= a.min_shards, "experts.autoscaling.max_shards", "must be >= min_shards"),
    ]
    for name, amount in e.resources.items():
        rules.append((name not in ("CPU", "GPU", "memory", ""), f"experts.resources.{name}",
                      "use experts.num_cpus / num_gpus for CPU and GPU"))  # fmt: skip
        rules.append((amount > 0, f"experts.resources.{name}", "must be > 0"))
    if a.enabled:
        rules += [
            (e.shards >= 1, "experts.autoscaling.enabled", "needs expert shards (shards >= 1)"),
            (a.min_shards <= e.shards <= a.max_shards, "experts.shards",
             f"must be within autoscaling [{a.min_shards}, {a.max_shards}] (the start size)"),
        ]  # fmt: skip
    return rules


def load_config(args: dict[str, Any]) -> ClusterConfig:
    """args: optional `config` (cluster YAML path; relative to the cwd or the repo root) and
    inline overrides of any config keys (nested mappings are merged)."""
    overrides = {k: v for k, v in (args or {}).items() if k != "config"}
    raw: dict[str, Any] = {}
    if args and args.get("config"):
        path = Path(args["config"])
        if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
            path = ROOT / path
        raw = ClusterConfig.from_yaml(path).to_dict()
    return ClusterConfig.from_dict(_merge(raw, overrides))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
