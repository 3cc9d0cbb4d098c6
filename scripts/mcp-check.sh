#!/usr/bin/env bash
# make mcp-check: the official Python MCP SDK (PyPI `mcp`) against a running
# `make run-local` over Streamable HTTP. The SDK is installed once into a venv
# under target/ (idempotent: a marker names the installed version).
set -euo pipefail
cd "$(dirname "$0")/.."
MCP_VERSION=${MCP_PY_VERSION:-2.3.0}
VENV=${MCP_VENV:-${CARGO_TARGET_DIR:-target}/mcp-venv}
if [ "$(cat "$VENV/.mcp-version" 2>/dev/null)" != "$MCP_VERSION" ]; then
  echo "[mcp-check] installing mcp==$MCP_VERSION from PyPI into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "mcp==$MCP_VERSION"
  echo "$MCP_VERSION" >"$VENV/.mcp-version"
fi
BIN=${BIN:-target/debug}
MCP_URL=${MCP_URL:-http://127.0.0.1:8090/mcp}
if [ -z "${TOKEN:-}" ]; then
  [ -s .local/dev-user-jwt-secret ] || { echo "[mcp-check] no .local/dev-user-jwt-secret: run \`make run-local\` once (or set TOKEN)" >&2; exit 1; }
  TOKEN=$(AUTH_JWT_SECRET=$(cat .local/dev-user-jwt-secret) "$BIN/control-plane" token --tenant mcp-check --roles agent)
fi
export MCP_URL TOKEN
exec "$VENV/bin/python" scripts/mcp-python-check.py
