"""`expertmesh bench chaos`: concurrent greedy streams against the served cluster while parts
of it are killed at random moments; does anything fail, does anything change, how long until
the cluster is whole again, and what the faults cost in latency. Also what the API key plus
the expert RPC's cluster token and TLS cost in throughput.

    expertmesh bench chaos                                   # 4 shards, 64 streams, one node
    expertmesh bench chaos --nodes 3 --faults node           # a simulated 3-node cluster

Rounds: one undisturbed baseline, then one round per fault: `shard-kill` (ray.kill of a
shard actor), `shard-sigkill` (SIGKILL of a shard's process), `dense-kill` (ray.kill of a
dense replica), `node` (a worker node removed; needs --nodes >= 2). Each fault fires at a
seeded random moment between 15% and 60% of the baseline's duration. Outputs are compared
token by token with the baseline; a difference counts as a near-tie when the baseline's top-2
logit margin at the first differing position is below NEAR_TIE (re-prefill after a resume and
the recurrent decode differ by ~1e-5). The Serve app is built by `build_app(config,
model_dir)`, injected by deploy/ (as for `bench e2e --mode serve`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.bench import free_port, machine_info, percentile, random_prompts, sse_lines
from cluster.bench.report import markdown_table, write_json, write_markdown

FAULTS = ("shard-kill", "shard-sigkill", "dense-kill", "node")
NEAR_TIE = 1e-3
APP = "expertmesh-chaos"
NAMESPACE = "expertmesh"


@dataclass
class Stream:
    """What one client saw."""

    ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # arrival of each chunk with tokens
    start: float = 0.0
    end: float = 0.0
    status: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    def max_gap(self) -> float:
        marks = [self.start, *self.times]
        return max((b - a for a, b in zip(marks, marks[1:], strict=False)), default=0.0)


@dataclass
class Settings:
    model_dir: str
    shards: int = 4
    streams: int = 64
    max_tokens: int = 48
    prompt_len: tuple[int, int] = (8, 48)
    dense_replicas: int = 2
    nodes: int = 1
    faults: tuple[str, ...] = ("shard-kill", "shard-sigkill", "dense-kill")
    seed: int = 0
    security: bool = True
    recovery_timeout_s: float = 180.0


# ---------------------------------------------------------------------------------- clients
async def _one(http: Any, body: dict[str, Any], out: Stream, headers: dict[str, str]) -> None:
    out.start = time.monotonic()
    try:
        async with http.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = (await r.aread()).decode(errors="replace")[:200]
                return
            async for line in sse_lines(r):
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = chunk["error"].get("message", "error")
                    return
                for choice in chunk.get("choices", ()):
                    ids = choice.get("token_ids") or []
                    if ids:
                        out.ids += ids
                        out.times.append(time.monotonic())
    except Exception as exc:  # a broken connection is a failed request
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        out.end = time.monotonic()


async def _round(
    url: str, prompts: list[list[int]], max_tokens: int, headers: dict[str, str],
    during: Callable[[list[Stream]], Any] | None = None,
) -> tuple[list[Stream], float, float, Any]:  # fmt: skip
    """All prompts as concurrent greedy streams; `during(streams)` runs beside them (the
    fault injector). Returns (streams, start, end, what `during` returned)."""
    import httpx

    streams = [Stream() for _ in prompts]
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.monotonic()
        tasks = [
            asyncio.create_task(_one(http, _body(p, max_tokens), s, headers))
            for p, s in zip(prompts, streams, strict=True)
        ]
        side = asyncio.create_task(during(streams)) if during else None
        await asyncio.gather(*tasks)
        end = time.monotonic()
        result = await side if side else None
    return streams, start, end, result


def _body(prompt: list[int], max_tokens: int) -> dict[str, Any]:
    return {"model": "chaos", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "stream": True}  # fmt: skip


# ----------------------------------------------------------------------------------- faults
class Injector:
    """Kills one part of the cluster and reports when it is whole again."""

    def __init__(self, bench: ChaosCluster, kind: str, rng: random.Random) -> None:
        self.bench, self.kind, self.rng = bench, kind, rng
        self.target = ""

    def fire(self) -> None:
        import ray

        b = self.bench
        if self.kind in ("shard-kill", "shard-sigkill"):
            name, actor = self.rng.choice(b.shard_actors())
            self.target = name
            if self.kind == "shard-kill":
                ray.kill(actor)
            else:
                pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
                os.kill(pid, signal.SIGKILL)  # a process this benchmark's cluster started
        elif self.kind == "dense-kill":
            name, actor = self.rng.choice(b.dense_actors())
            self.target = name
            b.killed_dense.add(name)
            ray.kill(actor)
        elif self.kind == "node":
            node, on_it = b.worker_node_to_kill(self.rng)
            self.target = f"node {node.node_id[:8]} ({', '.join(on_it)})"
            b.killed_dense.update(n for n in on_it if "DenseReplica" in n)
            b.cluster.remove_node(node, allow_graceful=False)
        else:
            raise ValueError(f"unknown fault {self.kind!r} (expected one of {list(FAULTS)})")


@dataclass
class FaultReport:
    fault: str
    target: str
    fired_at_s: float
    failed: int
    equal: int
    near_ties: int
    different: int
    recovery_s: float | None
    missing: str  # what was still missing when the wait ended ("" once whole)
    p99_latency_fault_s: float
    p99_latency_baseline_s: float
    p99_gap_fault_s: float
    p99_gap_baseline_s: float
    tokens_per_s: float
    errors: list[str]


# ---------------------------------------------------------------------------------- cluster
class ChaosCluster:
    """Ray (local, or a ray.cluster_utils.Cluster of `nodes` raylets), the expert pool and
    the Serve app."""

    def __init__(self, s: Settings, build_app: Callable[[Any, str], Any], secure: bool) -> None:
        self.s, self.build_app, self.secure = s, build_app, secure
        self.cluster: Any = None
        self.pool: Any = None
        self.url = ""
        self.headers: dict[str, str] = {}
        self.killed_dense: set[str] = set()  # replica actor names killed by a fault
        self._tmp: tempfile.TemporaryDirectory | None = None

    def config(self) -> Any:
        from cluster.config import load_config

        s = self.s
        experts: dict[str, Any] = {"shards": s.shards, "num_cpus": 0.25}
        server: dict[str, Any] = {"http_port": self.http, "grpc_port": free_port(),
                                  "model_name": "chaos", "drain_grace_s": 1.0}  # fmt: skip
        if self.secure:
            from cluster.bench.pki import write_pki

            assert self._tmp is not None
            pki = write_pki(Path(self._tmp.name))
            experts |= {"token": "chaos-cluster-token",  # shards on the node IP: the
                        "tls": {"cert": str(pki["name_cert"]),  # certificate names a host
                                "key": str(pki["name_key"]), "ca": str(pki["ca"]),
                                "server_name": "expertmesh-shard"}}  # fmt: skip
            server["api_key"] = "chaos-api-key"
            self.headers = {"Authorization": "Bearer chaos-api-key"}
        dense = {"num_cpus": 0.5, "max_num_seqs": s.streams, "max_queue": max(256, s.streams),
                 "autoscaling": {"min_replicas": s.dense_replicas,
                                 "max_replicas": s.dense_replicas}}  # fmt: skip
        if s.nodes > 1:
            server["resources"] = {"expertmesh_head": 0.01}  # the ingress stays on the head
        return load_config({"model": s.model_dir, "experts": experts, "dense": dense,
                            "server": server})  # fmt: skip

    def __enter__(self) -> ChaosCluster:
        import httpx
        import ray
        from ray import serve

        from cluster.controllers import NAMESPACE as ns
        from cluster.launcher import ExpertPool, init_ray

        self._tmp = tempfile.TemporaryDirectory(prefix="chaos-")
        self.http = free_port()
        config = self.config()
        if self.s.nodes > 1:
            from ray.cluster_utils import Cluster

            self.cluster = Cluster(
                initialize_head=True,
                head_node_args={"num_cpus": 1, "resources": {"expertmesh_head": 1}},
            )
            for _ in range(self.s.nodes - 1):
                self.cluster.add_node(num_cpus=2)
            self.cluster.wait_for_nodes()
            ray.init(address=self.cluster.address, namespace=ns, log_to_driver=False)
        else:
            init_ray(None, min_cpus=8)
        self.pool = ExpertPool.start(self.s.model_dir, config)
        serve.start(
            proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": self.http}
        )
        serve.run(self.build_app(config, self.s.model_dir), name=APP, blocking=False)
        self.url = f"http://127.0.0.1:{self.http}"
        deadline = time.monotonic() + 300
        while _get(httpx, f"{self.url}/health/ready") != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the chaos cluster did not become ready in 300 s")
            time.sleep(0.5)
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        try:
            if self.pool is not None:
                self.pool.shutdown()
        finally:
            ray.shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()
            if self._tmp is not None:
                self._tmp.cleanup()

    # ----------------------------------------------------------------- parts
    def shard_actors(self) -> list[tuple[str, Any]]:
        return _named_actors(lambda n: n.startswith("expert-shard-"), NAMESPACE)

    def dense_actors(self) -> list[tuple[str, Any]]:
        return _named_actors(lambda n: n.startswith(f"SERVE_REPLICA::{APP}#DenseReplica#"), "serve")

    def worker_node_to_kill(self, rng: random.Random) -> tuple[Any, list[str]]:
        """A worker node holding a dense replica (and, if any, shards), and what runs there."""
        import ray

        where: dict[str, list[str]] = {}
        for name, actor in [*self.dense_actors(), *self.shard_actors()]:
            node = ray.get(actor.__ray_call__.remote(_node_id), timeout=30)
            where.setdefault(node, []).append(name)
        nodes = [n for n in self.cluster.worker_nodes
                 if any("DenseReplica" in a for a in where.get(n.node_id, ()))]  # fmt: skip
        if not nodes:
            raise RuntimeError("no worker node holds a dense replica")
        node = rng.choice(nodes)
        return node, sorted(where[node.node_id])

    def whole(self) -> bool:
        """Ready, every dense replica running and every shard up."""
        return not self.missing()

    def missing(self) -> str:
        """What keeps the cluster from being whole ("" once it is)."""
        import httpx
        from ray import serve

        ready = _get(httpx, f"{self.url}/health/ready")
        if ready != 200:
            return f"/health/ready answers {ready}"
        app = serve.status().applications.get(APP)
        if app is None:
            return "the Serve app is gone"
        dense = app.deployments.get("DenseReplica")
        running = {str(k).split(".")[-1]: v for k, v in dense.replica_states.items()}
        names = {name for name, _ in self.dense_actors()}
        want = self.s.dense_replicas
        if running.get("RUNNING", 0) < want or len(names) < want:
            return f"{running.get('RUNNING', 0)} of {want} dense replicas running ({running})"
        if names & self.killed_dense:  # Serve has not noticed the death yet
            return "Serve still lists the killed dense replica"
        live = _live_shards()
        return "" if live >= self.s.shards else f"{live} of {self.s.shards} expert shards up"


def _node_id(self: Any) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _named_actors(match: Callable[[str], bool], namespace: str) -> list[tuple[str, Any]]:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == namespace and match(a["name"])]  # fmt: skip
    out = []
    for name in sorted(names):
        try:
            out.append((name, ray.get_actor(name, namespace=namespace)))
        except ValueError:
            continue
    return out


def _live_shards() -> int:
    """'up' shards in the pool controller's table."""
    import ray

    from cluster.controllers import NAMESPACE as ns
    from cluster.controllers import PLACEMENT_CONTROLLER

    try:
        controller = ray.get_actor(PLACEMENT_CONTROLLER, namespace=ns)
        table = ray.get(controller.get.remote(), timeout=10)
    except Exception:
        return 0
    return sum(1 for s in table.shards if s.state == "up")


