"""Regenerate the gRPC/protobuf stubs in router/rpc/ from proto/*.proto.

    python -m router.rpc.generate_stubs            # rewrite the checked-in stubs
    python -m router.rpc.generate_stubs OUT_DIR    # write them elsewhere (tests compare)

`grpc_tools.protoc` writes `import expert_pb2 as expert__pb2` into the generated files, which
only works with the output directory on sys.path; we rewrite such imports to package-relative
ones so the stubs live inside the `router.rpc` package. Every proto/*.proto is compiled.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

RPC_DIR = Path(__file__).resolve().parent
PROTO_DIR = RPC_DIR.parents[1] / "proto"
_ABS_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


class StubGenerationError(RuntimeError):
    """protoc failed; the message carries its exit code."""


def protos(proto_dir: Path = PROTO_DIR) -> tuple[str, ...]:
    """Every .proto file directly in proto_dir, sorted (add a file there to get its stubs)."""
    return tuple(sorted(p.name for p in Path(proto_dir).glob("*.proto")))


def generate(out_dir: Path = RPC_DIR, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc on every proto into out_dir and fix the imports; returns the files written."""
    from grpc_tools import protoc

    names = protos(proto_dir)
    if not names:
        raise StubGenerationError(f"no .proto files in {proto_dir}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *names,
    ]
    code = protoc.main(args)
    if code != 0:
        raise StubGenerationError(f"protoc exited with {code} for {names} in {proto_dir}")
    written = []
    for proto in names:
        stem = Path(proto).stem
        for name in (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"):
            path = out_dir / name  # cross-file imports (also between protos) -> relative
            path.write_text(_ABS_IMPORT.sub(r"from . import \1 as \2", path.read_text()))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else RPC_DIR
    for path in generate(out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
