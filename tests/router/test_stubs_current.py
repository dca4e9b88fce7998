"""The checked-in gRPC stubs are exactly what generate_stubs produces from proto/expert.proto."""

from __future__ import annotations

from pathlib import Path

from router.rpc import generate_stubs


def test_checked_in_stubs_are_current(tmp_path: Path) -> None:
    written = generate_stubs.generate(tmp_path)
    names = {p.name for p in written}
    assert {"expert_pb2.py", "expert_pb2.pyi", "expert_pb2_grpc.py"} <= names
    assert len(names) == 3 * len(generate_stubs.protos())
    for fresh in written:
        checked_in = generate_stubs.RPC_DIR / fresh.name
        assert checked_in.exists(), f"{checked_in} missing: run python -m router.rpc.generate_stubs"
        assert checked_in.read_text() == fresh.read_text(), (
            f"{checked_in.name} is stale: run python -m router.rpc.generate_stubs"
        )


def test_grpc_stub_imports_are_package_relative() -> None:
    text = (generate_stubs.RPC_DIR / "expert_pb2_grpc.py").read_text()
    assert "from . import expert_pb2 as expert__pb2" in text
    assert "\nimport expert_pb2" not in text
    from router.rpc import expert_pb2, expert_pb2_grpc

    assert expert_pb2.DESCRIPTOR.package == "expertmesh.v1"
    assert hasattr(expert_pb2_grpc, "ExpertShardStub")