def _get(httpx: Any, url: str) -> int:
    try:
        return httpx.get(url, timeout=10).status_code
    except Exception:
        return 0


# ------------------------------------------------------------------------------------ runs
def _fault_round(
    bench: ChaosCluster, prompts: list[list[int]], s: Settings, kind: str, at_s: float,
    rng: random.Random,
) -> tuple[list[Stream], float, float, Injector, float, float | None]:  # fmt: skip
    injector = Injector(bench, kind, rng)

    async def during(streams: list[Stream]) -> tuple[float, float | None]:
        await asyncio.sleep(at_s)
        fired = time.monotonic()
        await asyncio.to_thread(injector.fire)
        deadline = fired + s.recovery_timeout_s
        await asyncio.sleep(0.5)
        while time.monotonic() < deadline:
            if not await asyncio.to_thread(bench.missing):
                return fired, time.monotonic() - fired
            await asyncio.sleep(0.5)
        return fired, None

    streams, start, end, (fired, recovery) = asyncio.run(
        _round(bench.url, prompts, s.max_tokens, bench.headers, during)
    )
    return streams, start, end, injector, fired, recovery


def _compare(
    streams: list[Stream], base: list[Stream], margins: Callable[[int, int], float]
) -> tuple[int, int, int]:
    """(equal, near ties, different) over the streams that finished."""
    equal = near = diff = 0
    for i, (got, ref) in enumerate(zip(streams, base, strict=True)):
        if not got.ok:
            continue
        pairs = zip(got.ids, ref.ids, strict=False)
        first = next((k for k, (a, b) in enumerate(pairs) if a != b), None)
        if first is None and len(got.ids) == len(ref.ids):
            equal += 1
        elif first is not None and margins(i, first) < NEAR_TIE:
            near += 1
        else:
            diff += 1
    return equal, near, diff


