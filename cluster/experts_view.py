"""`expertmesh experts`: the expert pool of a running cluster, per layer and per shard.

    expertmesh experts                              # the server at http://127.0.0.1:8000
    expertmesh experts --url http://host:8000 --png experts.png
    expertmesh experts --ray-address auto           # ask the pool controller through Ray

Prints a per-layer summary (routed rows/s, imbalance, entropy, top-n share, collapse alarm,
hottest experts) and per-shard figures, and writes a PNG: a heatmap of routed rows/s per
(layer, expert) above per-shard load bars (rows/s, busy fraction beside).
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def add_cli(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("experts", help="expert pool load of a running cluster (+ PNG heatmap)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8000",
                       help="the server's HTTP address (GET /admin/experts)")  # fmt: skip
    where.add_argument(
        "--ray-address",
        default=None,
        help="ask the pool controller through this Ray cluster instead ('auto')",
    )
    p.add_argument(
        "--png", default="experts.png", help="heatmap + shard bars (default %(default)s)"
    )
    p.add_argument("--no-png", action="store_true", help="print only")
    p.add_argument("--json", action="store_true", help="print the raw report")
    p.add_argument("--top", type=int, default=5, help="hottest experts shown per layer")
    p.set_defaults(func=_main)
    return p


def fetch_report(url: str | None, ray_address: str | None, top: int = 5) -> dict[str, Any]:
    """The pool controller's load report, over HTTP or through Ray."""
    if ray_address:
        import ray

        from cluster.controllers import NAMESPACE, PLACEMENT_CONTROLLER

        if not ray.is_initialized():
            ray.init(address=ray_address, namespace=NAMESPACE, log_to_driver=False)
        try:
            controller = ray.get_actor(PLACEMENT_CONTROLLER, namespace=NAMESPACE)
        except ValueError:
            raise RuntimeError(f"no expert pool runs in the Ray cluster at {ray_address}") from None
        return ray.get(controller.load_report.remote(top), timeout=30)
    target = url.rstrip("/") + f"/admin/experts?top={top}"
    try:
        with urllib.request.urlopen(target, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            body = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise RuntimeError(f"{target}: HTTP {exc.code}: {body}") from None
    except urllib.error.URLError as exc:
        raise RuntimeError(f"{target}: cannot connect ({exc.reason}); is the server up?") from None


def summary(report: dict[str, Any]) -> str:
    """Per-layer and per-shard text tables of a load report."""
    m = report["metrics"]
    top_n = report["thresholds"]["collapse_top_n"]
    lines = [
        f"placement v{report['version']}: {report['status']}",
        f"window {report['window_s']:.0f} s; imbalance {m['imbalance']:.3f} (worst layer "
        f"{m['imbalance_max']:.3f}); {m['collapsed_layers']} collapsed layers; "
        f"{m['routers']} routers",
        "",
        f"{'layer':>5} {'rows/s':>9} {'imbal':>6} {'entropy':>7} {f'top{top_n}':>6} "
        f"{'alarm':>5}  hottest (expert:share)",
    ]
    for r in report["layers"]:
        hot = " ".join(f"{e}:{s:.2f}" for e, s in r["hottest"])
        lines.append(
            f"{r['layer']:>5} {r['rows_per_s']:>9.1f} {r['imbalance']:>6.3f} "
            f"{r['entropy_norm']:>7.3f} {r['top_n_share']:>6.2f} "
            f"{'YES' if r['collapse'] else '-':>5}  {hot}"
        )
    lines += ["", f"{'shard':>10} {'state':>8} {'busy':>5} {'rows/s':>9} {'copies':>6}  node"]
    for s in report["shards"]:
        lines.append(
            f"{s['shard_id']:>10} {s['state']:>8} {s['busy']:>5.2f} "
            f"{sum(s['rows_per_s']):>9.1f} {s['pairs_held']:>6}  {s['node_id'][:12]}"
        )
    if report.get("decision"):
        lines += ["", f"autoscaler: {report['decision']}"]
    for ev in report.get("events", [])[-5:]:
        lines.append(f"event {ev['kind']}: {ev['message']}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Heatmap (layers x experts, rows/s) above per-shard bars (rows/s and busy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    rates = np.asarray(report["rates"], dtype=float)
    shards = report["shards"]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(12, 7), gridspec_kw={"height_ratios": [max(2, rates.shape[0] / 4), 2]}
    )
    im = top.imshow(rates, aspect="auto", interpolation="nearest", cmap="viridis")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_xlabel("expert")
    top.set_ylabel("layer")
    top.set_title(f"routed rows/s per (layer, expert), placement v{report['version']}")
    fig.colorbar(im, ax=top, label="rows/s")
    names = [s["shard_id"] for s in shards]
    loads = [sum(s["rows_per_s"]) for s in shards]
    colors = ["tab:blue" if s["state"] == "up" else "tab:gray" for s in shards]
    bars = bottom.bar(names, loads, color=colors)
    for bar, s in zip(bars, shards, strict=True):
        bottom.annotate(f"busy {s['busy']:.2f}\n{s['state']}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
    bottom.set_ylim(0, 1.25 * max(loads + [1e-9]))
    m = report["metrics"]
    bottom.set_ylabel("rows/s (all layers)")
    bottom.set_title(f"per-shard load: imbalance {m['imbalance']:.3f} (worst layer "
                     f"{m['imbalance_max']:.3f})")  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _main(args: argparse.Namespace) -> int:
    from cluster.cli import UsageError

    if args.top < 1:
        raise UsageError("--top: must be >= 1")
    report = fetch_report(None if args.ray_address else args.url, args.ray_address, args.top)
    print(json.dumps(report, indent=2) if args.json else summary(report))
    if not args.no_png:
        print(f"[written to {plot(report, args.png).resolve()}]")
    return 0
