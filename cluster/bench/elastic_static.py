"""The skewed demo checkpoint of `bench elastic`, and the comparison of its outputs with a
static run (local experts, the same prompts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

NEAR_TIE = 1e-4  # a static run's top-2 logprob margin below this may flip under fp32 sums


def skewed_demo(skew: str, seed: int = 0) -> Path:
    """The small demo preset with `--skew HOT:FACTOR`, generated once into the cache."""
    import os
    import shutil
    import tempfile

    from workers.make_checkpoint import GENERATOR_VERSION, make_checkpoint

    try:
        hot, factor = skew.split(":")
        spec = (int(hot), float(factor))
    except ValueError:
        raise ValueError(f"--skew: expected HOT:FACTOR (e.g. 16:3), got {skew!r}") from None
    root = Path(os.environ.get("EXPERTMESH_CACHE") or "~/.cache/expertmesh").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"demo-small-skew{spec[0]}x{spec[1]:g}-seed{seed}-v{GENERATOR_VERSION}"
    if not path.is_dir():  # written aside, then renamed: never a half-written checkpoint
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=root))
        try:
            make_checkpoint(tmp, "small", seed=seed, skew=spec)
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def compare_with_static(model_dir: str, gen: Any, engine_config: Any) -> dict[str, Any]:
    """Tokens of every request `gen` (elastic.LoadGen) finished vs local experts on the same
    prompts: equal, or different after a near-tie of the static run, or different."""
    import dataclasses

    from workers.dense_worker import DenseWorker

    rids = sorted(gen.outputs, key=lambda r: int(r[1:]))
    config = dataclasses.replace(engine_config, max_num_seqs=32, max_queue=len(rids) + 1)
    worker = DenseWorker(model_dir, "float32", config)
    static = worker.generate([gen.prompts[r] for r in rids], gen.params)
    equal, near_ties, differ, max_dlp = 0, 0, 0, 0.0
    for rid, ref in zip(rids, static, strict=True):
        out = gen.outputs[rid]
        if out.token_ids == ref.token_ids:
            equal += 1
            diffs = [abs(a - b) for a, b in zip(out.logprobs, ref.logprobs, strict=True)]
            max_dlp = max([max_dlp, *diffs])
            continue
        pos = next(
            i for i, (a, b) in enumerate(zip(out.token_ids, ref.token_ids, strict=True)) if a != b
        )
        margin = _margin(worker, gen.prompts[rid] + ref.token_ids[:pos])
        near_ties, differ = near_ties + (margin < NEAR_TIE), differ + (margin >= NEAR_TIE)
    return {"requests": len(rids), "equal": equal, "near_ties": near_ties, "differ": differ,
            "max_logprob_diff": max_dlp}  # fmt: skip


def _margin(worker, ids: list[int]) -> float:
    """Top-2 logprob margin of the next token after `ids` (static run, local experts)."""
    runner = worker.engine.runner
    slot = runner.allocate()
    try:
        logits = runner.step([(slot, ids)])[0]
    finally:
        runner.free(slot)
    top = torch.log_softmax(logits.double(), -1).topk(2).values
    return float(top[0] - top[1])
