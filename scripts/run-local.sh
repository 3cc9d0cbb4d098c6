#!/usr/bin/env bash
# make run-local: the session agent (:9000), data plane (:8081) and control
# plane (:8080), each on 127.0.0.1 only. Ctrl-C stops all three; the agent
# destroys every sandbox it started before it exits.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
export ENV=${ENV:-dev}
export RUST_LOG=${RUST_LOG:-info}

# Loopback only: the agent and the data plane are internal (the agent's port
# runs code for whoever holds its credential) and a development control
# plane is for this machine. The binaries' own defaults (`:9000`, `:8081`,
# `:8080`) are for deployments, where a network policy confines them. Set
# an *_ADDR to override.
export SESSION_AGENT_ADDR=${SESSION_AGENT_ADDR:-127.0.0.1:9000}
export DATA_PLANE_ADDR=${DATA_PLANE_ADDR:-127.0.0.1:8081}
export CONTROL_PLANE_ADDR=${CONTROL_PLANE_ADDR:-127.0.0.1:8080}
# The MCP server (Streamable HTTP at /mcp, and the seed's /tools/* routes):
# the control plane's second listener. MCP_ADDR='' disables it.
export MCP_ADDR=${MCP_ADDR-127.0.0.1:8090}
export SESSION_AGENT_ENDPOINT=${SESSION_AGENT_ENDPOINT:-http://127.0.0.1:${SESSION_AGENT_ADDR##*:}}
export DATA_PLANE_URL=${DATA_PLANE_URL:-http://127.0.0.1:${DATA_PLANE_ADDR##*:}}

# .local holds keys, the database (every tenant's code, outputs and audit
# trail) and the encrypted artifacts: owner only. Installed packages are not
# secret and must stay reachable by the sandbox user, so they live beside it.
mkdir -p .local
chmod 700 .local

# The agent's admin credential: it creates sessions only for its holder, the
# data plane (which also reaps orphans with it). Generated once, owner-only;
# handed to those two processes only, never exported to the control plane.
if [ -z "${SESSION_AGENT_ADMIN_TOKEN:-}" ]; then
  mkdir -p .local
  if [ ! -s .local/dev-agent-admin-token ]; then
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > .local/dev-agent-admin-token)
  fi
  SESSION_AGENT_ADMIN_TOKEN=$(cat .local/dev-agent-admin-token)
fi
AGENT_ADMIN=$SESSION_AGENT_ADMIN_TOKEN
unset SESSION_AGENT_ADMIN_TOKEN
# Installed packages: prepared by the data plane, mounted by the agent.
export SESSION_AGENT_PACKAGE_ROOT=${SESSION_AGENT_PACKAGE_ROOT:-$PWD/.packages}
export DEPENDENCY_CACHE_DIR=${DEPENDENCY_CACHE_DIR:-$SESSION_AGENT_PACKAGE_ROOT/cache}
mkdir -p "$DEPENDENCY_CACHE_DIR"

# Encrypted artifacts live in the checkout (the KEK file is generated there too).
export ARTIFACT_ROOT=${ARTIFACT_ROOT:-$PWD/.local/artifacts}

# Development signing keys, generated once, readable by their owner only,
# never used with ENV=production: one for the service credential between
# the planes (the data plane's AUTH_JWT_SECRET, the control plane's
# DATA_PLANE_JWT_SECRET), one for callers' tokens (the control plane's
# AUTH_JWT_SECRET).
dev_key() {
  mkdir -p .local
  if [ ! -s ".local/$1" ]; then
    echo "[run-local] generating a development signing key in .local/$1 (mode 0600)" >&2
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > ".local/$1")
  fi
  cat ".local/$1"
}
DP_SECRET=${DATA_PLANE_JWT_SECRET:-$(dev_key dev-jwt-secret)}
USER_SECRET=${CONTROL_PLANE_JWT_SECRET:-$(dev_key dev-user-jwt-secret)}
# The control plane's metadata, jobs and audit log: SQLite in the checkout.
export DATABASE_DRIVER=${DATABASE_DRIVER:-sqlite}
export DATABASE_URL=${DATABASE_URL:-file:.local/control-plane.db?cache=shared&mode=rwc}

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "[run-local] stopping (sandboxes are destroyed before the agent exits)..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "[run-local] stopped"
}
trap stop INT TERM EXIT

