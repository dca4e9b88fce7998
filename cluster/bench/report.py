"""Benchmark output: JSON, markdown tables and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers with `digits` significant digits (thousands kept whole); others as str."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return "n/a"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "| " + " | ".join(headers) + " |"
    sep = "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def machine_line(machine: Mapping[str, Any]) -> str:
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['cpu_capability']}), "
        f"torch {machine['torch']} with {machine['torch_threads']} threads "
        f"(OMP_WAIT_POLICY {machine.get('omp_wait_policy', 'unset')}), {machine['dtype']}."
    )


def write_markdown(
    path: str | Path, title: str, sections: Sequence[tuple[str, str]], intro: str = ""
) -> Path:
    """`# title`, an intro paragraph, then `## heading` + body for each section."""
    parts = [f"# {title}", ""]
    if intro:
        parts += [intro, ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body, ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def plot_lines(
    path: str | Path,
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    loglog: bool = True,
) -> Path | None:
    """One line per series against x; returns None (no plot) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", markersize=3, label=name)
    if loglog:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
