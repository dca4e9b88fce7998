import torch

from workers.delta_rule import chunk_gated_delta_rule, naive_gated_delta_rule


def test_chunked_equals_token_by_token_with_initial_state():
    g = torch.Generator().manual_seed(0)
    hv, length, dk, dv = 4, 150, 16, 8
    q, k = torch.randn(hv, length, dk, generator=g), torch.randn(hv, length, dk, generator=g)
    v = torch.randn(hv, length, dv, generator=g)
    decay = -torch.rand(hv, length, generator=g)
    beta = torch.rand(hv, length, generator=g)
    s0 = torch.randn(hv, dk, dv, generator=g) * 0.1
    o1, s1 = chunk_gated_delta_rule(q, k, v, decay, beta, s0)
    o2, s2 = naive_gated_delta_rule(q, k, v, decay, beta, s0)
    assert (o1 - o2).abs().max() < 1e-5 and (s1 - s2).abs().max() < 1e-5