SESSION_AGENT_ADMIN_TOKEN=$AGENT_ADMIN "$BIN/session-agent" & pids+=($!)
# The data plane reaps orphan sandboxes at start: let the agent answer first.
for _ in $(seq 1 300); do
  curl -fsS "$SESSION_AGENT_ENDPOINT/v1/health" >/dev/null 2>&1 && break
  sleep 0.1
done
SESSION_AGENT_ADMIN_TOKEN=$AGENT_ADMIN AUTH_JWT_SECRET=$DP_SECRET "$BIN/data-plane" & pids+=($!)
AUTH_JWT_SECRET=$USER_SECRET DATA_PLANE_JWT_SECRET=$DP_SECRET "$BIN/control-plane" & pids+=($!)

cp=http://127.0.0.1:${CONTROL_PLANE_ADDR##*:}
for _ in $(seq 1 300); do
  curl -fsS "$cp/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
TOKEN=$(AUTH_JWT_SECRET=$USER_SECRET "$BIN/control-plane" token --tenant demo --roles admin,agent --ttl 86400)
if [ -n "$MCP_ADDR" ]; then
  mcp=http://127.0.0.1:${MCP_ADDR##*:}
  mcp_desc="$mcp/mcp (and /tools/*)"
  MCP_TXT=$(cat <<TXT

  # MCP (Streamable HTTP): paste into an MCP client's configuration
  # (Claude Code: .mcp.json; Cursor: .cursor/mcp.json; VS Code: "servers")
  {
    "mcpServers": {
      "sandbox": {
        "type": "http",
        "url": "$mcp/mcp",
        "headers": { "Authorization": "Bearer $TOKEN" }
      }
    }
  }
  # check it with the official Python SDK: make mcp-check

  # the seed's REST tool endpoints on the MCP port (same bodies as /v1)
  curl -s -X POST $mcp/tools/jobs -H "Authorization: Bearer \$TOKEN" -H 'Content-Type: application/json' \\
    -d '{"code":"6 * 7"}'
TXT
)
else
  mcp_desc="off (MCP_ADDR is empty)"
  MCP_TXT=""
fi
cat <<TXT

[run-local] ready: control plane $cp (REST; docs at $cp/docs), MCP $mcp_desc, data plane $DATA_PLANE_ADDR, session agent $SESSION_AGENT_ADDR.
Ctrl-C stops all three.

  # a development token for tenant "demo" (roles admin, agent), valid 24 h
  export TOKEN=$TOKEN

  # a one-shot job: queued, then its result (waitMs long-polls)
  curl -s -X POST $cp/v1/jobs -H "Authorization: Bearer \$TOKEN" -H 'Content-Type: application/json' \\
    -H 'Idempotency-Key: hello-1' -d '{"code":"print(\\"hello\\")\\n6 * 7"}'
  curl -s "$cp/v1/jobs/<jobId>?waitMs=10000" -H "Authorization: Bearer \$TOKEN"

  # a session with two steps: state persists between them
  curl -s -X POST $cp/v1/sessions -H "Authorization: Bearer \$TOKEN" -H 'Content-Type: application/json' -d '{}'
  curl -s -X POST $cp/v1/sessions/<sessionId>/steps -H "Authorization: Bearer \$TOKEN" \\
    -H 'Content-Type: application/json' -d '{"code":"x = 6 * 7"}'
  curl -s -X POST $cp/v1/sessions/<sessionId>/steps -H "Authorization: Bearer \$TOKEN" \\
    -H 'Content-Type: application/json' -d '{"code":"x"}'
  curl -s -X DELETE $cp/v1/sessions/<sessionId> -H "Authorization: Bearer \$TOKEN"

  # the audit trail, and its hash chain checked
  curl -s "$cp/v1/audit?limit=20" -H "Authorization: Bearer \$TOKEN"
  curl -s $cp/v1/audit/verify -H "Authorization: Bearer \$TOKEN"
$MCP_TXT

TXT
wait -n "${pids[@]}" || true
