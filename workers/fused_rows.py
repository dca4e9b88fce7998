"""Weights of several projections that read the same input, stored as one tensor.

`fused_rows(owner, paths)` concatenates the weights at `paths` (each [out_i, in]) into one
[sum out_i, in] tensor the first time it is asked, and makes each parameter a view of its row
block, so one matmul computes every projection while parameter names, state dicts and the
per-projection modules stay as they were (memory is not doubled). Later calls return the
cached tensor while the parameters are still those views.
"""

from __future__ import annotations

import torch
from torch import nn


def fused_rows(owner: nn.Module, paths: tuple[str, ...]) -> torch.Tensor:
    params = [owner.get_parameter(p) for p in paths]
    key = tuple(map(id, params))
    cached = owner.__dict__.get("_fused_rows")
    if cached is not None and cached[0] == key and params[0].data_ptr() == cached[1].data_ptr():
        return cached[1]
    whole = torch.cat([p.detach() for p in params])  # [sum out_i, in]
    views, start = [], 0
    for path, p in zip(paths, params, strict=True):
        module_path, _, name = path.rpartition(".")
        module = owner.get_submodule(module_path) if module_path else owner
        view = nn.Parameter(whole[start : start + p.shape[0]], requires_grad=False)
        setattr(module, name, view)
        views.append(view)
        start += p.shape[0]
    owner.__dict__["_fused_rows"] = (tuple(map(id, views)), whole)
    return whole
