"""`expertmesh bench rpcsec`: what the expert RPC's cluster token and TLS cost per call.

One expert-shard server per mode (plain, token, tls, token+tls) runs in a child process; this
process drives one RemoteExpertBackend per mode with identical layer steps (T tokens, K of E
experts, hidden H: one call per step), in interleaved rounds (a different mode first each
round), and reports per-call median / p90 latency and the ratio to plain. The experts are
kept small (intermediate I) so the call's fixed costs, which the token and TLS add to, are
not hidden behind expert math; the payload is the real hidden size.

    expertmesh bench rpcsec --tokens 1,64 --calls 200 --repeats 5
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cluster.bench import machine_info, median, percentile, rotate
from cluster.bench.pki import write_pki
from cluster.bench.report import machine_line, markdown_table, write_json, write_markdown

MODES = ("plain", "token", "tls", "token+tls")
TOKEN = "bench-cluster-token"
H, I, E, K = 2048, 64, 16, 4  # hidden as in Qwen3-Next; small experts


def _serve(conn: Any, pki: dict[str, str], seed: int) -> None:
    """Child process: one server per mode on 127.0.0.1; sends the ports, serves until told."""
    from router.security import TLSFiles
    from workers.expert_shard import start_expert_server
    from workers.experts import ExpertWeights

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    weights = ExpertWeights(
        tuple(range(E)),
        {0: torch.randn(E, 2 * I, H, generator=g) / H**0.5},
        {0: torch.randn(E, H, I, generator=g) / I**0.5},
    )
    tls = TLSFiles(pki["ip_cert"], pki["ip_key"])

    servers, ports = [], {}
    for mode in MODES:
        token = TOKEN if "token" in mode else None
        server, port = start_expert_server(
            weights, shard_id="shard-0", token=token, tls=tls if "tls" in mode else None,
            local_socket=False,
        )  # fmt: skip
        servers.append(server)
        ports[mode] = port
    conn.send(ports)
    conn.recv()  # until "stop"
    for server in servers:
        server.stop(None)


def _backend(mode: str, port: int, ca: str) -> Any:
    from router.client import RemoteExpertBackend
    from router.placement import PlacementTable, ShardSpec

    spec = ShardSpec("shard-0", f"127.0.0.1:{port}", ((tuple(range(E))),))
    token = TOKEN if "token" in mode else None
    tls_ca = ca if "tls" in mode else None
    return RemoteExpertBackend(PlacementTable(1, E, (spec,)), token=token, tls_ca=tls_ca)


def run(
    tokens: list[int], calls: int, repeats: int, seed: int = 0, out_dir: str = "bench-out"
) -> dict[str, Any]:
    """Per-call latency of each mode at each token count; writes rpcsec.json / rpcsec.md."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        pki = {k: str(v) for k, v in write_pki(Path(tmp)).items()}
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, pki, seed), daemon=True)
        proc.start()
        try:
            if not parent.poll(120):
                raise RuntimeError("rpcsec: the shard servers did not start within 120 s")
            ports = parent.recv()
            backends = {m: _backend(m, ports[m], pki["ca"]) for m in MODES}
            samples = _measure(backends, tokens, calls, repeats, seed)
            for b in backends.values():
                b.close()
        finally:
            parent.send("stop")
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    return _report(samples, tokens, calls, repeats, out_dir)


def _measure(backends, tokens, calls, repeats, seed) -> dict[tuple[str, int], list[float]]:
    g = torch.Generator().manual_seed(seed)
    steps = {}
    for t in tokens:
        hidden = torch.randn(t, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
        steps[t] = (hidden, ids, torch.full((t, K), 1.0 / K))
    for backend in backends.values():  # warm up: connect, handshake, first allocations
        for step in steps.values():
            for _ in range(3):
                backend.submit(0, *step).result()
    samples: dict[tuple[str, int], list[float]] = {(m, t): [] for m in MODES for t in tokens}
    for r in range(repeats):
        for mode in rotate(MODES, r):
            for t, step in steps.items():
                backend = backends[mode]
                for _ in range(calls):
                    start = time.perf_counter()
                    backend.submit(0, *step).result()
                    samples[(mode, t)].append(time.perf_counter() - start)
    return samples


def _report(samples, tokens, calls, repeats, out_dir) -> dict[str, Any]:
    machine = machine_info()
    rows, results = [], []
    for t in tokens:
        plain = median(samples[("plain", t)])
        for mode in MODES:
            s = samples[(mode, t)]
            med, p90 = median(s), percentile(s, 90)
            results.append({"mode": mode, "tokens": t, "median_us": 1e6 * med,
                            "p90_us": 1e6 * p90, "ratio_to_plain": med / plain,
                            "calls": len(s)})  # fmt: skip
            rows.append([mode, t, 1e6 * med, 1e6 * p90, med / plain, 1e6 * (med - plain)])
    out = {"machine": machine, "hidden": H, "experts": E, "top_k": K, "intermediate": I,
           "calls_per_round": calls, "repeats": repeats, "results": results}  # fmt: skip
    write_json(Path(out_dir, "rpcsec.json"), out)
    table = markdown_table(
        ["mode", "tokens", "median µs/call", "p90 µs/call", "x plain", "+µs vs plain"], rows
    )
    intro = (
        f"{machine_line(machine)} Load average {machine['loadavg_1m']} when it ran. One shard "
        f"server per mode in a child process on 127.0.0.1; {calls} calls per mode, token count "
        f"and round, {repeats} interleaved rounds; hidden {H}, {E} experts (I={I}), top-{K}. "
        "A call = RemoteExpertBackend.submit(...).result() of one layer step on one shard."
    )
    write_markdown(Path(out_dir, "rpcsec.md"), "Expert RPC: cost of the cluster token and TLS",
                   [("Per-call latency", table)], intro)  # fmt: skip
    return out
