"""Generated gRPC stubs for proto/expert.proto (package expertmesh.v1).

Import the modules directly (`from router.rpc import expert_pb2, expert_pb2_grpc`). They are
generated: do not edit them by hand, run `python -m router.rpc.generate_stubs`. This package
imports nothing eagerly so the generator still runs when the stubs are stale or missing.
"""
