#!/usr/bin/env bash
# make run-local: the session agent (:9000), data plane (:8081) and control
# plane (:8080) on their embedded defaults. Ctrl-C stops all three; the
# agent destroys every sandbox it started before it exits.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
export ENV=${ENV:-dev}
export RUST_LOG=${RUST_LOG:-info}

# The agent's admin credential, shared with the data plane (orphan reaping).
if [ -z "${SESSION_AGENT_ADMIN_TOKEN:-}" ]; then
  mkdir -p .local
  if [ ! -s .local/dev-agent-admin-token ]; then
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > .local/dev-agent-admin-token)
  fi
  SESSION_AGENT_ADMIN_TOKEN=$(cat .local/dev-agent-admin-token)
  export SESSION_AGENT_ADMIN_TOKEN
fi
# Installed packages: prepared by the data plane, mounted by the agent.
export SESSION_AGENT_PACKAGE_ROOT=${SESSION_AGENT_PACKAGE_ROOT:-$PWD/.local/packages}
export DEPENDENCY_CACHE_DIR=${DEPENDENCY_CACHE_DIR:-$SESSION_AGENT_PACKAGE_ROOT/cache}
mkdir -p "$DEPENDENCY_CACHE_DIR"

# Encrypted artifacts live in the checkout (the KEK file is generated there too).
export ARTIFACT_ROOT=${ARTIFACT_ROOT:-$PWD/.local/artifacts}

# A development signing key for the service credential between the planes,
# generated once, readable by its owner only. Never used with ENV=production.
if [ -z "${AUTH_JWT_SECRET:-}" ]; then
  mkdir -p .local
  if [ ! -s .local/dev-jwt-secret ]; then
    echo "[run-local] generating a development signing key in .local/dev-jwt-secret (mode 0600)"
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > .local/dev-jwt-secret)
  fi
  AUTH_JWT_SECRET=$(cat .local/dev-jwt-secret)
  export AUTH_JWT_SECRET
fi

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

"$BIN/session-agent" & pids+=($!)
"$BIN/data-plane" & pids+=($!)
"$BIN/control-plane" & pids+=($!)

agent_addr=${SESSION_AGENT_ADDR:-:9000}
agent=http://127.0.0.1:${agent_addr##*:}
for _ in $(seq 1 100); do
  curl -fsS "$agent/v1/health" >/dev/null 2>&1 && break
  sleep 0.1
done
token=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
cat <<TXT

[run-local] ready: session agent $agent, data plane :8081, control plane :8080 (Ctrl-C stops all)

  # a Python session (the token is yours to choose: >= 43 characters)
  curl -s -X POST $agent/v1/sessions -H 'Content-Type: application/json' \\
    -d '{"sessionId":"demo","runtime":"python","token":"$token"}'

  # two steps: state persists between them
  curl -s -X POST $agent/v1/steps -H 'Content-Type: application/json' -H 'X-Session-Token: $token' \\
    -d '{"sessionId":"demo","stepId":"1","code":"x = 6 * 7\\nprint(\"hello\")"}'
  curl -s -X POST $agent/v1/steps -H 'Content-Type: application/json' -H 'X-Session-Token: $token' \\
    -d '{"sessionId":"demo","stepId":"2","code":"x"}'

  # end it (the sandbox is destroyed, the workspace wiped)
  curl -s -X DELETE $agent/v1/sessions/demo -H 'X-Session-Token: $token'

  # the data plane (internal API, service credential): a development token
  DP_TOKEN=\$(AUTH_JWT_SECRET=\$(cat .local/dev-jwt-secret) $BIN/data-plane token --tenant demo)
  curl -s localhost:8081/internal/v1/runtimes -H "Authorization: Bearer \$DP_TOKEN"
  curl -s -X POST localhost:8081/internal/v1/jobs -H "Authorization: Bearer \$DP_TOKEN" \\
    -H 'Content-Type: application/json' -d '{"jobId":"hello","code":"6 * 7"}'

TXT
wait -n "${pids[@]}" || true
