"""`expertmesh serve` and `serve run deploy/serve.yaml` as real subprocesses (slow), and the
command line's config errors (fast, no Ray)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.bench.startup import marked_processes
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


def test_taken_port_fails_fast_naming_it(tiny, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _cluster_yaml(tmp_path / "c.yaml", tiny, free_port(), port)
        assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"server.grpc_port: 127.0.0.1:{port} is not available" in err


def test_a_cache_budget_too_small_for_one_sequence_exits_2(tiny, tmp_path, capsys):
    path = tmp_path / "cluster.yaml"
    path.write_text("dense:\n  kv_cache_gb: 0.0001\n  max_model_len: 4096\n")
    assert main(["serve", "--config", str(path), "--model", tiny]) == 2
    err = capsys.readouterr().err
    assert "dense.kv_cache: a budget of" in err and "kv_cache_gb=0.0001" in err


def _cluster_yaml(path: Path, model: str, http: int, grpc: int, **extra) -> Path:
    config = {
        "model": model,
        "experts": {"shards": 0},
        "dense": {"num_cpus": 0.5, "max_num_seqs": 4, "max_queue": 8},
        "server": {"http_port": http, "grpc_port": grpc, "model_name": "tiny-cli"},
    }
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value}
    path.write_text(yaml.safe_dump(config))
    return path


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


class Server:
    """A `expertmesh ...` / `serve run` subprocess in its own session; its environment carries
    a unique mark so that every process it leaves behind can be found."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.mark = f"EXPERTMESH_TEST_MARK={uuid.uuid4().hex}"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["EXPERTMESH_TEST_MARK"] = self.mark.split("=", 1)[1]
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, base: str, line: str = "") -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                return True
            return _status(f"{base}/health/ready") == 200 and line in self.output()

        wait_until(up, START_TIMEOUT_S, "the server to come up", every=1.0)
        assert self.proc.poll() is None, f"server exited early:\n{self.output()[-3000:]}"

    def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own child's process group
            self.proc.wait(timeout=30)
        for pid in marked_processes(self.mark):  # what it started, if it left any
            os.kill(pid, signal.SIGKILL)
        self._out.close()


def _stream_request(base: str, tokens: int) -> tuple[httpx.Client, Any, Any]:
    http = httpx.Client(base_url=base, timeout=120)
    body = {"model": "tiny-cli", "prompt": [5, 6, 7], "max_tokens": tokens, "ignore_eos": True,
            "stream": True, "return_token_ids": True}  # fmt: skip
    ctx = http.stream("POST", "/v1/completions", json=body)
    response = ctx.__enter__()
    assert response.status_code == 200
    return http, ctx, response.iter_lines()


@pytest.mark.slow
def test_expertmesh_serve_progress_banner_drain_and_clean_stop(tiny, tmp_path):
    """Start-up steps and the banner are printed; SIGTERM drains: readiness 503 / NOT_SERVING
    with the reason, new requests refused, the in-flight stream finishes; then one line, exit
    0, and no process left behind."""
    http, grpc_port = free_port(), free_port()
    config = _cluster_yaml(
        tmp_path / "cluster.yaml", tiny, http, grpc_port,
        experts={"shards": 1, "num_cpus": 0.25}, server={"drain_grace_s": 120.0},
    )  # fmt: skip
    base = f"http://127.0.0.1:{http}"
    argv = [sys.executable, "-m", "deploy.cli", "serve", "--config", str(config)]
    server = Server(argv, tmp_path / "log")
    try:
        server.wait_ready(base, line="ready in")
        out = server.output()
        for line in ("[1/4] starting Ray", "[2/4] starting 1 expert shards", "shard-0 loaded",
                     "[3/4] starting Ray Serve", "[4/4] deploying", f"{base}/v1", f"{base}/docs",
                     f"127.0.0.1:{grpc_port}", "tiny-cli", "cache:      hybrid cache",
                     "stop:       Ctrl-C"):  # fmt: skip
            assert line in out, f"{line!r} missing from:\n{out}"
        assert "RANDOM weights" not in out  # not the demo model
        client, ctx, lines = _stream_request(base, 2000)
        first = [next(lines) for _ in range(4)]
        assert all(not x or x.startswith("data: {") for x in first)
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _status(f"{base}/health/ready") == 503, 60, "readiness to go 503")
        r = httpx.get(f"{base}/health/ready", timeout=10)
        assert r.json() == {
            "status": "not_ready",
            "reason": "draining: the server is shutting down",
        }
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply, call = stub.Check.with_call(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert "draining" in dict(call.trailing_metadata())["reason"]
        refused = httpx.post(
            f"{base}/v1/completions", json={"model": "tiny-cli", "prompt": [1], "max_tokens": 2},
            timeout=30,
        )  # fmt: skip
        assert refused.status_code == 503 and "shutting down" in refused.text
        rest = [line for line in lines if line.startswith("data: {")]
        ctx.__exit__(None, None, None)
        client.close()
        chunks = [json.loads(x[6:]) for x in first + rest if x.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 2000
        assert server.proc.wait(timeout=STOP_TIMEOUT_S) == 0, server.output()[-3000:]
        tail = server.output().split("ready in", 1)[1]
        assert "stopped in" in tail and "1 in-flight request(s) finished, 0 cut off" in tail
        for noise in ("Traceback", "graceful_shutdown", "Connecting to existing Serve app",
                      "ERROR", "WARNING"):  # fmt: skip
            assert noise not in server.output(), server.output()
        wait_until(lambda: not marked_processes(server.mark), 60, "its processes to exit")
    finally:
        server.close()


@pytest.mark.slow
def test_serve_run_deploy_yaml_subprocess(tiny, tmp_path):
    """`serve run` of deploy/serve.yaml, pointed at a tiny-model cluster config."""
    http, grpc_port = free_port(), free_port()
    serve_config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    serve_config["http_options"]["port"] = http
    app = serve_config["applications"][0]
    app["args"]["config"] = str(_cluster_yaml(tmp_path / "cluster.yaml", tiny, http, grpc_port))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(serve_config))
    serve_bin = str(Path(sys.executable).with_name("serve"))
    base = f"http://127.0.0.1:{http}"
    server = Server([serve_bin, "run", str(path)], tmp_path / "log")
    try:
        server.wait_ready(base)
        body = {"model": "tiny-cli", "prompt": [5, 6, 7], "max_tokens": 4}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert server.stop(signal.SIGINT) == 0, server.output()[-3000:]
        wait_until(lambda: not marked_processes(server.mark), 60, "its processes to exit")
    finally:
        server.close()
