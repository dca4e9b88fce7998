"""The package layering of DEVELOPERS.md: deploy -> cluster -> workers / router; nothing imports
upward, and the model's math modules import no distribution library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> packages it must never import
FORBIDDEN = {
    "workers": {"cluster", "deploy"},
    "router": {"cluster", "deploy"},
    "cluster": {"deploy"},
}
MATH_MODULES = ("attention", "cache", "config", "delta_rule", "deltanet", "experts", "model",
                "moe", "norms", "rope", "runner", "sampler")  # fmt: skip
DISTRIBUTION = {"ray", "grpc", "torch.distributed"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            if name.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_model_math_has_no_distribution_imports() -> None:
    bad = []
    for mod in MATH_MODULES:
        path = ROOT / "workers" / f"{mod}.py"
        for name in _imports(path):
            if any(name == d or name.startswith(d + ".") for d in DISTRIBUTION):
                bad.append(f"workers/{mod}.py imports {name}")
    assert not bad, "\n".join(bad)


def test_no_importable_proto_package() -> None:
    assert not (ROOT / "proto" / "__init__.py").exists()
    assert not list((ROOT / "proto").glob("*.py"))
