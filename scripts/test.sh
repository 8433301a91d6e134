#!/usr/bin/env bash
# The test command: set-up (scripts/setup.sh: Debian packages and the Qwen tokenizer ranks,
# each only when missing), then every test of the workspace. Tests start their own real
# processes on loopback (workers, routers, etcd, Prometheus) and stop them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace --locked "$@"
