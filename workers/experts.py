"""Routed-expert computation and the expert-backend seam.

Shape legend
    T  tokens in the step            H  hidden size
    K  experts per token (top-k)     I  expert intermediate size
    E  experts held (all, or a shard's subset)
    N  (token, expert) pairs actually computed (T*K minus padding)

The model never calls experts directly: it hands a layer's routed work to an `ExpertBackend`
(`submit` returns a handle, `result()` gives [T, H]). The local backend computes in process;
the remote backend (router/) ships the work to expert shards. Both use `ExpertWeights.compute`,
so a shard's answer is bit-for-bit the local one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from workers import expert_kernel, quant
from workers.quant import ExpertPack

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


class ExpertHandle(Protocol):
    def result(self) -> torch.Tensor:
        """Block until the weighted expert sum [T, H] is ready and return it."""
        ...


class ExpertBackend(Protocol):
    def submit(
        self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> ExpertHandle:
        """Start one layer's routed work: hidden [T, H], ids [T, K] (global), weights [T, K]."""
        ...


class DoneHandle:
    """A handle whose result is already computed."""

    def __init__(self, value: torch.Tensor) -> None:
        self._value = value

    def result(self) -> torch.Tensor:
        return self._value


class UnknownExpertError(ValueError):
    """An expert id is not held by this set of weights (the message names layer and expert)."""


