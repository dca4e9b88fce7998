"""`expertmesh bench {moe,roofline,e2e}`: benchmarks on this machine (see docs/performance.md).

    expertmesh bench moe                    # one MoE layer: ours vs distributed vs transformers
    expertmesh bench roofline               # decode step vs the memory-bandwidth bound
    expertmesh bench e2e --concurrency 64   # served requests vs transformers generate()
    expertmesh bench rpcsec                 # expert RPC: per-call cost of the token and TLS
    expertmesh bench e2e --concurrency 1,4,16,64 --peers llama.cpp,vllm   # side by side
    expertmesh bench peers install          # build llama.cpp, install vLLM CPU (cached)
    expertmesh bench quant                  # expert storage formats: fidelity and speed
    expertmesh bench chaos                  # kill shards / replicas / nodes under load
    expertmesh bench startup --repo DIR     # `make serve` to ready, from a clean clone
    expertmesh bench profile                # decode-step profile, fused vs torch experts
    expertmesh bench structured             # grammar compile time and per-step mask cost
    expertmesh bench cache                  # paged decode attention, KV eviction, long context
    expertmesh bench agent                  # multi-turn agent trace, with/without prefix cache
    expertmesh bench elastic                # rebalance / scale the expert pool under load

Each writes NAME.json and NAME.md (and moe.png) under --out and prints the markdown.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cluster.cli import UsageError


def _ints(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {value!r}"
        ) from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return out


def _range(value: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {value!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {value!r}")
    return lo, hi


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks: moe, roofline, e2e")
    sub = p.add_subparsers(dest="bench", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", default=None, help="HF checkpoint dir (default: demo model)")
        q.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument(
            "--threads",
            type=int,
            default=None,
            help="torch intra-op threads (default: torch's choice)",
        )

    moe = sub.add_parser("moe", help="one MoE layer at token batches 1..512")
    common(moe)
    moe.add_argument("--batches", type=_ints, default=[2**i for i in range(10)])
    moe.add_argument("--shards", type=int, default=4, help="gRPC expert shards (0: skip)")
    moe.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    moe.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    moe.add_argument("--min-time", type=float, default=0.05, help="seconds per sample burst")
    moe.set_defaults(func=_moe)

    roof = sub.add_parser("roofline", help="decode step time vs memory-bandwidth bound")
    common(roof)
    roof.add_argument("--batches", type=_ints, default=[1, 8, 32, 64, 128])
    roof.add_argument("--shards", type=int, default=4, help="also decode via N shards (0: skip)")
    roof.add_argument("--repeats", type=int, default=20, help="timed decode steps per batch")
    roof.add_argument("--bandwidth-mb", type=int, default=1024, help="bandwidth probe size")
    roof.set_defaults(func=_roofline)

    e2e = sub.add_parser("e2e", help="C concurrent requests vs transformers generate()")
    common(e2e)
    e2e.add_argument(
        "--concurrency",
        type=_ints,
        default=[64],
        help="C, or a list: 1,4,16,64 (a list or --peers runs the side-by-side sweep over HTTP)",
    )
    e2e.add_argument(
        "--peers",
        type=_peers,
        default=[],
        help="also run these engines on the "
        "same checkpoint: llama.cpp,vllm (installed under the cache on first use)",
    )
    e2e.add_argument(
        "--mode",
        choices=["serve", "engine"],
        default=None,
        help="serve: Ray Serve OpenAI API; engine: in process (default: serve "
        "when deploy/app.py and ray.serve are importable)",
    )
    e2e.add_argument("--shards", type=int, default=0, help="expert shards (0: local experts)")
    e2e.add_argument("--prompt-len", type=_range, default=(16, 512), metavar="MIN:MAX")
    e2e.add_argument("--output-len", type=_range, default=(16, 128), metavar="MIN:MAX")
    e2e.add_argument("--max-batched-tokens", type=int, default=512)
    e2e.add_argument(
        "--stream-interval", type=int, default=None, metavar="TOKENS",
        help="ours: tokens per streamed delta (dense.stream_interval; default: the config's "
        "in serve mode, 1 in engine mode)",
    )  # fmt: skip
    e2e.add_argument(
        "--peer-threads", type=int, default=None, help="llama-server -t (default: all cores)"
    )
    e2e.add_argument("--repeats", type=int, default=3, help="rounds, ours and hf alternating")
    e2e.add_argument("--no-hf", action="store_true", help="skip transformers generate()")
    e2e.add_argument(
        "--hf-batch",
        type=int,
        default=None,
        help="transformers batch size (default: all requests in one batch)",
    )
    e2e.set_defaults(func=_e2e)

    qu = sub.add_parser("quant", help="expert storage formats: fidelity and speed vs fp32")
    common(qu)
    qu.add_argument(
        "--dtypes", type=_dtypes, default=None, help="default: all (float32,bfloat16,int8,int4)"
    )
    qu.add_argument("--batches", type=_ints, default=[1, 4, 16, 64, 256])
    qu.add_argument("--prompts", type=int, default=8, help="fidelity: prompts")
    qu.add_argument("--prompt-len", type=int, default=32)
    qu.add_argument("--steps", type=int, default=32, help="fidelity: greedy tokens per prompt")
    qu.add_argument("--repeats", type=int, default=5, help="interleaved speed rounds")
    qu.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    qu.set_defaults(func=_quant)

    rs = sub.add_parser("rpcsec", help="expert RPC: per-call cost of the token and TLS")
    rs.add_argument("--tokens", type=_ints, default=[1, 64], help="tokens per call")
    rs.add_argument("--calls", type=int, default=200, help="calls per mode, size and round")
    rs.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    rs.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    rs.add_argument("--seed", type=int, default=0)
    rs.set_defaults(func=_rpcsec, model=None, threads=None)

    pr = sub.add_parser("profile", help="decode-step profile, fused vs torch experts")
    common(pr)
    pr.add_argument("--batches", type=_ints, default=[1, 4, 64])
    pr.add_argument("--prompt-len", type=int, default=128)
    pr.add_argument("--steps", type=int, default=10, help="timed decode steps per path")
    pr.set_defaults(func=_profile, repeats=1)
    el = sub.add_parser("elastic", help="elastic expert pool: rebalance, scale up/down, no "
                        "failed request (a skewed checkpoint by default)")  # fmt: skip
    common(el)
    el.add_argument("--shards", type=int, default=4, help="shards at the start")
    el.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    el.add_argument("--rise", type=float, default=2.0, help="rising load: concurrency x RISE")
    el.add_argument("--phase-s", type=float, default=20.0, help="seconds per phase")
    el.add_argument("--prompt-len", type=int, default=32)
    el.add_argument("--max-tokens", type=int, default=32)
    el.add_argument(
        "--redundant-per-shard",
        type=int,
        default=2,
        help="rebalancer budget: extra (layer, expert) copies per shard per layer",
    )
    el.add_argument("--skew", default="16:4", help="default model: make-checkpoint --skew")
    el.set_defaults(func=_elastic, repeats=1)

    st = sub.add_parser("structured", help="grammar compile time and per-step mask cost")
    st.add_argument("--batch", type=int, default=32, help="sequences per decode step")
    st.add_argument("--steps", type=int, default=30, help="timed steps per round")
    st.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    st.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    st.add_argument("--seed", type=int, default=0)
    st.set_defaults(func=_structured, model=None, threads=None)

    ca = sub.add_parser("cache", help="decode attention, KV eviction fidelity, long context")
    common(ca)
    ca.add_argument("--batch", type=int, default=64, help="decode attention: sequences")
    ca.add_argument("--contexts", type=_ints, default=[200, 1000], help="decode attention")
    ca.add_argument("--windows", type=_ints, default=[256, 1024], help="eviction: windows")
    ca.add_argument("--sinks", type=int, default=64, help="eviction: sink tokens")
    ca.add_argument("--prompt-len", type=int, default=4096, help="eviction: prompt tokens")
    ca.add_argument("--long-contexts", type=_ints, default=[1024, 4096, 16384, 32000])
    ca.add_argument("--steps", type=int, default=16, help="decode steps timed per point")
    ca.set_defaults(func=_cache, repeats=1)

    ag = sub.add_parser("agent", help="multi-turn agent trace with and without prefix caching")
    common(ag)
    ag.add_argument("--sessions", type=int, default=4, help="concurrent agent sessions")
    ag.add_argument("--turns", type=int, default=8)
    ag.add_argument("--system-tokens", type=int, default=1500, help="system prompt + tools")
    ag.add_argument("--tool-tokens", type=_range, default=(100, 600), metavar="MIN:MAX")
    ag.add_argument("--output-tokens", type=int, default=32, help="assistant tokens per turn")
    ag.add_argument("--peers", type=_peers, default=[], help="also run vllm (opt-in)")
    ag.set_defaults(func=_agent, repeats=1)

    ch = sub.add_parser("chaos", help="faults under load: failures, recovery, latency, security")
    common(ch)
    ch.add_argument("--shards", type=int, default=4, help="expert shards")
    ch.add_argument("--streams", type=int, default=64, help="concurrent greedy streams")
    ch.add_argument("--max-tokens", type=int, default=48, help="tokens per stream")
    ch.add_argument("--prompt-len", type=_range, default=(8, 48), metavar="MIN:MAX")
    ch.add_argument("--dense-replicas", type=int, default=2)
    ch.add_argument("--nodes", type=int, default=1, help="raylets (>= 2: a simulated cluster)")
    ch.add_argument(
        "--faults",
        default="shard-kill,shard-sigkill,dense-kill",
        help="comma-separated: shard-kill, shard-sigkill, dense-kill, node",
    )
    ch.add_argument(
        "--no-security",
        action="store_true",
        help="skip the API key + cluster token + TLS throughput comparison",
    )
    ch.set_defaults(func=_chaos, repeats=1)

    st = sub.add_parser("startup", help="`make serve` to ready (cold / warm demo), Ctrl-C to exit")
    st.add_argument("--repo", required=True, help="a clone with `make install` done")
    st.add_argument("--runs", type=int, default=3, help="runs of each kind (median reported)")
    st.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    st.set_defaults(func=_startup, repeats=1, model=None)

    pe = sub.add_parser("peers", help="install / show the peer engines (llama.cpp, vLLM CPU)")
    pe.add_argument("action", choices=["install", "status"])
    pe.add_argument("names", nargs="*", default=[], help="llama.cpp and/or vllm (default both)")
    pe.set_defaults(func=_peers_cmd, repeats=1, model=None)
    return p


def _dtypes(value: str) -> list[str]:
    from workers.quant import EXPERT_DTYPES

    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or any(n not in EXPERT_DTYPES for n in names):
        raise argparse.ArgumentTypeError(f"expected some of {list(EXPERT_DTYPES)}, got {value!r}")
    return names if "float32" in names else ["float32", *names]


def _quant(args: argparse.Namespace) -> int:
    from cluster.bench import quant
    from workers.quant import EXPERT_DTYPES

    _setup(args)
    if min(args.prompts, args.prompt_len, args.steps) < 1:
        raise UsageError("--prompts, --prompt-len, --steps: must be >= 1")
    quant.run(args.model, args.dtypes or EXPERT_DTYPES, args.batches, args.prompts,
              args.prompt_len, args.steps, args.repeats, args.layer, args.seed,
              out_dir=args.out)  # fmt: skip
    _show(args.out, "quant")
    return 0


def _rpcsec(args: argparse.Namespace) -> int:
    from cluster.bench import rpcsec

    _setup(args)
    if args.calls < 1:
        raise UsageError("--calls: must be >= 1")
    rpcsec.run(args.tokens, args.calls, args.repeats, args.seed, out_dir=args.out)
    _show(args.out, "rpcsec")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from cluster.bench import profile

    _setup(args)
    if args.prompt_len < 1 or args.steps < 1:
        raise UsageError("--prompt-len, --steps: must be >= 1")
    profile.run(args.model, args.batches, args.prompt_len, args.steps, seed=args.seed,
                out_dir=args.out)  # fmt: skip
    _show(args.out, "profile")
    return 0


def _structured(args: argparse.Namespace) -> int:
    from cluster.bench import structured

    _setup(args)
    if min(args.batch, args.steps) < 1:
        raise UsageError("--batch, --steps: must be >= 1")
    builder = getattr(args, "tool_grammar_builder", None)  # deploy/ adds the tool-call grammar
    structured.run(args.batch, args.steps, args.repeats, args.seed, args.out, builder)
    _show(args.out, "structured")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from cluster.bench import cache

    _setup(args)
    if min(args.batch, args.prompt_len, args.steps) < 1 or args.sinks < 0:
        raise UsageError("--batch, --prompt-len, --steps: must be >= 1; --sinks: >= 0")
    cache.run(args.model, args.batch, args.contexts, args.windows, args.sinks, args.prompt_len,
              args.long_contexts, args.steps, args.seed, out_dir=args.out)  # fmt: skip
    _show(args.out, "cache")
    return 0


def _agent(args: argparse.Namespace) -> int:
    from cluster.bench import agent

    _setup(args)
    if min(args.sessions, args.turns, args.system_tokens, args.output_tokens) < 1:
        raise UsageError("--sessions, --turns, --system-tokens, --output-tokens: must be >= 1")
    if "llama.cpp" in args.peers:
        raise UsageError("--peers: the agent trace supports vllm")
    agent.run(args.model, args.sessions, args.turns, args.system_tokens, args.tool_tokens,
              args.output_tokens, args.peers, args.seed, out_dir=args.out)  # fmt: skip
    _show(args.out, "agent")
    return 0


def _peers(value: str) -> list[str]:
    from cluster.bench.peers import PEERS

    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in PEERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected some of {list(PEERS)}, got {value!r}")
    return names


def _peers_cmd(args: argparse.Namespace) -> int:
    import json

    from cluster.bench import peers

    bad = [n for n in args.names if n not in peers.PEERS]
    if bad:
        raise UsageError(f"peers: expected some of {list(peers.PEERS)}, got {bad}")
    if args.action == "install":
        peers.install(args.names or peers.PEERS)
    print(json.dumps(peers.status(), indent=2))
    return 0


def _setup(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads: must be >= 1")
        torch.set_num_threads(args.threads)
    if getattr(args, "shards", 0) < 0:
        raise UsageError("--shards: must be >= 0")
    if args.repeats < 1:
        raise UsageError("--repeats: must be >= 1")
    if args.model is not None and not Path(args.model, "config.json").is_file():
        raise UsageError(f"--model: no config.json in {args.model}")


def _show(out_dir: str, name: str) -> None:
    print(Path(out_dir, f"{name}.md").read_text())
    print(f"[written to {os.path.abspath(out_dir)}/{name}.json, {name}.md]")


def _elastic(args: argparse.Namespace) -> int:
    from cluster.bench import elastic

    _setup(args)
    if min(args.shards, args.concurrency, args.prompt_len, args.max_tokens) < 1:
        raise UsageError("--shards, --concurrency, --prompt-len, --max-tokens: must be >= 1")
    if args.rise <= 1 or args.phase_s <= 0 or args.redundant_per_shard < 0:
        raise UsageError("--rise must be > 1, --phase-s > 0, --redundant-per-shard >= 0")
    model = args.model or str(elastic.skewed_demo(args.skew, args.seed))
    source = f"--model {args.model}" if args.model else f"--skew {args.skew}"
    command = (f"expertmesh bench elastic {source} --shards {args.shards} --concurrency "
               f"{args.concurrency} --rise {args.rise:g} --phase-s {args.phase_s:g} "
               f"--prompt-len {args.prompt_len} --max-tokens {args.max_tokens} "
               f"--redundant-per-shard {args.redundant_per_shard} --seed {args.seed}")  # fmt: skip
    elastic.run(model, shards=args.shards, concurrency=args.concurrency, rise=args.rise,
                phase_s=args.phase_s, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                redundant_per_shard=args.redundant_per_shard, seed=args.seed,
                out_dir=args.out, command=command)  # fmt: skip
    _show(args.out, "elastic")
    return 0


def _moe(args: argparse.Namespace) -> int:
    from cluster.bench import moe

    _setup(args)
    moe.run(args.model, args.batches, args.shards, args.repeats, args.layer, args.seed,
            out_dir=args.out, min_time_s=args.min_time)  # fmt: skip
    _show(args.out, "moe")
    return 0


def _roofline(args: argparse.Namespace) -> int:
    from cluster.bench import roofline

    _setup(args)
    roofline.run(args.model, args.batches, args.shards, rounds=args.repeats,
                 bandwidth_mb=args.bandwidth_mb, seed=args.seed, out_dir=args.out)  # fmt: skip
    _show(args.out, "roofline")
    return 0


def _startup(args: argparse.Namespace) -> int:
    from cluster.bench import startup

    if args.runs < 1:
        raise UsageError("--runs: must be >= 1")
    startup.run(Path(args.repo), args.runs, Path(args.out))
    _show(args.out, "startup")
    return 0


def _chaos(args: argparse.Namespace) -> int:
    from cluster.bench import chaos, resolve_model

    _setup(args)
    builder = getattr(args, "serve_app_builder", None)
    if builder is None:
        raise UsageError("bench chaos: run it through the `expertmesh` command (deploy/)")
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    unknown = [f for f in faults if f not in chaos.FAULTS]
    if unknown or not faults:
        raise UsageError(f"--faults: expected some of {list(chaos.FAULTS)}, got {args.faults!r}")
    if "node" in faults and args.nodes < 2:
        raise UsageError("--faults node: needs --nodes >= 2 (a head and worker nodes)")
    for name in ("shards", "streams", "max_tokens", "dense_replicas", "nodes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 1")
    settings = chaos.Settings(
        model_dir=str(resolve_model(args.model)), shards=args.shards, streams=args.streams,
        max_tokens=args.max_tokens, prompt_len=args.prompt_len,
        dense_replicas=args.dense_replicas, nodes=args.nodes, faults=faults, seed=args.seed,
        security=not args.no_security,
    )  # fmt: skip
    chaos.run(settings, builder, Path(args.out))
    _show(args.out, "chaos")
    return 0


def _e2e(args: argparse.Namespace) -> int:
    from cluster.bench import e2e

    _setup(args)
    builder = getattr(args, "serve_app_builder", None)
    mode = args.mode or ("serve" if builder is not None else "engine")
    if mode == "serve" and builder is None:
        raise UsageError("--mode serve: run it through the `expertmesh` command (deploy/)")
    if len(args.concurrency) > 1 or args.peers:
        from cluster.bench import resolve_model, sweep

        sweep.run(resolve_model(args.model), args.concurrency, args.peers, mode, args.shards,
                  args.prompt_len, args.output_len, args.max_batched_tokens, args.repeats,
                  args.seed, args.out, serve_app_builder=builder,
                  peer_threads=args.peer_threads,
                  stream_interval=args.stream_interval)  # fmt: skip
        _show(args.out, "e2e")
        return 0
    e2e.run(args.model, args.concurrency[0], mode, args.shards, args.prompt_len, args.output_len,
            hf=not args.no_hf, hf_batch=args.hf_batch, max_batched_tokens=args.max_batched_tokens,
            repeats=args.repeats, seed=args.seed, out_dir=args.out,
            serve_app_builder=builder, stream_interval=args.stream_interval)  # fmt: skip
    _show(args.out, "e2e")
    return 0
