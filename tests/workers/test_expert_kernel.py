"""The fused CPU expert kernel and the packed (bf16 / int8 / int4) expert formats."""

import pytest
import torch

from workers import expert_kernel
from workers.experts import _torch_swiglu, grouped_swiglu, naive_experts
from workers.quant import EXPERT_DTYPES, ExpertPack, pack, packable

pytestmark = pytest.mark.skipif(not expert_kernel.load(), reason="no C++ compiler here")


def _random(E=24, H=64, I=32, T=19, K=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    return x, ids, w, w13, w2


@pytest.mark.parametrize("T", [1, 3, 4, 5, 19, 130])
def test_fused_fp32_equals_reference(T):
    x, ids, w, w13, w2 = _random(T=T)
    ids[0, -2:] = -1  # padding
    out = expert_kernel.moe_swiglu(x, ids, w, w13, w2)
    ref = naive_experts(x, ids, w, w13, w2)
    assert (out - ref).abs().max() < 2e-6
    assert (out - _torch_swiglu(x, ids, w, w13, w2)).abs().max() < 2e-6


def test_grouped_swiglu_takes_the_fused_path_and_the_torch_path_agrees(monkeypatch):
    x, ids, w, w13, w2 = _random(T=7)
    calls = []
    real = expert_kernel.moe_swiglu
    monkeypatch.setattr(expert_kernel, "moe_swiglu", lambda *a: calls.append(1) or real(*a))
    fused = grouped_swiglu(x, ids, w, w13, w2)
    assert calls == [1]
    monkeypatch.setattr(expert_kernel, "supports", lambda *a: False)
    torch_path = grouped_swiglu(x, ids, w, w13, w2)
    assert calls == [1]
    assert (fused - torch_path).abs().max() < 2e-6


def test_per_pair_results_do_not_depend_on_the_other_pairs():
    """A shard computing a subset of the pairs gets exactly the same per-token values."""
    x, ids, w, w13, w2 = _random(T=23, K=1)
    full = expert_kernel.moe_swiglu(x, ids, w, w13, w2)
    for keep in (slice(0, 1), slice(5, 12), slice(3, 23, 4)):
        part = expert_kernel.moe_swiglu(x[keep], ids[keep], w[keep], w13, w2)
        assert torch.equal(part, full[keep])


@pytest.mark.parametrize("kind", EXPERT_DTYPES)
@pytest.mark.parametrize("T", [1, 6, 33])
def test_fused_packed_equals_dequantized_reference(kind, T):
    x, ids, w, w13, w2 = _random(T=T)
    a, b = pack(w13, kind, 32), pack(w2, kind, 32)
    ref = naive_experts(x, ids, w, a.dequantize(), b.dequantize())
    assert (expert_kernel.moe_swiglu(x, ids, w, a, b) - ref).abs().max() < 2e-6


@pytest.mark.parametrize("kind", EXPERT_DTYPES)
def test_packed_torch_fallback(kind, monkeypatch):
    x, ids, w, w13, w2 = _random(T=9)
    ids[2, 1] = -1
    a, b = pack(w13, kind, 32), pack(w2, kind, 32)
    fused = grouped_swiglu(x, ids, w, a, b)
    monkeypatch.setattr(expert_kernel, "supports", lambda *args: False)
    assert (grouped_swiglu(x, ids, w, a, b) - fused).abs().max() < 2e-6


@pytest.mark.parametrize(("kind", "tol"), [("float32", 0), ("bfloat16", 3e-3), ("int8", 8e-3),
                                           ("int4", 0.11)])  # fmt: skip
def test_quantisation_error_is_bounded(kind, tol):
    w = torch.randn(3, 8, 128, generator=torch.Generator().manual_seed(0))
    p = pack(w, kind, 64)
    rms = float(((p.dequantize() - w) ** 2).mean().sqrt() / w.std())
    assert rms <= tol
    assert p.shape == (3, 8, 128)
    expected = {"float32": 4 * 3 * 8 * 128, "bfloat16": 2 * 3 * 8 * 128,
                "int8": 3 * 8 * 128 + 4 * 3 * 8, "int4": 3 * 8 * 64 + 4 * 3 * 8 * 2}  # fmt: skip
    assert p.nbytes == expected[kind]


def test_int4_layout_and_select():
    w = torch.arange(32, dtype=torch.float32).view(1, 1, 32) - 16  # q = w with scale 16/7
    p = pack(w.repeat(3, 1, 1) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1), "int4", 32)
    assert p.data.dtype == torch.uint8 and p.data.shape == (3, 1, 16)
    # byte b: input b (low nibble), input 16 + b (high nibble)
    q = torch.round(w[0, 0] / p.scales[0, 0, 0]).clamp(-8, 7) + 8
    assert int(p.data[0, 0, 0]) == int(q[0]) | (int(q[16]) << 4)
    sub = p.select([2, 0])
    assert torch.equal(sub.dequantize(), p.dequantize()[[2, 0]])
    assert isinstance(sub, ExpertPack) and len(sub) == 2