def _reference_margins(model_dir: str, prompts: list[list[int]], base: list[Stream]):
    """margin(i, k): top-1 minus top-2 logit of the undisturbed output at position k of
    stream i (computed on demand, in this process)."""
    cache: dict[int, list[float]] = {}
    workers: list[Any] = []

    def margin(i: int, k: int) -> float:
        if i not in cache:
            from workers.dense_worker import DenseWorker
            from workers.requests import EngineConfig
            from workers.runner import ModelRunner

            if not workers:
                workers.append(DenseWorker(model_dir, "float32", EngineConfig(max_num_seqs=1)))
            worker = workers[0]
            runner = ModelRunner(worker.engine.runner.lm, worker.experts, 1)
            ids = prompts[i] + base[i].ids[:-1]
            logits = runner.step([(runner.allocate(), ids)], all_logits=True)[0]
            top2 = logits[len(prompts[i]) - 1 :].topk(2, dim=-1).values
            cache[i] = (top2[:, 0] - top2[:, 1]).tolist()
        values = cache[i]
        return values[k] if k < len(values) else float("inf")

    return margin


def _latencies(streams: list[Stream], fired: float | None) -> tuple[list[float], list[float]]:
    """e2e latency and the longest gap between tokens of the streams in flight at `fired`
    (all streams when fired is None)."""
    hit = [s for s in streams if fired is None or s.start <= fired <= s.end]
    return [s.end - s.start for s in hit], [s.max_gap() for s in hit]


