"""The gated delta rule: chunked form for prefill, recurrent form for decode.

Shape legend
    Hv  value heads (q/k are already repeated to Hv)     L  tokens of one sequence
    Dk  key head dim      Dv  value head dim              C  chunk size (64)
    N   chunks (L padded up to a multiple of C)           B  sequences in a decode batch
    S   recurrent state [.., Hv, Dk, Dv], read as o = q @ S

Recurrence per token t (g_t <= 0 is the log decay, beta_t in (0, 1)):
    S <- exp(g_t) * S
    S <- S + k_t (beta_t * (v_t - k_t @ S))^T
    o_t = q_t @ S
Inputs q, k are L2-normalised here and q is scaled by Dk^-1/2. All math is fp32.
"""

from __future__ import annotations

import torch

CHUNK = 64


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _prepare(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = l2_normalize(q.float())
    k = l2_normalize(k.float())
    return q * q.shape[-1] ** -0.5, k


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence. q, k [Hv, L, Dk], v [Hv, L, Dv], g, beta [Hv, L], state [Hv, Dk, Dv].

    Returns (o [Hv, L, Dv] fp32, new state [Hv, Dk, Dv] fp32).
    """
    q, k = _prepare(q, k)
    v, g, beta = v.float(), g.float(), beta.float()
    hv, length, dk = k.shape
    pad = (-length) % chunk
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, pad)) for x in (g, beta))
    n = (length + pad) // chunk
    q, k, v = (x.reshape(hv, n, chunk, x.shape[-1]) for x in (q, k, v))  # [Hv, N, C, D]
    g, beta = g.reshape(hv, n, chunk), beta.reshape(hv, n, chunk)  # [Hv, N, C]

    gamma = g.cumsum(-1)  # [Hv, N, C] cumulative log decay inside each chunk
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    kb = k * beta[..., None]  # [Hv, N, C, Dk]
    # WY form: (I + strictly_lower(beta_i k_i.k_j decay_ij)) [U | W] = [beta v | beta e^gamma k]
    system = (kb @ k.transpose(-1, -2)) * decay  # [Hv, N, C, C]
    rhs = torch.cat([v * beta[..., None], kb * gamma.exp()[..., None]], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u, w = solved.split([v.shape[-1], dk], dim=-1)  # [Hv, N, C, Dv], [Hv, N, C, Dk]
    attn = (q @ k.transpose(-1, -2)) * decay  # intra-chunk, diagonal included
    q_decayed = q * gamma.exp()[..., None]
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]  # decay from token to chunk end
    chunk_decay = gamma[..., -1].exp()[..., None, None]  # [Hv, N, 1, 1]

    s = state.float()
    out = torch.empty_like(v)
    for i in range(n):
        v_new = u[:, i] - w[:, i] @ s  # [Hv, C, Dv]
        out[:, i] = q_decayed[:, i] @ s + attn[:, i] @ v_new
        s = s * chunk_decay[:, i] + k_to_end[:, i].transpose(-1, -2) @ v_new
    return out.reshape(hv, n * chunk, -1)[:, :length], s


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for each of B sequences. q, k [B, Hv, Dk], v [B, Hv, Dv], g, beta [B, Hv],
    state [B, Hv, Dk, Dv]. Returns (o [B, Hv, Dv] fp32, new state fp32)."""
    q, k = _prepare(q, k)
    s = state.float() * g.float().exp()[..., None, None]
    kv_mem = torch.einsum("bhk,bhkv->bhv", k, s)
    delta = (v.float() - kv_mem) * beta.float()[..., None]
    s = s + k[..., :, None] * delta[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q, s), s


def naive_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token reference for one sequence (same shapes as the chunked form)."""
    outs = []
    s = state.float()[None]
    for t in range(q.shape[1]):
        o, s = recurrent_gated_delta_rule(
            q[None, :, t], k[None, :, t], v[None, :, t], g[None, :, t], beta[None, :, t], s
        )
        outs.append(o[0])
    return torch.stack(outs, dim=1), s[0]
