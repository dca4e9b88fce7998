"""C++ op libraries under workers/csrc/: JIT-built once, cached on disk, loaded in milliseconds.

`build(name, source, stem)` compiles `source` with torch.utils.cpp_extension (a TORCH_LIBRARY
op library, no pybind11) into `$EXPERTMESH_CACHE/kernels/<stem>-<hash>/`, where the hash covers
the source, the torch version, the environment and the CPU flags (the build is
-march=native), and loads it; a later process finds the library there and only loads it.
`NativeLibrary` adds the load-once state, an environment switch to turn it off and the reason
it is unavailable (callers then take their torch path, which gives the same results).
`python -m workers.native` builds every library ahead of time (the Makefile's install does).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CSRC = Path(__file__).with_name("csrc")
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def build_dir(stem: str, source: Path) -> Path:
    """Cache directory of this source, torch version, environment and CPU."""
    h = hashlib.sha256(source.read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.prefix.encode())  # one build per environment (its headers and libraries)
    h.update(b"-fopenmp")
    h.update(cpu_flags().encode())
    root = Path(os.environ.get("EXPERTMESH_CACHE") or "~/.cache/expertmesh").expanduser()
    return root / "kernels" / f"{stem}-{h.hexdigest()[:16]}"


def build(name: str, source: Path, stem: str, verbose: bool = False) -> None:
    """Compile (or find in the cache) and load the op library; raises when it cannot."""
    from torch.utils import cpp_extension

    path = build_dir(stem, source)
    path.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(source)],
        # -fopenmp: at::parallel_for is inline and runs serially without it (the OpenMP
        # runtime is torch's own libgomp, already loaded)
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(path),
        is_python_module=False,
        verbose=verbose,
    )


class NativeLibrary:
    """One op library: `load()` builds or loads it once per process (thread-safe) and says
    whether its ops are registered; `env` set to "torch" turns it off."""

    def __init__(self, name: str, source: Path, stem: str, env: str, namespace: str, op: str):
        self.name, self.source, self.stem, self.env = name, source, stem, env
        self.namespace, self.op = namespace, op  # an op the library registers (the check)
        self._lock = threading.Lock()
        self.state: dict[str, object] = {}

    def load(self, verbose: bool = False) -> bool:
        if "ok" in self.state:
            return bool(self.state["ok"])
        with self._lock:
            if "ok" in self.state:
                return bool(self.state["ok"])
            if os.environ.get(self.env, "").lower() == "torch":
                self.state.update(ok=False, why=f"{self.env}=torch")
                return False
            try:
                build(self.name, self.source, self.stem, verbose)
                ok = hasattr(getattr(torch.ops, self.namespace), self.op)
                self.state.update(ok=ok, why="" if ok else f"{self.op} was not registered")
            except Exception as exc:  # no compiler / headers: the torch path still works
                why = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                self.state.update(ok=False, why=why)
                log.warning("%s unavailable, using torch: %s", self.stem, why)
            return bool(self.state["ok"])

    def status(self) -> dict[str, object]:
        ok = self.load()
        return {"ok": ok, "reason": self.state.get("why", ""),
                "dir": str(build_dir(self.stem, self.source))}  # fmt: skip


if __name__ == "__main__":  # python -m workers.native: build (or load) every library, report
    import json

    from workers import dense_kernel, expert_kernel

    logging.basicConfig(level=logging.INFO)
    print(json.dumps({"expert_kernel": expert_kernel.status(),
                      "dense_kernel": dense_kernel.status()}))  # fmt: skip
