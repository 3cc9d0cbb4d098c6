#!/usr/bin/env bash
# Installs what the project needs on a Debian machine, idempotently: only
# what is missing, saying what it does. Run as root (or with sudo available).
set -euo pipefail

missing=()
note() { printf '[deps] %s\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }

have runsc || missing+=(runsc)          # gVisor: the default isolation
have bwrap || missing+=(bubblewrap)     # fallback isolation
have unshare || missing+=(util-linux)   # unshare, prlimit: tests and bwrap/none limits
have prlimit || missing+=(util-linux)
have ip || missing+=(iproute2)          # network-namespace escape tests
[ -x /usr/bin/python3 ] || missing+=(python3)
[ -x /usr/bin/node ] || missing+=(nodejs)
have curl || missing+=(curl)            # make run-local examples

if [ ${#missing[@]} -eq 0 ]; then
  note "runsc, bubblewrap, python3, node: all present"
  exit 0
fi

# De-duplicate.
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  have sudo || { note "need root to install: ${missing[*]}"; exit 1; }
  SUDO="sudo"
fi
note "installing with apt-get: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q "${missing[@]}"; then
  note "refreshing package lists"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q "${missing[@]}"
fi
note "installed: ${missing[*]}"
