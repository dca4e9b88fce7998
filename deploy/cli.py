"""The `expertmesh` command: cluster/'s commands plus the faces this package adds (`serve`,
the Serve app for `bench e2e --mode serve`, the tool-call grammar for `bench structured`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _build_app(*args: Any, **kwargs: Any) -> Any:
    from deploy.app import build_app

    return build_app(*args, **kwargs)


def _tool_grammar(tools: list[dict[str, Any]]) -> str:
    """The Qwen3-Coder tool-call grammar (`bench structured`; tokens as the vocab spells)."""
    from deploy.tools import parse_tools, tool_call_grammar

    return tool_call_grammar(parse_tools(tools), added_tokens=("<tool_call>", "</tool_call>"))


def main(argv: Sequence[str] | None = None) -> int:
    from cluster import cli
    from deploy.serve_cli import add_cli as add_serve

    defaults = {"serve_app_builder": _build_app, "tool_grammar_builder": _tool_grammar}
    return cli.main(argv, plugins=(add_serve,), defaults=defaults)


if __name__ == "__main__":
    raise SystemExit(main())
