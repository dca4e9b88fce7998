"""Memory planner: exact counts, bytes per dtype, shards and sequences, serve's refusal."""

import json

import pytest
import torch

from cluster.config import ClusterConfig
from cluster.plan import QWEN3_CODER_NEXT, PlanError, check_fits, parse_bytes, plan
from deploy.cli import main


def test_qwen3_coder_next_counts_and_state():
    p = plan(QWEN3_CODER_NEXT, "bfloat16", device_memory=80 * 10**9, context=262144)
    assert p.expert_params == 48 * 512 * 3 * 2048 * 512  # 77.3B
    assert 2.3e9 < p.dense_params < 2.45e9  # ~2.4B (REFERENCE.md)
    assert p.expert_bytes == 2 * p.expert_params
    assert p.kv_bytes_per_token == 12 * 2 * 2 * 256 * 2  # 12 full layers, K+V, 2 heads x 256
    ssm = 32 * 128 * 128 * 4
    conv = (2 * 16 * 128 + 32 * 128) * 3 * 2
    assert p.deltanet_bytes_per_sequence == 36 * (ssm + conv)
    assert p.sequence_bytes == 262144 * p.kv_bytes_per_token + p.deltanet_bytes_per_sequence
    assert p.shards == 3  # 154.6 GB of bf16 experts over 72 GB usable devices
    free = p.usable_bytes - p.dense_bytes
    assert p.sequences_per_dense_device == free // p.sequence_bytes


@pytest.mark.parametrize(("dtype", "shards"), [("float8", 2), ("int4", 1), ("int8", 2)])
def test_smaller_expert_dtypes_need_fewer_shards(dtype, shards):
    p = plan(QWEN3_CODER_NEXT, "bfloat16", dtype, device_memory=80 * 10**9)
    assert p.shards == shards
    assert p.expert_bytes < plan(QWEN3_CODER_NEXT, "bfloat16").expert_bytes


def test_planner_matches_what_the_loader_allocates(tmp_path):
    from workers.checkpoint import load_dense_weights, load_expert_weights
    from workers.config import ModelConfig
    from workers.make_checkpoint import make_checkpoint

    model = make_checkpoint(tmp_path / "m", preset="tiny", tokenizer=False)
    config = ModelConfig.from_hf(model)
    dense = load_dense_weights(model, config, progress=False)
    for kind in ("float32", "bfloat16", "int8", "int4"):
        p = plan(config, "float32", kind)
        assert p.dense_params == sum(t.numel() for t in dense.values())
        packed = load_expert_weights(model, config, progress=False, storage=kind)
        loaded = sum(packed.w13[i].nbytes + packed.w2[i].nbytes for i in packed.layers)
        if kind == "int4":  # tiny's sizes take 32-input groups; the planner assumes 64
            assert p.expert_bytes <= loaded
        else:
            assert p.expert_bytes == loaded


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("512 MB") == 512 * 10**6
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(ValueError, match="size"):
            parse_bytes(bad)


def test_serve_check_refuses_what_cannot_fit(tmp_path):
    from workers.make_checkpoint import make_checkpoint

    model = make_checkpoint(tmp_path / "m", preset="tiny", tokenizer=False)
    config = ClusterConfig.from_dict({"experts": {"shards": 0}})
    fine = check_fits(config, model, available=10**12)
    assert fine["total_bytes"] < 10**12
    with pytest.raises(PlanError, match=r"needs .* but .* is available.*32 sequences"):
        check_fits(config, model, available=fine["total_bytes"] - 1)
    budget = ClusterConfig.from_dict({"experts": {"shards": 0}, "dense": {"kv_cache_gb": 1.0}})
    assert check_fits(budget, model, available=10**12)["cache_bytes"] == 1 << 30
    smaller = ClusterConfig.from_dict({"experts": {"shards": 0, "dtype": "int4"}})
    assert check_fits(smaller, model, available=10**12)["expert_bytes"] < fine["expert_bytes"]


def test_cli(capsys, tmp_path):
    assert main(["plan", "--preset", "qwen3-coder-next", "--expert-dtype", "int4",
                 "--device-memory", "80GB", "--context", "32768", "--json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["shards"] == 1 and out["context"] == 32768 and out["expert_dtype"] == "int4"
    assert main(["plan", "--preset", "qwen3-coder-next"]) == 0
    text = capsys.readouterr().out
    assert "routed experts 77,309,411,328" in text and "shards at 80 GB" in text
    assert main(["plan", "--preset", "qwen3-coder-next", "--device-memory", "huge"]) == 2
    assert "expected a size" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path)]) == 2


def test_a_bf16_checkpoint_computed_in_fp32_is_planned_as_the_loaders_store_it(tmp_path):
    """Projections and experts of a bf16 checkpoint stay bf16 under fp32 compute (lossless);
    serve's check counts what the dense replica really allocates."""
    from workers.config import ModelConfig
    from workers.dense_worker import load_lm, local_experts
    from workers.make_checkpoint import make_checkpoint

    model = make_checkpoint(tmp_path / "m", preset="tiny", tokenizer=False, dtype="bfloat16")
    config = ModelConfig.from_hf(model)
    lm = load_lm(model, torch.float32, progress=False)
    experts = local_experts(model, torch.float32, progress=False).weights
    p = plan(config, "float32", lossless=True)
    assert p.dense_bytes == sum(t.nbytes for t in lm.state_dict().values())
    assert p.expert_dtype == "bfloat16"
    assert p.expert_bytes == sum(experts.w13[i].nbytes + experts.w2[i].nbytes
                                 for i in experts.layers)  # fmt: skip
    wide = plan(config, "float32")
    assert wide.dense_bytes > p.dense_bytes and wide.expert_bytes == 2 * p.expert_bytes
    fits = check_fits(ClusterConfig.from_dict({"experts": {"shards": 0}}), model, 10**12)
    assert fits["dense_bytes"] == p.dense_bytes and fits["expert_bytes"] == p.expert_bytes
