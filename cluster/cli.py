"""`expertmesh` command line: make-checkpoint, generate, serve, bench, plan, experts."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from workers.config import COMPUTE_DTYPES
from workers.quant import EXPERT_DTYPES
from workers.requests import EngineConfig, RequestOutput


class UsageError(Exception):
    """Bad command-line arguments (exit code 2)."""


def main(
    argv: Sequence[str] | None = None,
    plugins: Sequence[Callable[[Any], Any]] = (),
    defaults: dict[str, Any] | None = None,
) -> int:
    """Run the CLI. `plugins` add subcommands of the layers above (deploy/ adds `serve`);
    `defaults` are set on the parsed arguments (deploy/ injects its Serve app builder)."""
    parser = build_parser(plugins)
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"expertmesh {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"expertmesh {args.command}: error: {exc}", file=sys.stderr)
        return 1


def build_parser(plugins: Sequence[Callable[[Any], Any]] = ()) -> argparse.ArgumentParser:
    from workers.make_checkpoint import add_cli as add_make_checkpoint

    parser = argparse.ArgumentParser(prog="expertmesh", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    add_make_checkpoint(sub)
    _add_generate(sub)
    from cluster.bench_cli import add_cli as add_bench
    from cluster.experts_view import add_cli as add_experts
    from cluster.plan import add_cli as add_plan

    for add in plugins:
        add(sub)
    add_bench(sub)
    add_experts(sub)
    add_plan(sub)
    return parser


# ---------------------------------------------------------------------------------- generate
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="prefill + decode prompts (in process or distributed)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="all experts in this process")
    where.add_argument("--expert-shards", type=int, metavar="N", help="N Ray expert-shard actors")
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", action="store_true", help="report each token's log-probability")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--dtype", default="float32", choices=list(COMPUTE_DTYPES))
    p.add_argument(
        "--expert-dtype",
        default=None,
        choices=list(EXPERT_DTYPES),
        help="routed-expert storage (default: --dtype); int8/int4: weight-only",
    )
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: local)")
    p.add_argument("--placement", default="spread", choices=["spread", "strict_spread", "pack"])
    p.set_defaults(func=_generate)


def parse_prompt_ids(values: Sequence[str]) -> list[list[int]]:
    prompts = []
    for value in values:
        try:
            ids = [int(x) for x in value.replace(" ", "").split(",") if x]
        except ValueError as exc:
            raise UsageError(
                f"--prompt-ids: expected comma-separated integers, got {value!r}"
            ) from exc
        if not ids:
            raise UsageError("--prompt-ids: empty prompt")
        prompts.append(ids)
    return prompts


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workers.sampler import SamplingError, SamplingParams

    if not Path(args.model, "config.json").is_file():
        raise UsageError(f"--model: no config.json in {args.model}")
    if args.expert_shards is not None and args.expert_shards < 1:
        raise UsageError("--expert-shards: must be >= 1")
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
            logprobs=args.logprobs,
        )
    except SamplingError as exc:
        raise UsageError(str(exc)) from exc
    prompts = parse_prompt_ids(args.prompt_ids) if args.prompt_ids else None
    if args.local:
        results, tokenizer = _generate_local(args, prompts, params)
    else:
        from cluster.launcher import generate_distributed

        results, tokenizer = generate_distributed(args, prompts, params)
    for out in results:
        _print_result(out, args)
    return 0


def _generate_local(args, prompts, params):
    from workers.dense_worker import DenseWorker

    limit = EngineConfig(
        max_num_seqs=max(1, len(args.prompt_ids or args.prompt)), max_model_len=1 << 30
    )
    worker = DenseWorker(
        args.model, args.dtype, limit, progress=args.verbose, expert_dtype=args.expert_dtype
    )
    prompts = prompts or encode_prompts(worker.tokenizer, args.prompt, args.chat, args.model)
    return worker.generate(prompts, params), worker.tokenizer


def encode_prompts(tokenizer, texts: Sequence[str], chat: bool, model_dir: str) -> list[list[int]]:
    if tokenizer is None:
        raise UsageError(f"--prompt: {model_dir} has no tokenizer.json; use --prompt-ids")
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    return [tokenizer.encode(t) for t in texts]


def _print_result(out: RequestOutput, args: argparse.Namespace) -> None:
    if out.error:
        raise RuntimeError(f"generation failed: {out.error}")
    if args.json:
        obj = {
            "token_ids": out.token_ids,
            "text": out.text,
            "finish_reason": out.finish_reason,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
        }
        if args.logprobs:
            obj["logprobs"] = out.logprobs
        print(json.dumps(obj))
        return
    print(out.text if out.text else " ".join(map(str, out.token_ids)))
    if args.logprobs:
        print("logprobs:", " ".join(f"{x:.4f}" for x in out.logprobs))


if __name__ == "__main__":
    sys.exit(main())
