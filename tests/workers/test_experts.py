import pytest
import torch

from workers.experts import (
    ExpertWeights,
    LocalExpertBackend,
    UnknownExpertError,
    _sorted_loop,
    grouped_swiglu,
    naive_experts,
)


def _random(E=24, H=64, I=32, T=19, K=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    return x, ids, w, w13, w2


@pytest.mark.parametrize("T", [1, 5, 19, 200])
def test_grouped_equals_naive_loop(T):
    x, ids, w, w13, w2 = _random(T=T)
    ref = naive_experts(x, ids, w, w13, w2)
    assert (grouped_swiglu(x, ids, w, w13, w2) - ref).abs().max() < 1e-5


def test_padding_ids_are_skipped():
    x, ids, w, w13, w2 = _random()
    ids[0, 2:] = -1
    ids[5, :] = -1
    out = grouped_swiglu(x, ids, w, w13, w2)
    assert torch.allclose(out, naive_experts(x, ids, w, w13, w2), atol=1e-5)
    assert torch.all(out[5] == 0)


def test_fallback_loop_matches_grouped_mm():
    x, ids, w, w13, w2 = _random(T=50)
    counts = torch.tensor([3, 0, 5, 2])
    xs = torch.randn(10, 64)
    ref = torch.cat([xs[:3] @ w13[0].t(), xs[3:8] @ w13[2].t(), xs[8:] @ w13[3].t()])
    assert torch.allclose(_sorted_loop(xs, w13[:4], counts), ref, atol=1e-5)


def test_subset_weights_map_global_ids():
    x, ids, w, w13, w2 = _random(E=8, K=2)
    held = (1, 4, 6)
    sub = ExpertWeights(held, {0: w13[list(held)]}, {0: w2[list(held)]})
    gids = torch.tensor([[4, 6], [1, -1]])
    assert sub.local_ids(0, gids).tolist() == [[1, 2], [0, -1]]
    out = sub.compute(0, x[:2], gids, w[:2])
    assert torch.allclose(out, naive_experts(x[:2], gids, w[:2], w13, w2), atol=1e-5)
    with pytest.raises(UnknownExpertError, match="layer 0: expert 2 is not held"):
        sub.compute(0, x[:1], torch.tensor([[2, 4]]), w[:1])
    with pytest.raises(UnknownExpertError, match="layer 0: expert 9 is not held"):
        sub.local_ids(0, torch.tensor([[9]]))
    with pytest.raises(UnknownExpertError, match="layer 1: expert 4 is not held"):
        sub.local_ids(1, torch.tensor([[4]]))


def test_per_layer_holdings_and_live_changes():
    """A set may hold expert 5 in layer 3 but not in layer 4; with/without make new sets."""
    x, ids, w, w13, w2 = _random(E=8, K=2)
    sets = {3: (5, 1), 4: (2,)}
    weights = ExpertWeights(
        sets, {k: w13[list(v)] for k, v in sets.items()}, {k: w2[list(v)] for k, v in sets.items()}
    )
    assert weights.holdings() == {3: [1, 5], 4: [2]}
    assert weights.missing(4, torch.tensor([[5, 2], [-1, 7]])) == [5, 7]
    gids = torch.tensor([[5, 1], [1, -1]])
    want = naive_experts(x[:2], gids, w[:2], w13, w2)
    assert torch.allclose(weights.compute(3, x[:2], gids, w[:2]), want, atol=1e-5)
    extra = ExpertWeights({4: (5,), 6: (0,)}, {4: w13[[5]], 6: w13[[0]]}, {4: w2[[5]], 6: w2[[0]]})
    grown = weights.with_experts(extra)
    assert grown.holdings() == {3: [1, 5], 4: [2, 5], 6: [0]}
    assert weights.holdings() == {3: [1, 5], 4: [2]}  # the original is untouched
    assert grown.w13[3] is weights.w13[3]  # untouched layers share their tensors
    assert torch.allclose(
        grown.compute(4, x[:2], gids.clamp(max=5).fill_(5), w[:2]),
        naive_experts(x[:2], torch.full((2, 2), 5), w[:2], w13, w2),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="layer 4: expert 5 is already held"):
        grown.with_experts(extra)
    shrunk = grown.without_experts({3: [5, 7], 6: [0]})
    assert shrunk.holdings() == {3: [1], 4: [2, 5]} and 6 not in shrunk.w13
    assert torch.equal(shrunk.w13[3][0], w13[1])
    pad = torch.full((2, 2), -1)  # a layer with nothing held: padding only gives zeros
    assert torch.equal(weights.compute(9, x[:2], pad, w[:2]), torch.zeros_like(x[:2]))
    assert weights.local_ids(9, pad).tolist() == pad.tolist() and weights.missing(9, pad) == []
    with pytest.raises(UnknownExpertError, match=r"layer 9: expert 5 is not held here \(nor 1"):
        weights.compute(9, x[:2], torch.tensor([[5, -1], [6, 5]]), w[:2])
    with pytest.raises(ValueError, match="layer 3: 2 distinct non-negative expert ids"):
        ExpertWeights({3: (1, 1)}, {3: w13[:2]}, {3: w2[:2]})


def test_local_backend_submit_result():
    x, ids, w, w13, w2 = _random()
    be = LocalExpertBackend(ExpertWeights(tuple(range(24)), {3: w13}, {3: w2}))
    assert torch.allclose(
        be.submit(3, x, ids, w).result(), naive_experts(x, ids, w, w13, w2), atol=1e-5
    )


@pytest.mark.parametrize("T, grouped", [(1, False), (64, True)])
def test_kernel_choice_by_active_experts_gives_the_same_result(T, grouped):
    """Few active experts take the loop over experts with work, many take grouped_mm."""
    from workers.experts import _use_grouped_mm

    x, ids, w, w13, w2 = _random(E=128, T=T, K=8)
    counts = torch.bincount(ids.flatten(), minlength=128)
    assert _use_grouped_mm(x, w13, w2, counts) is grouped
    assert (
        grouped_swiglu(x, ids, w, w13, w2) - naive_experts(x, ids, w, w13, w2)
    ).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_live_changes_of_packed_experts(kind):
    """Adding and releasing experts keeps packed storage packed and exact per expert."""
    from workers.experts import pack_experts

    x, ids, w, w13, w2 = _random(E=8, K=2)
    base = pack_experts(ExpertWeights({0: (1, 4)}, {0: w13[[1, 4]]}, {0: w2[[1, 4]]}), kind)
    extra = pack_experts(ExpertWeights({0: (6,)}, {0: w13[[6]]}, {0: w2[[6]]}), kind)
    full = pack_experts(
        ExpertWeights({0: (1, 4, 6)}, {0: w13[[1, 4, 6]]}, {0: w2[[1, 4, 6]]}), kind
    )
    grown = base.with_experts(extra)
    assert grown.holdings() == {0: [1, 4, 6]} and grown.w13[0].kind == kind
    gids = torch.tensor([[6, 1], [4, 6]])
    assert torch.equal(grown.compute(0, x[:2], gids, w[:2]), full.compute(0, x[:2], gids, w[:2]))
    shrunk = grown.without_experts({0: [4]})
    assert shrunk.holdings() == {0: [1, 6]} and shrunk.w13[0].kind == kind
    gids = torch.tensor([[6, 1]])
    assert torch.equal(shrunk.compute(0, x[:1], gids, w[:1]), full.compute(0, x[:1], gids, w[:1]))
    mixed = base.with_experts(ExpertWeights({0: (6,)}, {0: w13[[6]]}, {0: w2[[6]]}))
    assert isinstance(mixed.w13[0], torch.Tensor) and mixed.holdings() == {0: [1, 4, 6]}
    gids = torch.tensor([[4, 6]])
    plain = ExpertWeights({0: (1, 4)}, {0: base.w13[0].dequantize()}, {0: base.w2[0].dequantize()})
    plain = plain.with_experts(ExpertWeights({0: (6,)}, {0: w13[[6]]}, {0: w2[[6]]}))
    assert torch.equal(mixed.compute(0, x[:1], gids, w[:1]), plain.compute(0, x[:1], gids, w[:1]))
