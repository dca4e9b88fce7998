"""Dense worker: the dense model, its hybrid cache and an engine, over an expert backend.

Used in-process (`expertmesh generate --local`), as a Ray actor (launcher wraps the class with
`ray.remote`), and inside each Ray Serve dense replica. Experts are local when no placement is
given, otherwise remote shards reached through the router.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from workers.cache_config import CacheConfig
from workers.checkpoint import load_dense_weights, load_expert_weights
from workers.config import ModelConfig, compute_dtype
from workers.engine import Engine
from workers.experts import ExpertBackend, LocalExpertBackend
from workers.model import Qwen3NextLM
from workers.requests import EngineConfig, RequestOutput
from workers.resources import StepThreads
from workers.runner import ModelRunner
from workers.sampler import SamplingParams
from workers.tokenizer import TextTokenizer, TokenizerError

log = logging.getLogger(__name__)


def load_lm(
    model_dir: str | Path, dtype: torch.dtype, progress: bool = True, lossless: bool = True
) -> Qwen3NextLM:
    """The dense model computing in `dtype`; with `lossless`, projection weights stored in bf16
    stay bf16 under fp32 compute (half the bytes a decode step reads, the same numbers)."""
    config = ModelConfig.from_hf(model_dir)
    weights = load_dense_weights(model_dir, config, dtype=None if lossless else dtype,
                                 progress=progress)  # fmt: skip
    return Qwen3NextLM.from_weights(config, weights, dtype, lossless=lossless)


def local_experts(
    model_dir: str | Path,
    dtype: torch.dtype,
    progress: bool = True,
    storage: str | None = None,
) -> LocalExpertBackend:
    """All routed experts in process; `storage` packs them (float32/bfloat16/int8/int4);
    None: bf16 where the checkpoint's values are bf16 and compute is fp32 (bit-identical)."""
    config = ModelConfig.from_hf(model_dir)
    if storage is None and dtype == torch.float32:
        storage = "lossless"
    return LocalExpertBackend(
        load_expert_weights(model_dir, config, dtype=dtype, progress=progress, storage=storage)
    )


def load_tokenizer(model_dir: str | Path) -> TextTokenizer | None:
    try:
        return TextTokenizer(model_dir)
    except TokenizerError:
        return None


class DenseWorker:
    def __init__(
        self,
        model_dir: str,
        dtype: str = "float32",
        engine_config: EngineConfig | None = None,
        experts: ExpertBackend | None = None,
        progress: bool = False,
        micro_batches: int = 1,
        expert_dtype: str | None = None,
        cache_config: CacheConfig | None = None,
        step_threads: StepThreads | None = None,
    ) -> None:
        torch_dtype = compute_dtype(dtype)
        self.model_dir = model_dir
        self.engine_config = engine_config or EngineConfig()
        lm = load_lm(model_dir, torch_dtype, progress)
        self.experts = experts or local_experts(model_dir, torch_dtype, progress, expert_dtype)
        runner = ModelRunner(
            lm,
            self.experts,
            self.engine_config.max_num_seqs,
            torch_dtype,
            micro_batches,
            cache_config,
            self.engine_config.max_model_len,
        )
        cache = runner.cache
        log.info(
            "%s; prefix caching %s", cache.plan.describe(),
            "on" if cache.settings.caches_prefixes else "off",
        )  # fmt: skip
        self.tokenizer = load_tokenizer(model_dir)
        self.engine = Engine(runner, self.engine_config, self.tokenizer, step_threads)

    @property
    def config(self) -> ModelConfig:
        return self.engine.runner.config

    def ready(self) -> bool:
        return True

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[RequestOutput]:
        return self.engine.generate(prompts, params)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise TokenizerError(f"{self.model_dir} has no tokenizer.json: pass token ids")
        return self.tokenizer.encode(text)