def _throughput(streams: list[Stream], start: float, end: float) -> float:
    return sum(len(s.ids) for s in streams) / max(end - start, 1e-9)


def run(s: Settings, build_app: Callable[[Any, str], Any], out_dir: Path) -> dict[str, Any]:
    for f in s.faults:
        if f not in FAULTS:
            raise ValueError(f"--faults: unknown fault {f!r} (expected some of {list(FAULTS)})")
    if "node" in s.faults and s.nodes < 2:
        raise ValueError("--faults node needs --nodes >= 2 (one head + worker nodes)")
    from workers.config import ModelConfig

    vocab = ModelConfig.from_hf(s.model_dir).vocab_size
    rng = random.Random(s.seed)
    lens = [rng.randint(*s.prompt_len) for _ in range(s.streams)]
    prompts = [p[:n] for p, n in zip(
        random_prompts(s.streams, max(lens), vocab, s.seed, low=3), lens, strict=True)]  # fmt: skip
    rounds: dict[str, Any] = {}
    reports: list[FaultReport] = []
    with ChaosCluster(s, build_app, secure=False) as bench:
        base, b0, b1, _ = asyncio.run(_round(bench.url, prompts, s.max_tokens, bench.headers))
        failed_base = [x.error or str(x.status) for x in base if not x.ok]
        if failed_base:
            raise RuntimeError(f"the undisturbed round failed {len(failed_base)} requests: "
                               f"{failed_base[:3]}")  # fmt: skip
        duration = b1 - b0
        rounds["baseline"] = {"seconds": duration, "tokens_per_s": _throughput(base, b0, b1)}
        lat_b, gap_b = _latencies(base, None)
        margins = _reference_margins(s.model_dir, prompts, base)
        for kind in s.faults:
            at = duration * rng.uniform(0.15, 0.6)
            streams, r0, r1, inj, fired, recovery = _fault_round(bench, prompts, s, kind, at, rng)
            missing = "" if recovery is not None else bench.missing()
            equal, near, diff = _compare(streams, base, margins)
            lat, gap = _latencies(streams, fired)
            failed = [x for x in streams if not x.ok]
            reports.append(FaultReport(
                fault=kind, target=inj.target, fired_at_s=fired - r0, failed=len(failed),
                equal=equal, near_ties=near, different=diff, recovery_s=recovery,
                missing=missing,
                p99_latency_fault_s=percentile(lat, 99) if lat else float("nan"),
                p99_latency_baseline_s=percentile(lat_b, 99),
                p99_gap_fault_s=percentile(gap, 99) if gap else float("nan"),
                p99_gap_baseline_s=percentile(gap_b, 99),
                tokens_per_s=_throughput(streams, r0, r1),
                errors=sorted({x.error[:160] or str(x.status) for x in failed})[:5],
            ))  # fmt: skip
            if kind == "node":
                break  # the cluster is smaller now; later rounds would not compare
    security = _security_cost(s, build_app, prompts) if s.security else None
    out = {
        "settings": dataclasses.asdict(s) | {"model_dir": str(s.model_dir)},
        "machine": machine_info(),
        "rounds": rounds,
        "faults": [dataclasses.asdict(r) for r in reports],
        "security": security,
    }
    write_outputs(out, out_dir)
    return out


