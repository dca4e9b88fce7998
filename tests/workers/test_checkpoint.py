"""Checkpoint loader: round trips through `make_checkpoint`, selectivity, and error messages."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.checkpoint import (
    CheckpointError,
    CheckpointReader,
    expected_dense_shapes,
    load_dense_weights,
    load_expert_weights,
)
from workers.config import ModelConfig
from workers.experts import ExpertWeights
from workers.make_checkpoint import make_checkpoint, random_weights

LAYOUTS = [("per-expert", None), ("fused", None), ("per-expert", 0.05), ("fused", 0.05)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for layout, shard in LAYOUTS:
        path = root / f"{layout}-{shard}"
        out[(layout, shard)] = make_checkpoint(
            path, "tiny", seed=3, expert_layout=layout, shard_size_mb=shard, tokenizer=False
        )
    return out


@pytest.fixture(scope="module")
def config(checkpoints: dict[tuple, Path]) -> ModelConfig:
    return ModelConfig.from_hf(checkpoints[("per-expert", None)])


@pytest.fixture(scope="module")
def fused_truth(config: ModelConfig) -> dict[str, torch.Tensor]:
    return random_weights(config, seed=3, expert_layout="fused")


@pytest.fixture
def single(checkpoints: dict[tuple, Path], tmp_path: Path) -> Path:
    """A private copy of the single-file per-expert checkpoint, safe to edit."""
    return Path(shutil.copytree(checkpoints[("per-expert", None)], tmp_path / "ck"))


def _rewrite(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _expert_rows(truth: dict[str, torch.Tensor], layer: int, ids: list[int]) -> tuple:
    p = f"model.layers.{layer}.mlp.experts"
    return truth[f"{p}.gate_up_proj"][ids], truth[f"{p}.down_proj"][ids]


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("layout,shard", LAYOUTS)
def test_round_trip_all_weights(checkpoints, config, fused_truth, layout, shard) -> None:
    path = checkpoints[(layout, shard)]
    if shard:
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    dense = load_dense_weights(path, config, progress=False)
    schema = expected_dense_shapes(config)
    assert dense.keys() == schema.keys()
    for key, tensor in dense.items():
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == schema[key]
        assert torch.equal(tensor, fused_truth[key]), key
    experts = load_expert_weights(path, config, progress=False)
    assert isinstance(experts, ExpertWeights)
    assert experts.experts == dict.fromkeys(experts.layers, tuple(range(config.num_experts)))
    assert experts.layers == tuple(range(config.num_hidden_layers))
    for layer in experts.layers:
        w13, w2 = _expert_rows(fused_truth, layer, list(range(config.num_experts)))
        assert torch.equal(experts.w13[layer], w13) and torch.equal(experts.w2[layer], w2)


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_subset_of_experts_and_layers(checkpoints, config, fused_truth, layout) -> None:
    ids, layers = [7, 3, 4, 5, 31, 0], [1, 3]
    w = load_expert_weights(
        checkpoints[(layout, None)], config, experts=ids, layers=layers, progress=False
    )
    assert w.experts == {1: tuple(ids), 3: tuple(ids)} and w.layers == (1, 3)
    for layer in layers:
        w13, w2 = _expert_rows(fused_truth, layer, ids)
        assert torch.equal(w.w13[layer], w13) and torch.equal(w.w2[layer], w2)
    assert w.local_ids(3, torch.tensor([[31, 7, -1]])).tolist() == [[4, 0, -1]]


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_per_layer_assignment_reads_only_those_experts(
    checkpoints, config, fused_truth, layout, reads
) -> None:
    """A shard holding expert 17 in layer 3 but not in layer 4 reads exactly those bytes."""
    wanted = {0: [5, 2], 2: [9, 10, 11], 3: [31]}
    w = load_expert_weights(checkpoints[(layout, None)], config, assignment=wanted, progress=False)
    assert w.experts == {layer: tuple(ids) for layer, ids in wanted.items()}
    for layer, ids in wanted.items():
        w13, w2 = _expert_rows(fused_truth, layer, ids)
        assert torch.equal(w.w13[layer], w13) and torch.equal(w.w2[layer], w2)
    read: dict[int, set[int]] = {}
    for key, index in reads:
        layer = int(key.split(".")[2])
        if index is None:  # per-expert: whole small tensors, one per (expert, projection)
            read.setdefault(layer, set()).add(int(key.split(".")[5]))
        else:  # fused: row slices only
            assert isinstance(index, slice)
            read.setdefault(layer, set()).update(range(index.start, index.stop))
    assert read == {layer: set(ids) for layer, ids in wanted.items()}
    with pytest.raises(CheckpointError, match="either assignment or experts/layers"):
        load_expert_weights(checkpoints[(layout, None)], config, experts=[1], assignment=wanted)
    with pytest.raises(CheckpointError, match=r"layer id 9 out of range"):
        load_expert_weights(checkpoints[(layout, None)], config, assignment={9: [1]})


def test_bfloat16_storage_casts(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "bf16", "tiny", dtype="bfloat16", tokenizer=False)
    config = ModelConfig.from_hf(path)
    truth = random_weights(config, expert_layout="fused")
    dense = load_dense_weights(path, config, dtype=torch.float32, progress=False)
    key = "model.layers.0.linear_attn.in_proj_qkvz.weight"
    assert dense[key].dtype == torch.float32 and torch.equal(dense[key], truth[key].float())
    w = load_expert_weights(path, config, experts=[2], layers=[0], dtype=torch.bfloat16)
    assert w.w13[0].dtype == torch.bfloat16
    assert torch.equal(w.w13[0], truth["model.layers.0.mlp.experts.gate_up_proj"][[2]])


# ---------------------------------------------------------------------------- selectivity
@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """Record every tensor read (key, None) and every slice read (key, index)."""
    log: list[tuple[str, object]] = []
    get, get_slice = CheckpointReader.get, CheckpointReader.get_slice

    class Recording:
        def __init__(self, key: str, inner) -> None:
            self.key, self.inner = key, inner

        def __getitem__(self, index):
            log.append((self.key, index))
            return self.inner[index]

        def get_shape(self):
            return self.inner.get_shape()

    def rec_get(self, key):
        log.append((key, None))
        return get(self, key)

    monkeypatch.setattr(CheckpointReader, "get", rec_get)
    monkeypatch.setattr(CheckpointReader, "get_slice", lambda s, k: Recording(k, get_slice(s, k)))
    return log


def test_per_expert_reads_only_requested_experts(checkpoints, config, reads) -> None:
    wanted = {2, 9, 10}
    load_expert_weights(checkpoints[("per-expert", 0.05)], config, experts=sorted(wanted))
    read_experts = {int(k.split(".")[5]) for k, index in reads if index is None}
    assert read_experts == wanted
    assert len([r for r in reads if r[1] is None]) == 3 * len(wanted) * config.num_hidden_layers


def test_fused_reads_only_requested_rows(checkpoints, config, reads) -> None:
    wanted = [2, 9, 10, 11, 30]
    load_expert_weights(checkpoints[("fused", None)], config, experts=wanted, progress=False)
    assert not [k for k, index in reads if index is None], "whole fused tensor was read"
    rows: dict[str, set[int]] = {}
    for key, index in reads:
        assert isinstance(index, slice) and index.step is None
        rows.setdefault(key, set()).update(range(index.start, index.stop))
    assert len(rows) == 2 * config.num_hidden_layers
    assert all(r == set(wanted) for r in rows.values())


def test_dense_load_reads_no_expert_tensors(checkpoints, config, reads) -> None:
    load_dense_weights(checkpoints[("per-expert", None)], config, progress=False)
    assert not [k for k, _ in reads if ".experts." in k]


# ------------------------------------------------------------------------ skipped & errors
def test_mtp_keys_skipped(single, config, caplog) -> None:
    def add_mtp(t):
        t["mtp.fc.weight"] = torch.ones(4, 4)
        t["mtp.layers.0.input_layernorm.weight"] = torch.ones(4)

    _rewrite(single, add_mtp)
    with caplog.at_level(logging.INFO, logger="workers.checkpoint"):
        dense = load_dense_weights(single, config, progress=False)
    assert not [k for k in dense if k.startswith("mtp.")]
    assert [r.getMessage() for r in caplog.records if "mtp" in r.getMessage()] == [
        "skipping 2 mtp.* tensors (multi-token prediction is not used)"
    ]


def test_missing_dense_key(single, config) -> None:
    key = "model.layers.3.self_attn.q_norm.weight"
    _rewrite(single, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"{key}: missing .*expected shape \(32,\)"):
        load_dense_weights(single, config, progress=False)


def test_wrong_shape(single, config) -> None:
    key = "model.layers.0.linear_attn.out_proj.weight"
    _rewrite(single, lambda t: t.__setitem__(key, torch.zeros(64, 32)))
    with pytest.raises(CheckpointError, match=rf"{key}: expected shape \(64, 64\), got \(64, 32\)"):
        load_dense_weights(single, config, progress=False)


def test_missing_and_misshapen_expert(single, config) -> None:
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    _rewrite(single, lambda t: t.pop(key))
    load_expert_weights(single, config, experts=[4, 6], progress=False)  # 5 is not needed
    with pytest.raises(CheckpointError, match=rf"{key}: missing .*expected shape \(32, 64\)"):
        load_expert_weights(single, config, experts=[4, 5], progress=False)
    _rewrite(single, lambda t: t.__setitem__(key, torch.zeros(32, 63)))
    with pytest.raises(CheckpointError, match=rf"{key}: expected shape \(32, 64\), got \(32, 63\)"):
        load_expert_weights(single, config, experts=[5], progress=False)


def test_expert_and_layer_ids_validated(single, config) -> None:
    with pytest.raises(CheckpointError, match=r"expert id 32 out of range \[0, 32\)"):
        load_expert_weights(single, config, experts=[1, 32])
    with pytest.raises(CheckpointError, match=r"expert id -1 out of range"):
        load_expert_weights(single, config, experts=[-1])
    with pytest.raises(CheckpointError, match=r"layer id 4 out of range"):
        load_expert_weights(single, config, experts=[1], layers=[4])
    with pytest.raises(CheckpointError, match=r"duplicates"):
        load_expert_weights(single, config, experts=[1, 1])


def test_missing_dir_config_and_weights(single, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        CheckpointReader(tmp_path / "nope")
    (single / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index"):
        CheckpointReader(single)
    (single / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: not found"):
        CheckpointReader(single)


def test_sharded_errors(checkpoints, config, tmp_path) -> None:
    path = Path(shutil.copytree(checkpoints[("per-expert", 0.05)], tmp_path / "ck"))
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.layers.1.mlp.gate.weight"
    right = index["weight_map"][key]
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != right)
    index["weight_map"][key] = wrong
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{key}: listed in .* missing from {wrong}"):
        load_dense_weights(path, config, progress=False)
    (path / right).unlink()
    other = next(k for k, f in index["weight_map"].items() if f == right)
    with pytest.raises(CheckpointError, match=rf"shard file {right} not found"):
        CheckpointReader(path).get(other)


def test_reader_api(checkpoints) -> None:
    with CheckpointReader(checkpoints[("fused", 0.05)]) as reader:
        key = "model.layers.0.mlp.experts.gate_up_proj"
        assert key in reader and key in reader.keys()
        assert reader.shape(key) == (32, 64, 64)
        assert reader.filename(key).startswith("model-")
        assert torch.equal(reader.get_slice(key)[3:5], reader.get(key)[3:5])
        with pytest.raises(CheckpointError, match="nope: not in checkpoint"):
            reader.get("nope")


def test_progress_bar_on_stderr(checkpoints, config, capsys) -> None:
    path = checkpoints[("per-expert", None)]
    load_expert_weights(path, config, layers=[0], progress=True)  # 96 tensors
    assert "expert weights" in capsys.readouterr().err
    load_expert_weights(path, config, layers=[0], progress=False)
    load_dense_weights(path, config, progress=True)  # 58 tensors: too few for a bar
    assert capsys.readouterr().err == ""
