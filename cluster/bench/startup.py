"""`expertmesh bench startup`: time from `make serve` to ready, as a newcomer meets it.

    git clone <repo> /tmp/clean && make -C /tmp/clean install     # not timed
    expertmesh bench startup --repo /tmp/clean --runs 3

Each run starts `make serve` in REPO (its own process group, fresh ports), polls
`/health/ready` until 200 and reports the seconds from launch; then sends SIGINT to the group
(what Ctrl-C in a terminal does) and reports the seconds until `make` exits. "cold" runs
generate the demo checkpoint first (an empty EXPERTMESH_CACHE), "warm" runs find it. The
install (`make install`) is not timed. Also checks that nothing the server started is left.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from cluster.bench import free_port, machine_info
from cluster.bench.report import markdown_table, write_json, write_markdown

READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 120.0


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def marked_processes(mark: str) -> list[int]:
    """Live processes whose environment carries `mark` (what a run started)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if mark.encode() in (proc / "environ").read_bytes():
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def one_run(repo: Path, cache: Path, log: Path) -> dict[str, Any]:
    http, grpc = free_port(), free_port()
    mark = uuid.uuid4().hex
    env = dict(os.environ, EXPERTMESH_CACHE=str(cache), EXPERTMESH_STARTUP_MARK=mark)
    env.pop("RAY_ADDRESS", None)
    argv = ["make", "serve", f"ARGS=--http-port {http} --grpc-port {grpc}"]
    url = f"http://127.0.0.1:{http}/health/ready"
    with log.open("w") as out:
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            while not _ready(url):
                if proc.poll() is not None or time.monotonic() - start > READY_TIMEOUT_S:
                    raise RuntimeError(f"`make serve` did not get ready; see {log}")
                time.sleep(0.2)
            ready = time.monotonic() - start
            stop = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
            proc.wait(timeout=STOP_TIMEOUT_S)
            stopped = time.monotonic() - stop
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    deadline = time.monotonic() + 30
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = marked_processes(mark)
    for pid in left:  # processes this run started; report them, do not leave them
        os.kill(pid, signal.SIGKILL)
    return {"ready_s": ready, "stop_s": stopped, "left_behind": len(left), "log": str(log)}


def run(repo: Path, runs: int, out_dir: Path) -> dict[str, Any]:
    repo = repo.resolve()
    if not (repo / ".venv" / ".base").exists():
        raise ValueError(f"--repo: {repo} is not installed (run `make -C {repo} install` first)")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        for i in range(runs):
            for kind in ("cold", "warm"):  # interleaved: a busy spell hits both alike
                cache = Path(tmp, f"cache-{i}")  # cold: empty; warm: the cold run's demo
                results[kind].append(one_run(repo, cache, out_dir / f"startup-{kind}-{i}.log"))
    summary = {
        kind: {
            "median_ready_s": statistics.median(r["ready_s"] for r in rs),
            "median_stop_s": statistics.median(r["stop_s"] for r in rs),
            "left_behind": sum(r["left_behind"] for r in rs),
        }
        for kind, rs in results.items()
    }
    out = {"repo": str(repo), "runs": results, "summary": summary, "machine": machine_info()}
    write_json(out_dir / "startup.json", out)
    rows = [
        [kind, ", ".join(f"{r['ready_s']:.1f}" for r in results[kind]),
         summary[kind]["median_ready_s"], ", ".join(f"{r['stop_s']:.1f}" for r in results[kind]),
         summary[kind]["median_stop_s"], summary[kind]["left_behind"]]
        for kind in ("cold", "warm")
    ]  # fmt: skip
    table = markdown_table(
        ["demo checkpoint", "ready after (s)", "median", "Ctrl-C to exit (s)", "median",
         "processes left"], rows,
    )  # fmt: skip
    m = out["machine"]
    intro = (
        f"`make serve` in {repo} (installed; install not timed), {runs} runs each; "
        f"machine: {m['cpu']}, {m['cores']} cores, load average {m['loadavg_1m']}."
    )
    write_markdown(out_dir / "startup.md", "Time to ready", [("make serve", table)], intro=intro)
    return out