def _security_cost(
    s: Settings, build_app: Callable[[Any, str], Any], prompts: list[list[int]]
) -> dict[str, Any]:
    """Undisturbed throughput with no API key / token / TLS vs with all three, measured in
    alternating rounds on fresh clusters (one of each, twice)."""
    results: dict[str, list[float]] = {"plain": [], "secured": []}
    plain = dataclasses.replace(s, nodes=1)
    for _ in range(2):
        for name, secure in (("plain", False), ("secured", True)):
            with ChaosCluster(plain, build_app, secure=secure) as bench:
                asyncio.run(_round(bench.url, prompts[:8], 4, bench.headers))  # warm-up
                streams, t0, t1, _ = asyncio.run(
                    _round(bench.url, prompts, s.max_tokens, bench.headers)
                )
                results[name].append(_throughput(streams, t0, t1))
    best = {k: max(v) for k, v in results.items()}
    return {"tokens_per_s": results, "best": best, "ratio": best["secured"] / best["plain"]}


# ---------------------------------------------------------------------------------- output
def write_outputs(out: dict[str, Any], out_dir: Path) -> None:
    write_json(out_dir / "chaos.json", out)
    s = out["settings"]
    rows = [
        [r["fault"], r["target"], f"{r['fired_at_s']:.1f}", r["failed"],
         f"{r['equal']}/{s['streams']}", r["near_ties"], r["different"],
         f"not whole: {r['missing']}" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}",
         r["p99_latency_fault_s"], r["p99_latency_baseline_s"], r["p99_gap_fault_s"],
         r["p99_gap_baseline_s"]]
        for r in out["faults"]
    ]  # fmt: skip
    headers = ["fault", "target", "fired at (s)", "failed", "equal", "near-ties", "different",
               "whole again after (s)", "p99 latency in fault (s)", "p99 latency baseline (s)",
               "p99 token gap in fault (s)", "p99 token gap baseline (s)"]  # fmt: skip
    sections = [("Faults", markdown_table(headers, rows))]
    errors = [f"- {r['fault']}: {e}" for r in out["faults"] for e in r["errors"]]
    if errors:
        sections.append(("Errors seen by clients", "\n".join(errors)))
    sec = out.get("security")
    if sec:
        body = markdown_table(
            ["set-up", "tokens/s (each round)", "best"],
            [["no API key, plain expert RPC", ", ".join(f"{v:.0f}" for v in
              sec["tokens_per_s"]["plain"]), sec["best"]["plain"]],
             ["API key + cluster token + TLS", ", ".join(f"{v:.0f}" for v in
              sec["tokens_per_s"]["secured"]), sec["best"]["secured"]]],
        ) + f"\n\nsecured / plain throughput: {sec['ratio']:.3f}"  # fmt: skip
        sections.append(("What the API key and the expert RPC's token + TLS cost", body))
    m = out["machine"]
    intro = (
        f"{s['streams']} concurrent greedy streams of {s['max_tokens']} tokens, {s['shards']} "
        f"expert shards, {s['dense_replicas']} dense replicas, {s['nodes']} node(s); "
        f"machine: {m['cpu']}, {m['cores']} cores. Baseline round: "
        f"{out['rounds']['baseline']['seconds']:.1f} s, "
        f"{out['rounds']['baseline']['tokens_per_s']:.0f} tokens/s."
    )
    write_markdown(out_dir / "chaos.md", "Chaos benchmark", sections, intro=intro)
