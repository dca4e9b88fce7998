"""Random checkpoint generator: transformers loads it, weights are sane, output is reproducible."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workers import make_checkpoint as mc
from workers.checkpoint import load_expert_weights
from workers.config import ModelConfig
from workers.make_checkpoint import (
    build_tokenizer,
    ensure_demo_checkpoint,
    make_checkpoint,
    random_weights,
)

transformers = pytest.importorskip("transformers")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ck", "tiny")


def test_files_and_config(tiny: Path) -> None:
    names = {p.name for p in tiny.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    raw = json.loads((tiny / "config.json").read_text())
    assert raw["model_type"] == "qwen3_next" and raw["dtype"] == "float32"
    config = ModelConfig.from_hf(tiny)
    tok = build_tokenizer()
    assert config.vocab_size == 1024 >= tok.get_vocab_size()
    assert config.eos_token_ids == (tok.token_to_id("<|im_end|>"),)
    assert config.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert (config.hidden_size, config.num_experts, config.num_experts_per_tok) == (64, 32, 4)
    assert config.layer_types[-1] == "full_attention" and len(config.linear_layers) == 3


@pytest.mark.parametrize("layout,shard", [("per-expert", None), ("fused", None), ("fused", 0.2)])
def test_transformers_loads_it(tiny: Path, tmp_path: Path, layout: str, shard) -> None:
    path = tiny if layout == "per-expert" else tmp_path / "ck"
    if path != tiny:
        make_checkpoint(path, "tiny", expert_layout=layout, shard_size_mb=shard, tokenizer=False)
    model, info = transformers.Qwen3NextForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    truth = random_weights(ModelConfig.from_hf(path), expert_layout="fused")
    state = model.state_dict()
    assert state.keys() == truth.keys()
    for key, tensor in state.items():  # gate rows come first in HF's fused gate_up_proj too
        assert torch.equal(tensor, truth[key]), key
    ids = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert torch.isfinite(logits).all()
    assert logits.std(-1).min() > 1.0
    top2 = logits.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    assert gap.median() > 0.1 and gap.min() > 1e-4
    assert logits.argmax(-1).unique().numel() > 5  # greedy does not collapse to one token


def test_every_parameter_perturbed(tiny: Path) -> None:
    tensors = load_file(tiny / "model.safetensors")
    for key, t in tensors.items():
        assert t.std() > 0.01, key
        if key.endswith("layernorm.weight") or key.endswith(("q_norm.weight", "k_norm.weight")):
            assert 0.05 < t.std() < 0.2 and t.mean().abs() < 0.1, key
    assert (tensors["model.layers.0.linear_attn.norm.weight"].mean() - 1).abs() < 0.1
    a_log = torch.cat([t for k, t in tensors.items() if k.endswith("A_log")])
    assert a_log.min() >= 0 and a_log.max() <= torch.tensor(16.0).log()
    conv = tensors["model.layers.0.linear_attn.conv1d.weight"]
    assert 0.3 < conv.std() < 0.7  # ~ 1/sqrt(K)


def test_deterministic_in_seed(tiny: Path, tmp_path: Path) -> None:
    again = make_checkpoint(tmp_path / "again", "tiny")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert _digest(again / name) == _digest(tiny / name), name
    other = load_file(make_checkpoint(tmp_path / "s1", "tiny", seed=1) / "model.safetensors")
    key = "model.embed_tokens.weight"
    assert not torch.equal(other[key], load_file(tiny / "model.safetensors")[key])
    assert build_tokenizer().to_str() == build_tokenizer().to_str()


def test_sharded_index(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "ck", "tiny", shard_size_mb=1, tokenizer=False)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    total = 0
    for name in files:
        shard = load_file(path / name)
        assert {k for k, f in index["weight_map"].items() if f == name} == shard.keys()
        nbytes = sum(t.numel() * t.element_size() for t in shard.values())
        assert nbytes <= 2**20 or len(shard) == 1
        total += nbytes
    assert index["metadata"]["total_size"] == total
    assert not (path / "model.safetensors").exists()


def test_tokenizer_offline(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    assert len(tok) == 1024
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for text in [
        "The quick brown fox jumps over the lazy dog.",
        "def f(x: int) -> int:\n    return x * 2  # double\n\n",
        "Unicode: café, naïve, 日本語, emoji 🙂, tabs\tand  spaces",
    ]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert len(tok.encode("the model", add_special_tokens=False)) < len("the model")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [1022]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser(prog="expertmesh")
    mc.add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["make-checkpoint", str(out), "--preset", "tiny", "--seed", "2", "--dtype", "bfloat16"]
        + ["--expert-layout", "fused", "--no-tokenizer", "--shard-size-mb", "2"]
    )
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert ModelConfig.from_hf(out).torch_dtype == "bfloat16"
    assert (out / "model.safetensors.index.json").is_file()
    assert not (out / "tokenizer.json").exists()


def test_ensure_demo_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path))
    path = ensure_demo_checkpoint("tiny", seed=0)
    assert path == mc.default_demo_dir("tiny", 0) and path.parent == tmp_path
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dir left behind

    def boom(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(mc, "make_checkpoint", boom)
    assert ensure_demo_checkpoint("tiny", seed=0) == path


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preset"):
        make_checkpoint(tmp_path / "a", "huge")
    with pytest.raises(ValueError, match="expert_layout"):
        make_checkpoint(tmp_path / "b", "tiny", expert_layout="stacked")
    with pytest.raises(ValueError, match="dtype"):
        make_checkpoint(tmp_path / "c", "tiny", dtype="float16")


@pytest.mark.slow
def test_small_preset(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "small", "small", tokenizer=False)
    config = ModelConfig.from_hf(path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_experts) == (256, 8, 512)
    assert (config.num_experts_per_tok, config.torch_dtype) == (10, "bfloat16")
    assert config.full_layers == (3, 7)
    w = load_expert_weights(path, config, experts=[0, 511], layers=[7], progress=False)
    truth = random_weights(config, expert_layout="fused")["model.layers.7.mlp.experts.down_proj"]
    assert torch.equal(w.w2[7], truth[[0, 511]].float())


def test_skew_scales_only_hot_gate_rows_and_makes_them_hot(tiny: Path, tmp_path: Path) -> None:
    from workers.dense_worker import DenseWorker, local_experts
    from workers.expert_load import CountingExpertBackend
    from workers.sampler import SamplingParams

    path = make_checkpoint(tmp_path / "skew", "tiny", skew=(4, 3.0), tokenizer=False)
    skewed, plain = load_file(path / "model.safetensors"), load_file(tiny / "model.safetensors")
    assert skewed.keys() == plain.keys()  # no new parameters
    config = ModelConfig.from_hf(path)
    for key in plain:
        if not key.endswith("mlp.gate.weight"):
            assert torch.equal(skewed[key], plain[key]), key
            continue
        layer = int(key.split(".")[2])
        hot = mc.hot_experts(config, layer, 0, 4)
        cold = [e for e in range(config.num_experts) if e not in hot]
        torch.testing.assert_close(skewed[key][hot], plain[key][hot] * 3.0)
        assert torch.equal(skewed[key][cold], plain[key][cold])
    assert mc.hot_experts(config, 0, 0, 4) != mc.hot_experts(config, 1, 0, 4)  # per layer
    model, info = transformers.Qwen3NextForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    counting = CountingExpertBackend(
        local_experts(path, torch.float32, False), config.num_hidden_layers, config.num_experts
    )
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (24,), generator=gen).tolist() for _ in range(6)]
    DenseWorker(str(path), experts=counting).generate(prompts, SamplingParams(max_tokens=4))
    counts = counting.take().float()
    for layer in range(config.num_hidden_layers):
        share = counts[layer, mc.hot_experts(config, layer, 0, 4)].sum() / counts[layer].sum()
        assert share > 2 * 4 / config.num_experts, (layer, share)  # > 2x a uniform share
    with pytest.raises(ValueError, match="skew: hot experts"):
        make_checkpoint(tmp_path / "bad", "tiny", skew=(0, 2.0), tokenizer=False)
    parser = argparse.ArgumentParser()
    mc.add_cli(parser.add_subparsers())
    args = parser.parse_args(["make-checkpoint", "x", "--skew", "8:2.5"])
    assert args.skew == (8, 2.5)
    with pytest.raises(SystemExit):
        parser.parse_args(["make-checkpoint", "x", "--skew", "8"])
