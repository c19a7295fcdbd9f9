"""An MCP session on a gateway URL with the official Python SDK (PyPI `mcp`), for
tests/e2e/gateway_url.rs: initialize, list the tools, call two of them, and print what
it saw as one JSON object on stdout.

usage: gateway_client.py URL TOKEN TOOL1 TOOL2
"""

import json
import sys

import anyio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


async def main(url: str, token: str, tools: list[str]) -> None:
    http = create_mcp_http_client(headers={"authorization": f"Bearer {token}"})
    async with http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                listed = await session.list_tools()
                calls = {}
                for name in tools:
                    result = await session.call_tool(name, {"text": "from python"})
                    calls[name] = {
                        "error": bool(result.is_error),
                        "text": [c.text for c in result.content if getattr(c, "type", "") == "text"],
                    }
    print(
        json.dumps(
            {
                "server": init.server_info.name,
                "tools": sorted(t.name for t in listed.tools),
                "calls": calls,
            }
        )
    )


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3:])
