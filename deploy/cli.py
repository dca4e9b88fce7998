"""The `expertmesh` command: cluster/'s commands plus the faces this package adds (`serve`,
and the Serve app for `bench e2e --mode serve`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _build_app(*args: Any, **kwargs: Any) -> Any:
    from deploy.app import build_app

    return build_app(*args, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    from cluster import cli
    from deploy.serve_cli import add_cli as add_serve

    return cli.main(argv, plugins=(add_serve,), defaults={"serve_app_builder": _build_app})


if __name__ == "__main__":
    raise SystemExit(main())
