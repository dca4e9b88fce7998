"""Which transport reaches a shard: TCP, or a Unix domain socket on the same host.

A placement table holds one address per shard, and every router in the cluster reads the same
table, wherever it runs. The address is either `host:port` (TCP, reachable from any node) or
`unix:/path` (an explicit local socket, for single-host deployments and tests). A shard
serving TCP at `host:port` also listens on the socket `socket_path("host:port")`; a router
whose host has that socket (the same machine: the path names the shard's own IP and port)
connects through it instead, which skips the TCP/IP stack; routers elsewhere use TCP. Same
gRPC protocol and messages on both; the cluster token applies to both.

Why this is at least as safe as TCP: the socket directory must be a real directory owned by
this user with no group/other access (mode 0700); a shard binds no socket and a router dials
none otherwise (`private_dir`), and a router dials only sockets owned by its own user. So
only processes of the same user can reach a shard through the socket (TCP accepts anyone who
can reach the port), and another user cannot plant a socket to collect the token a router
presents. Nothing crosses a network on a local socket, so there is nothing to sniff. A shard
serving TLS opens no local socket (a TLS deployment stays TLS everywhere); an explicit `unix:`
address with a TLS router is dialled with the router's TLS credentials.

`EXPERTMESH_SOCKET_DIR` sets the directory (default `/tmp/expertmesh-<uid>`).
"""

from __future__ import annotations

import os
import re
import stat

SOCKET_DIR_ENV = "EXPERTMESH_SOCKET_DIR"
UNIX = "unix:"
_UNSAFE = re.compile(r"[^0-9A-Za-z.\-]")
_MAX_PATH = 100  # sun_path holds 108 bytes


def socket_dir() -> str:
    return os.environ.get(SOCKET_DIR_ENV) or f"/tmp/expertmesh-{os.getuid()}"


def private_dir(path: str) -> bool:
    """`path` is a directory (not a link) owned by this user, closed to group and others."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and (st.st_mode & 0o077) == 0


def socket_path(address: str) -> str | None:
    """The local socket a shard serving TCP at `address` ("host:port", "[v6]:port") listens
    on beside it; None for unix: addresses and paths too long for a socket."""
    if not address or address.startswith(UNIX):
        return None
    name = _UNSAFE.sub("_", address.replace("[", "").replace("]", "").rsplit(":", 1)[0])
    port = address.rsplit(":", 1)[-1]
    path = os.path.join(socket_dir(), f"shard-{name}-{port}.sock")
    return path if len(path.encode()) <= _MAX_PATH else None


def prepare_socket(address: str) -> str | None:
    """Server side: the private directory made and a stale socket at the path removed; the
    `unix:` target to bind, or None when no local socket can be used."""
    path = socket_path(address)
    if path is None:
        return None
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if not private_dir(os.path.dirname(path)):
            return None
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return None
    return UNIX + path


def remove_socket(target: str | None) -> None:
    if target and target.startswith(UNIX):
        try:
            os.unlink(target[len(UNIX) :])
        except OSError:
            pass


def local_target(address: str) -> str | None:
    """Router side: the `unix:` target of the shard at TCP `address` when its socket exists
    on this host, else None (use TCP)."""
    path = socket_path(address)
    if path is None or not private_dir(os.path.dirname(path)):
        return None
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid():
            return UNIX + path
    except OSError:
        pass
    return None