def test_int4_scale_search_beats_plain_absmax():
    from workers.quant import _int4_scales

    g = torch.randn(64, 4, 64, generator=torch.Generator().manual_seed(1))
    plain = g.abs().amax(-1) / 7

    def err(s):
        q = torch.round(g / s.unsqueeze(-1)).clamp(-8, 7)
        return float(((q * s.unsqueeze(-1) - g) ** 2).sum())

    assert err(_int4_scales(g)) < 0.9 * err(plain)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="expected one of"):
        pack(torch.zeros(1, 2, 32), "fp8")
    with pytest.raises(ValueError, match="multiple of the group"):
        pack(torch.zeros(1, 2, 48), "int4", 32)
    assert packable("int4", 64, 48) is not None
    assert packable("int8", 64, 48) is None


def test_mismatched_packs_are_rejected():
    x, ids, w, w13, w2 = _random(T=2)
    with pytest.raises(ValueError, match="int8"):
        expert_kernel.moe_swiglu(x, ids, w, pack(w13, "int8"), pack(w2, "bfloat16"))
    with pytest.raises(RuntimeError, match="out of range"):
        expert_kernel.moe_swiglu(x, ids + 100, w, w13, w2)


def test_env_switch_turns_the_kernel_off_and_results_stay(monkeypatch):
    x, ids, w, w13, w2 = _random(T=5)
    fused = grouped_swiglu(x, ids, w, w13, w2)
    monkeypatch.setattr(expert_kernel.LIBRARY, "state", {})
    monkeypatch.setenv(expert_kernel.ENV, "torch")
    assert expert_kernel.load() is False
    assert expert_kernel.status()["reason"] == f"{expert_kernel.ENV}=torch"
    assert (grouped_swiglu(x, ids, w, w13, w2) - fused).abs().max() < 2e-6


def test_build_failure_falls_back_to_torch(monkeypatch, tmp_path):
    """No compiler: load() reports False with the reason, grouped_swiglu still computes."""
    monkeypatch.setattr(expert_kernel.LIBRARY, "state", {})
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(expert_kernel.LIBRARY, "source", tmp_path / "broken.cpp")
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    assert expert_kernel.load() is False
    assert expert_kernel.status()["reason"]
    x, ids, w, w13, w2 = _random(T=3)
    assert (
        grouped_swiglu(x, ids, w, w13, w2) - naive_experts(x, ids, w, w13, w2)
    ).abs().max() < 2e-6


def test_pack_experts_and_loader_storage(tmp_path):
    """Checkpoint experts loaded as int8 compute what their dequantised weights compute."""
    from workers.checkpoint import load_expert_weights
    from workers.config import ModelConfig
    from workers.experts import pack_experts
    from workers.make_checkpoint import make_checkpoint

    model = make_checkpoint(tmp_path / "m", preset="tiny", tokenizer=False)
    config = ModelConfig.from_hf(model)
    plain = load_expert_weights(model, config, layers=[1], progress=False)
    packed = load_expert_weights(model, config, layers=[1], progress=False, storage="int8")
    assert packed.w13[1].kind == "int8" and packed.dtype == torch.float32
    assert torch.equal(packed.w13[1].data, pack_experts(plain, "int8").w13[1].data)
    x, ids, w, *_ = _random(E=config.num_experts, H=config.hidden_size, T=4, K=2)
    ref = naive_experts(x, ids, w, packed.w13[1].dequantize(), packed.w2[1].dequantize())
    assert (packed.compute(1, x, ids, w) - ref).abs().max() < 2e-6
    assert pack_experts(plain, None) is plain


def test_lossless_pack_only_when_no_value_changes():
    from workers.experts import lossless_pack

    x, ids, w, w13, w2 = _random(T=6)
    b13, b2 = w13.bfloat16().float(), w2.bfloat16().float()
    p13, p2 = lossless_pack(b13, b2)
    assert p13.kind == "bfloat16" and p2.kind == "bfloat16"
    assert torch.equal(grouped_swiglu(x, ids, w, p13, p2), grouped_swiglu(x, ids, w, b13, b2))
    same13, same2 = lossless_pack(w13, b2)  # w13 needs fp32
    assert same13 is w13 and same2 is b2


def test_local_experts_of_a_bf16_checkpoint_are_bf16_and_bit_identical(tmp_path):
    from workers.dense_worker import local_experts
    from workers.make_checkpoint import make_checkpoint

    model = make_checkpoint(tmp_path / "m", preset="tiny", dtype="bfloat16", tokenizer=False)
    auto = local_experts(model, torch.float32, progress=False).weights
    plain = local_experts(model, torch.float32, progress=False, storage="float32").weights
    assert auto.w13[0].kind == "bfloat16" and plain.w13[0].kind == "float32"
    assert auto.w13[0].nbytes * 2 == plain.w13[0].nbytes
    x, ids, w, *_ = _random(E=32, H=64, T=5, K=4)
    assert torch.equal(auto.compute(0, x, ids, w), plain.compute(0, x, ids, w))
