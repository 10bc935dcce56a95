"""`python -m chat_service.mcp [--url URL]`: the MCP server over stdio (what desktop clients start), calling a running
chat service's REST API at URL (default http://127.0.0.1:8000, where `python -m chat_service` listens)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio
import httpx

from .tools import build_server

DEFAULT_URL = "http://127.0.0.1:8000"


async def serve(url: str, timeout: float) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        await build_server(client).run_stdio_async()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chat_service.mcp", description="MCP server (stdio).")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"chat service base URL (default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one chat may take (default 300)")
    args = parser.parse_args(argv)
    # stdout is the protocol channel: nothing else may be printed there.
    anyio.run(serve, args.url.rstrip("/"), args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