@dataclass(eq=False)
class ExpertWeights:
    """SwiGLU weights of the experts held, per layer (a shard may hold expert 17 in layer 3 and
    not in layer 4).

    `experts[layer]` are the global ids held in that layer, in row order; `w13[layer]` is
    [E_l, 2I, H] (gate rows then up rows, like HF's fused `gate_up_proj`) and `w2[layer]` is
    [E_l, H, I]; row r of both belongs to global expert `experts[layer][r]`. `experts` may be
    given as one id sequence shared by every layer of `w13`. Treat instances as immutable:
    `with_experts` / `without_experts` return new ones (shards swap them in atomically).
    """

    experts: dict[int, tuple[int, ...]] | Sequence[int]
    w13: dict[int, torch.Tensor | ExpertPack]
    w2: dict[int, torch.Tensor | ExpertPack]

    def __post_init__(self) -> None:
        if not isinstance(self.experts, Mapping):
            shared = tuple(int(e) for e in self.experts)
            self.experts = dict.fromkeys(self.w13, shared)
        self.experts = {int(k): tuple(int(e) for e in v) for k, v in self.experts.items()}
        if set(self.experts) != set(self.w13) or set(self.w13) != set(self.w2):
            raise ValueError(
                f"experts, w13 and w2 name different layers: {sorted(self.experts)}, "
                f"{sorted(self.w13)}, {sorted(self.w2)}"
            )
        self._local: dict[int, torch.Tensor] = {}
        for layer, ids in self.experts.items():
            rows = (int(self.w13[layer].shape[0]), int(self.w2[layer].shape[0]))
            if rows != (len(ids), len(ids)) or len(set(ids)) != len(ids) or min(ids, default=0) < 0:
                raise ValueError(
                    f"layer {layer}: {len(ids)} distinct non-negative expert ids expected for "
                    f"w13/w2 rows {rows}, got {list(ids)[:8]}"
                )
            local = torch.full((max(ids, default=-1) + 1,), -1, dtype=torch.long)
            local[list(ids)] = torch.arange(len(ids))
            self._local[layer] = local
        # layers holding experts 0..E-1 in row order: global ids are already rows
        self._identity = {
            layer: ids == tuple(range(len(ids))) for layer, ids in self.experts.items()
        }

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.w13))

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.w13.values())).dtype

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.w13.values())).shape[2])

    def holdings(self) -> dict[int, list[int]]:
        """{layer: sorted global expert ids} of the layers holding at least one expert."""
        return {layer: sorted(ids) for layer, ids in sorted(self.experts.items()) if ids}

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.w13.values(), *self.w2.values()))

    def _rows(self, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of w13/w2 with -1 for padding, mask of ids >= 0 not held) for long ids."""
        local = self._local.get(layer)
        if local is None or local.numel() == 0:
            return torch.full_like(ids, -1), ids >= 0
        rows = local[ids.clamp(0, local.numel() - 1)]
        bad = (ids >= 0) & ((ids >= local.numel()) | (rows < 0))
        return rows.masked_fill(ids < 0, -1), bad

    def missing(self, layer: int, global_ids: torch.Tensor) -> list[int]:
        """Sorted distinct ids >= 0 in `global_ids` that are not held in `layer`."""
        ids = global_ids.long()
        _, bad = self._rows(layer, ids)
        return torch.unique(ids[bad]).tolist() if bool(bad.any()) else []

    def local_ids(self, layer: int, global_ids: torch.Tensor) -> torch.Tensor:
        """Map global expert ids of `layer` to rows of w13/w2; -1 stays -1 (padding)."""
        ids = global_ids.long()
        rows, bad = self._rows(layer, ids)
        if bool(bad.any()):
            missing = torch.unique(ids[bad]).tolist()
            raise UnknownExpertError(
                f"layer {layer}: expert {missing[0]} is not held here"
                + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        return rows

    def held_rows(self, layer: int, global_ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(rows of w13/w2 for `global_ids` of `layer`, -1 for padding; sorted distinct ids >= 0
        not held) in one pass; compute with `compute_rows` when nothing is missing."""
        ids = global_ids.long()
        rows, bad = self._rows(layer, ids)
        return rows, (torch.unique(ids[bad]).tolist() if bool(bad.any()) else [])

    def compute_rows(
        self, layer: int, hidden: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """`compute` for rows from `held_rows` (all held)."""
        if layer not in self.w13:  # nothing held in this layer: only padding got this far
            return torch.zeros_like(hidden)
        return grouped_swiglu(hidden, rows, weights, self.w13[layer], self.w2[layer])

    def compute(
        self, layer: int, hidden: torch.Tensor, global_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{ids[t, k]}(hidden[t]) -> [T, H] for GLOBAL expert ids
        of `layer` (ids < 0 are skipped); UnknownExpertError for an expert not held."""
        local = self.local_ids(layer, global_ids)
        if layer not in self.w13:  # nothing held in this layer: only padding got this far
            return torch.zeros_like(hidden)
        return grouped_swiglu(hidden, local, weights, self.w13[layer], self.w2[layer])

    def with_experts(self, other: ExpertWeights) -> ExpertWeights:
        """These experts plus `other`'s (new rows appended per layer; untouched layers share
        their tensors). An expert that is held already is a ValueError."""
        experts, w13, w2 = dict(self.experts), dict(self.w13), dict(self.w2)
        for layer, ids in other.experts.items():
            if not ids:
                continue
            if layer not in experts:
                experts[layer], w13[layer], w2[layer] = ids, other.w13[layer], other.w2[layer]
                continue
            dup = set(ids) & set(experts[layer])
            if dup:
                raise ValueError(f"layer {layer}: expert {min(dup)} is already held")
            experts[layer] = experts[layer] + ids
            w13[layer] = _cat_rows(w13[layer], other.w13[layer])
            w2[layer] = _cat_rows(w2[layer], other.w2[layer])
        return ExpertWeights(experts, w13, w2)

    def without_experts(self, removals: Mapping[int, Sequence[int]]) -> ExpertWeights:
        """These experts minus `removals` ({layer: ids}; ids not held are ignored). A layer left
        empty is dropped."""
        experts, w13, w2 = dict(self.experts), dict(self.w13), dict(self.w2)
        for layer, ids in removals.items():
            if layer not in experts:
                continue
            drop = {int(e) for e in ids}
            keep = [r for r, e in enumerate(experts[layer]) if e not in drop]
            if len(keep) == len(experts[layer]):
                continue
            if not keep:
                del experts[layer], w13[layer], w2[layer]
                continue
            experts[layer] = tuple(experts[layer][r] for r in keep)
            w13[layer], w2[layer] = _select_rows(w13[layer], keep), _select_rows(w2[layer], keep)
        return ExpertWeights(experts, w13, w2)


Weights = torch.Tensor | ExpertPack  # one projection of a layer's experts


def _cat_rows(a: Weights, b: Weights) -> Weights:
    """a's experts then b's. Two packs of one kind stay packed; otherwise (a "lossless" load
    may pack one set and not another) both become plain tensors in a's compute dtype."""
    if (
        isinstance(a, ExpertPack)
        and isinstance(b, ExpertPack)
        and (a.kind, a.group)
        == (
            b.kind,
            b.group,
        )
    ):
        scales = None if a.scales is None else torch.cat([a.scales, b.scales])
        return ExpertPack(a.kind, torch.cat([a.data, b.data]), scales, a.group)
    if isinstance(a, ExpertPack) or isinstance(b, ExpertPack):
        a = a.dequantize() if isinstance(a, ExpertPack) else a
        b = b.dequantize() if isinstance(b, ExpertPack) else b
    return torch.cat([a, b.to(a.dtype)])


def _select_rows(w: Weights, rows: Sequence[int]) -> Weights:
    if isinstance(w, ExpertPack):
        return w.select(rows)
    return w[torch.tensor(list(rows), dtype=torch.long)]


def grouped_swiglu(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor | ExpertPack,
    w2: torch.Tensor | ExpertPack,
) -> torch.Tensor:
    """Weighted SwiGLU experts: sum_k weights[t, k] * expert_{ids[t, k]}(hidden[t]).

    hidden [T, H], ids [T, K] (rows of w13/w2, -1 = none), weights [T, K], w13 [E, 2I, H],
    w2 [E, H, I] (tensors, or `ExpertPack`s in fp32 / bf16 / int8 / int4) -> [T, H] in
    hidden's dtype. On the CPU with fp32 activations this is the fused kernel (one pass per
    expert, parallel across experts and rows; workers/expert_kernel.py); otherwise, or where
    the kernel cannot be built, torch's grouped matmul over tokens sorted by expert.
    Either way a token's K expert outputs are summed in fp64 and rounded once.
    """
    if expert_kernel.supports(hidden, w13):
        return expert_kernel.moe_swiglu(hidden, ids, weights, w13, w2)
    if isinstance(w13, ExpertPack) or isinstance(w2, ExpertPack):
        return _packed_torch(hidden, ids, weights, w13, w2)
    return _torch_swiglu(hidden, ids, weights, w13, w2)


def _packed_torch(hidden, ids, weights, w13, w2) -> torch.Tensor:
    """Torch path for packed weights: dequantise only the experts the step uses."""
    used = torch.unique(ids[ids >= 0])
    remap = torch.full((len(w13),), -1, dtype=torch.long)
    remap[used] = torch.arange(used.numel())
    local = torch.where(ids >= 0, remap[ids.clamp(min=0)], -1)
    a, b = w13.dequantize(used), w2.dequantize(used)
    return _torch_swiglu(hidden.float(), local, weights.float(), a, b).to(hidden.dtype)


def _torch_swiglu(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """The torch path: tokens sorted by expert, one grouped matmul per projection."""
    T, K = ids.shape
    E, two_i, _ = w13.shape
    flat = ids.reshape(-1)  # [T*K]
    valid = flat >= 0
    order = torch.argsort(torch.where(valid, flat, E), stable=True)  # sorted (token, k) pairs
    order = order[: int(valid.sum())]  # [N]
    token_of = order // K  # [N]
    sorted_ids = flat[order]
    counts = torch.bincount(sorted_ids, minlength=E)  # [E]
    x = hidden[token_of].to(w13.dtype)  # [N, H]
    grouped = _use_grouped_mm(x, w13, w2, counts)
    gate_up = _grouped(x, w13, counts, grouped)  # [N, 2I]
    gate, up = gate_up.split(two_i // 2, dim=-1)
    y = _grouped(F.silu(gate) * up, w2, counts, grouped)  # [N, H]
    y = y * weights.reshape(-1)[order].to(y.dtype).unsqueeze(-1)
    # accumulate in fp64: the sum then rounds once, so it does not depend on how the pairs
    # were split across shards (the router combines shard partials the same way)
    out = torch.zeros(T, hidden.shape[1], dtype=torch.float64, device=hidden.device)
    out.index_add_(0, token_of, y.double())
    return out.to(hidden.dtype)


def _use_grouped_mm(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts) -> bool:
    """grouped_mm visits every group, empty or not (CPU: ~1 us each); a loop over the experts
    with work wins while fewer than a fifth of them have any (measured: 10 of 512 experts
    0.09 ms vs 0.50 ms; crossover near 100; see docs/performance.md)."""
    if not (_HAS_GROUPED_MM and x.shape[0] > 0 and _aligned(x, w13, w2)):
        return False
    return x.device.type != "cpu" or 5 * int((counts > 0).sum()) >= counts.numel()


def _grouped(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Row block g of x (counts[g] rows) times w[g]^T.  x [N, in], w [E, out, in] -> [N, out]."""
    if grouped:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)
    return _sorted_loop(x, w, counts)


_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """grouped_mm takes fp32/bf16/fp16 with 16-byte aligned rows (H, 2I and I here)."""
    if x.dtype not in _GROUPED_DTYPES:
        return False
    dims = (x.shape[1], w13.shape[1], w2.shape[2])
    return all(d * x.element_size() % 16 == 0 for d in dims)


def _sorted_loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):  # only experts with work do a matmul
        if n:
            torch.matmul(x[start : start + n], w[e].t(), out=out[start : start + n])
            start += n
    return out


def pack_experts(weights: ExpertWeights, kind: str | None) -> ExpertWeights:
    """The same experts stored as `kind` (workers/quant.py: float32, bfloat16, int8, int4);
    None keeps the tensors as loaded. Layers are converted one at a time (the loaded tensors
    of a layer are freed as soon as its pack exists)."""
    if kind is None:
        return weights
    w13, w2 = dict(weights.w13), dict(weights.w2)
    for layer in list(w13):
        w13[layer], w2[layer] = pack_layer(w13[layer], w2[layer], kind)
    return ExpertWeights(dict(weights.experts), w13, w2)


def lossless_pack(
    w13: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor | ExpertPack, torch.Tensor | ExpertPack]:
    """bf16 packs of fp32 weights whose values are all bf16 values (a bf16 checkpoint loaded
    in fp32): the fused kernel widens them in registers, so results are bit-identical with
    half the bytes to read. Unchanged when a value needs fp32 or the kernel is unavailable
    (the torch path would dequantise every step)."""
    if w13.dtype != torch.float32 or not expert_kernel.load():
        return w13, w2
    for w in (w13, w2):
        if not torch.equal(w.to(torch.bfloat16).float(), w):
            return w13, w2
    return quant.pack(w13, "bfloat16"), quant.pack(w2, "bfloat16")


def pack_layer(
    w13: torch.Tensor | ExpertPack, w2: torch.Tensor | ExpertPack, kind: str
) -> tuple[ExpertPack, ExpertPack]:
    """One layer's w13 [E, 2I, H] and w2 [E, H, I] stored as `kind` (same int4 group)."""
    if isinstance(w13, ExpertPack):
        w13, w2 = w13.dequantize(), w2.dequantize()
    _, two_i, hidden = w13.shape
    why = quant.packable(kind, hidden, two_i // 2)
    if why:
        raise ValueError(f"expert dtype {kind}: {why}")
    group = quant.int4_group(hidden, two_i // 2)
    return quant.pack(w13, kind, group), quant.pack(w2, kind, group)


class LocalExpertBackend:
    """All experts in this process (the single-process path and the reference for shards)."""

    def __init__(self, weights: ExpertWeights) -> None:
        self.weights = weights

    def submit(
        self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> DoneHandle:
        w = self.weights
        if w._identity.get(layer, False):  # ids from our own router are rows: no lookup
            return DoneHandle(grouped_swiglu(hidden, ids, weights, w.w13[layer], w.w2[layer]))
        return DoneHandle(w.compute(layer, hidden, ids, weights))


def naive_experts(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Reference: a Python loop over tokens and their experts (tests only)."""
    out = torch.zeros_like(hidden)
    inter = w13.shape[1] // 2
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            gate_up = w13[e] @ hidden[t]
            h = F.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += weights[t, k] * (w2[e] @ h)
    return out


def stack_experts(
    per_expert: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """[(gate [I, H], up [I, H], down [H, I])] -> (w13 [E, 2I, H], w2 [E, H, I])."""
    w13 = torch.stack([torch.cat([g, u], dim=0) for g, u, _ in per_expert])
    w2 = torch.stack([d for _, _, d in per_expert])
    return w13, w2
