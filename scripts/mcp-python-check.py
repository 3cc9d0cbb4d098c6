#!/usr/bin/env python3
"""make mcp-check: the official Python MCP SDK (PyPI `mcp`) against a running
`make run-local`, over Streamable HTTP with the Authorization header.

Initializes, lists the tools, runs `run_code` (6 * 7 -> 42) and a two-step
session (state kept between the steps), then closes the session. Exits
non-zero with the reason on the first failure. A from-outside check: not
part of `make test`.

Environment: MCP_URL (default http://127.0.0.1:8090/mcp), TOKEN (a caller's
JWT; scripts/mcp-check.sh mints one from .local/).
"""

import asyncio
import json
import os
import sys

from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

EXPECTED_TOOLS = {"run_code", "create_session", "run_step", "close_session"}


def fail(msg: str) -> None:
    print(f"[mcp-check] FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def rendered(result) -> str:
    """The result as one string: structured content and every text block."""
    parts = []
    if result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    for block in result.content:
        text = getattr(block, "text", None)
        if text is not None:
            parts.append(text)
    return "\n".join(parts)


def session_id_arg(tools) -> str:
    """The name `run_step` gives its session id argument (from its schema)."""
    props = tools["run_step"].input_schema.get("properties", {})
    for name in ("sessionId", "session_id", "id"):
        if name in props:
            return name
    fail(f"run_step has no session id argument: {sorted(props)}")
    return ""


async def call(session: ClientSession, name: str, args: dict):
    result = await session.call_tool(name, args, read_timeout_seconds=120)
    if result.is_error:
        fail(f"{name}({args}) returned a tool error: {rendered(result)}")
    return result


async def main() -> None:
    url = os.environ.get("MCP_URL", "http://127.0.0.1:8090/mcp")
    token = os.environ.get("TOKEN")
    if not token:
        fail("TOKEN is not set (a caller's JWT: `control-plane token --tenant ...`)")
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with http, streamable_http_client(url, http_client=http) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            print(
                f"[mcp-check] initialized: {init.server_info.name} {init.server_info.version}, "
                f"protocol {init.protocol_version}"
            )

            listed = await session.list_tools()
            tools = {t.name: t for t in listed.tools}
            missing = EXPECTED_TOOLS - tools.keys()
            if missing:
                fail(f"tools missing: {sorted(missing)} (listed: {sorted(tools)})")
            print(f"[mcp-check] {len(tools)} tools: {', '.join(sorted(tools))}")

            result = await call(session, "run_code", {"code": "6 * 7"})
            if "42" not in rendered(result):
                fail(f"run_code 6 * 7 did not answer 42: {rendered(result)}")
            print("[mcp-check] run_code 6 * 7 -> 42")

            created = await call(session, "create_session", {})
            sc = created.structured_content or {}
            sid = sc.get("sessionId") or sc.get("session_id") or sc.get("id")
            if not sid:
                fail(f"create_session returned no session id: {rendered(created)}")
            arg = session_id_arg(tools)
            try:
                await call(session, "run_step", {arg: sid, "code": "x = 6 * 7"})
                step = await call(session, "run_step", {arg: sid, "code": "print(x + 1)\nx"})
                out = rendered(step)
                if "43" not in out or "42" not in out:
                    fail(f"the second step did not see the first one's x: {out}")
                print(f"[mcp-check] session {sid}: two steps, state kept (x = 42)")
            finally:
                await session.call_tool("close_session", {arg: sid})
            print("[mcp-check] OK")


def leaves(e: BaseException):
    """The innermost errors of an exception group (anyio wraps them)."""
    if isinstance(e, BaseExceptionGroup):
        for inner in e.exceptions:
            yield from leaves(inner)
    else:
        yield e


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - a check reports, never hides
        reasons = "; ".join(f"{type(x).__name__}: {x}" for x in leaves(e))
        fail(f"{reasons} (is `make run-local` up, and TOKEN valid? MCP_URL={os.environ.get('MCP_URL', '')})")
