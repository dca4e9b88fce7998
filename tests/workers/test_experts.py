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
    out = sub.compute(0, x[:2], sub.local_ids(gids), w[:2])
    assert torch.allclose(out, naive_experts(x[:2], gids, w[:2], w13, w2), atol=1e-5)
    with pytest.raises(UnknownExpertError, match="expert 2"):
        sub.local_ids(torch.tensor([[2, 4]]))
    with pytest.raises(UnknownExpertError, match="expert 9"):
        sub.local_ids(torch.tensor([[9]]))


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
