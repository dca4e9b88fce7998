"""The fused CPU expert kernel (workers/csrc/moe_swiglu.cpp): build once, cache on disk, load.

`load()` JIT-builds the C++ op with torch.utils.cpp_extension (a TORCH_LIBRARY op, no
pybind11) into `$EXPERTMESH_CACHE/kernels/<source+torch+cpu hash>/` the first time (~1 min on
2 cores) and loads the cached library afterwards (milliseconds). Where it cannot be built (no
compiler, no headers) or `EXPERTMESH_EXPERT_KERNEL=torch` is set, `load()` returns False once,
logs why, and callers use the torch path (`workers.experts`), which gives the same results.
`python -m workers.expert_kernel` builds it ahead of time (the Makefile's install does).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch

from workers.quant import KIND_CODES, ExpertPack

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "moe_swiglu.cpp"
ENV = "EXPERTMESH_EXPERT_KERNEL"  # "torch": never use the fused kernel
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def build_dir() -> Path:
    """Cache directory of this source, torch version and CPU (the build is -march=native)."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.prefix.encode())  # one build per environment (its headers and libraries)
    h.update(b"-fopenmp")
    h.update(_cpu_flags().encode())
    root = Path(os.environ.get("EXPERTMESH_CACHE") or "~/.cache/expertmesh").expanduser()
    return root / "kernels" / f"moe_swiglu-{h.hexdigest()[:16]}"


def load(verbose: bool = False) -> bool:
    """True when the fused op is registered (built or loaded from the cache)."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        if os.environ.get(ENV, "").lower() == "torch":
            _state.update(ok=False, why=f"{ENV}=torch")
            return False
        try:
            from torch.utils import cpp_extension

            path = build_dir()
            path.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(
                name="expertmesh_moe_swiglu",
                sources=[str(SOURCE)],
                # -fopenmp: at::parallel_for is inline and runs serially without it (the
                # OpenMP runtime is torch's own libgomp, already loaded)
                extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(path),
                is_python_module=False,
                verbose=verbose,
            )
            _state.update(ok=hasattr(torch.ops.expertmesh, "moe_swiglu"), why="")
        except Exception as exc:  # no compiler / headers: the torch path still works
            _state.update(ok=False, why=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            log.warning("fused expert kernel unavailable, using torch: %s", _state["why"])
        return bool(_state["ok"])


def status() -> dict[str, object]:
    ok = load()
    return {"fused_kernel": ok, "reason": _state.get("why", ""), "dir": str(build_dir())}


def supports(hidden: torch.Tensor, w13: ExpertPack | torch.Tensor) -> bool:
    """The fused op takes fp32 activations on the CPU with rows a multiple of 16 inputs."""
    if hidden.device.type != "cpu" or hidden.dtype != torch.float32:
        return False
    if isinstance(w13, torch.Tensor) and w13.dtype not in (torch.float32, torch.bfloat16):
        return False
    _, two_i, h = w13.shape
    return h % 16 == 0 and (two_i // 2) % 16 == 0 and load()


def moe_swiglu(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: ExpertPack | torch.Tensor,
    w2: ExpertPack | torch.Tensor,
) -> torch.Tensor:
    """The fused op (callers check `supports` first); same contract as grouped_swiglu."""
    if not load():
        raise RuntimeError(f"the fused expert kernel is unavailable: {_state.get('why')}")
    p13, p2 = _as_pack(w13), _as_pack(w2)
    if p13.kind != p2.kind:
        raise ValueError(f"w13 is {p13.kind} but w2 is {p2.kind}")
    group = p13.group or p2.group
    if p13.group != p2.group and p13.group and p2.group:
        raise ValueError(f"int4 groups differ: {p13.group} vs {p2.group}")
    return torch.ops.expertmesh.moe_swiglu(
        hidden.contiguous(), ids.long().contiguous(), weights.float().contiguous(),
        p13.data, _scales(p13), p2.data, _scales(p2), KIND_CODES[p13.kind], group,
    )  # fmt: skip


_EMPTY = torch.empty(0)


def _scales(p: ExpertPack) -> torch.Tensor:
    return _EMPTY if p.scales is None else p.scales


def _as_pack(w: ExpertPack | torch.Tensor) -> ExpertPack:
    if isinstance(w, ExpertPack):
        return w
    kind = "bfloat16" if w.dtype == torch.bfloat16 else "float32"
    return ExpertPack(kind, w.contiguous())


if __name__ == "__main__":  # python -m workers.expert_kernel: build (or load) and report
    import json

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(status()))
