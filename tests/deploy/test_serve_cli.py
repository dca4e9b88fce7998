"""`expertmesh serve` and `serve run deploy/serve.yaml` as real subprocesses (slow), and the
command line's config errors (fast, no Ray)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from deploy.cli import main
from tests.deploy.helpers import free_port, wait_until
from workers.make_checkpoint import make_checkpoint

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=1))


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("dense:\n  max_num_seqs: 0\n", "dense.max_num_seqs"),
        ("experts:\n  shardz: 2\n", "experts.shardz: unknown key"),
        ("server: [1, 2]\n", "expected a mapping, got [1, 2]"),
        ("dtype: float8\n", "dtype: expected one of"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path, capsys, text, fragment):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    assert main(["serve", "--config", str(path)]) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--config", "/nonexistent/cluster.yaml"], "config file not found"),
        (["--model", "/nonexistent/model"], "--model: no config.json"),
        (["--expert-shards", "-1"], "experts.shards"),
        (["--dense-replicas", "0"], "dense.autoscaling.min_replicas"),
        (["--http-port", "70000"], "server.http_port"),
    ],
)
def test_bad_arguments_exit_2(capsys, argv, fragment):
    assert main(["serve", *argv]) == 2
    assert fragment in capsys.readouterr().err


def _cluster_yaml(path: Path, model: str, http: int, grpc: int) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "model": model,
                "experts": {"shards": 0},
                "dense": {"num_cpus": 0.5, "max_num_seqs": 4, "max_queue": 8},
                "server": {"http_port": http, "grpc_port": grpc, "model_name": "tiny-cli"},
            }
        )
    )
    return path


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _run_until_healthy(
    argv: list[str], base: str, log: Path, stop: signal.Signals, ready_line: str = ""
) -> str:
    """Start argv, wait for /health (and `ready_line` in its output), run one completion, stop
    it with `stop`; return its output."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:

            def up() -> bool:
                return proc.poll() is not None or (_healthy(base) and ready_line in log.read_text())

            wait_until(up, START_TIMEOUT_S, "the server to come up", every=1.0)
            assert proc.poll() is None, f"server exited early:\n{log.read_text()[-3000:]}"
            body = {"model": "tiny-cli", "prompt": [5, 6, 7], "max_tokens": 4}
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
            proc.send_signal(stop)
            assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group
                proc.wait(timeout=30)
    return log.read_text()


@pytest.mark.slow
def test_expertmesh_serve_subprocess(tiny, tmp_path):
    http, grpc = free_port(), free_port()
    config = _cluster_yaml(tmp_path / "cluster.yaml", tiny, http, grpc)
    argv = [
        sys.executable,
        "-m",
        "deploy.cli",
        "serve",
        "--config",
        str(config),
        "--http-port",
        str(http),
    ]
    out = _run_until_healthy(
        argv, f"http://127.0.0.1:{http}", tmp_path / "log", signal.SIGTERM, ready_line="OpenAI API:"
    )
    assert f"http://127.0.0.1:{http}/v1" in out and f"127.0.0.1:{grpc}" in out
    assert "'tiny-cli'" in out


@pytest.mark.slow
def test_serve_run_deploy_yaml_subprocess(tiny, tmp_path):
    """`serve run` of deploy/serve.yaml, pointed at a tiny-model cluster config."""
    http, grpc = free_port(), free_port()
    serve_config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    serve_config["http_options"]["port"] = http
    app = serve_config["applications"][0]
    app["args"]["config"] = str(_cluster_yaml(tmp_path / "cluster.yaml", tiny, http, grpc))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(serve_config))
    serve_bin = str(Path(sys.executable).with_name("serve"))
    _run_until_healthy(
        [serve_bin, "run", str(path)], f"http://127.0.0.1:{http}", tmp_path / "log", signal.SIGINT
    )
