#!/usr/bin/env bash
# A whole qwen-serve cluster on this machine, with one command, until Ctrl-C:
#
#   scripts/local_cluster.sh [MODEL_DIR]
#
# etcd (when installed) on free loopback ports, one worker group of 2 tensor-parallel ranks
# registered in it (tp 1 and static membership without etcd), and a router with the public gRPC
# API and the OpenAI-compatible HTTP API. Without MODEL_DIR it serves a tiny demo model with random
# weights (.cache/demo-model, from fixtures/models/qwen2-gqa): everything works, the text is
# gibberish. The endpoints, example commands and then the line `cluster ready` are printed once
# the router has a healthy group. Ctrl-C (or SIGTERM) stops everything and removes the temp dir.
#
# Environment:
#   QWEN_BIN_DIR                use qwen-worker and qwen-router from there (e.g. target/debug)
#                               instead of `cargo build --release -p qwen-worker -p qwen-router`
#   QWEN_LOCAL_GRPC_PORT        router gRPC port (default 50050; 0: any free port)
#   QWEN_LOCAL_HTTP_PORT        router HTTP port (default 8000; 0: any free port)
#   QWEN_LOCAL_KV_CACHE_BYTES   KV cache per rank (default 268435456)
#   QWEN_LOCAL_START_SECS       longest wait for the worker to load the model (default 600)
set -euo pipefail
# A closed stdout (`| head`, a terminal gone) must not kill the script before it stops its children.
trap '' PIPE

usage() {
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
  exit "$1"
}
say() { printf '%s\n' "$*" 2>/dev/null || true; }
err() { printf 'local_cluster: %s\n' "$*" >&2 2>/dev/null || true; }
die() {
  err "$*"
  exit 1
}

case "${1:-}" in -h | --help) usage 0 ;; esac
[ $# -le 1 ] || usage 2 >&2

# Paths given relative to the caller's directory are resolved before changing to the repository root.
model_dir=
bin_dir=
if [ -n "${QWEN_BIN_DIR:-}" ]; then
  bin_dir=$(cd "$QWEN_BIN_DIR" 2>/dev/null && pwd) || die "QWEN_BIN_DIR: no directory '$QWEN_BIN_DIR'"
fi
if [ $# -eq 1 ]; then
  [ -d "$1" ] || die "model directory '$1' does not exist"
  [ -f "$1/config.json" ] || die "'$1' has no config.json: MODEL_DIR must be a Hugging Face model directory"
  model_dir=$(cd "$1" && pwd)
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

port_env() { # NAME DEFAULT -> the port
  local v=${!1:-$2}
  if ! [[ $v =~ ^[0-9]+$ ]] || [ "$v" -gt 65535 ]; then
    die "$1=$v is not a port number (0: any free port)"
  fi
  printf '%s' "$v"
}
grpc_port=$(port_env QWEN_LOCAL_GRPC_PORT 50050)
http_port=$(port_env QWEN_LOCAL_HTTP_PORT 8000)
kv_bytes=${QWEN_LOCAL_KV_CACHE_BYTES:-268435456}
start_secs=${QWEN_LOCAL_START_SECS:-600}
# Before any build: protoc (the build needs it), etcd and curl, or the one command that installs them.
if ! command -v protoc >/dev/null || ! command -v curl >/dev/null || ! command -v etcd >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    say "installing what the cluster needs: scripts/setup.sh"
    bash scripts/setup.sh || die "scripts/setup.sh failed"
  else
    die "protoc, etcd and curl are needed: run once as root:  sudo scripts/setup.sh"
  fi
fi
for p in "$grpc_port" "$http_port"; do
  if [ "$p" != 0 ] && (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    die "port $p is in use: set QWEN_LOCAL_GRPC_PORT / QWEN_LOCAL_HTTP_PORT (0: any free port)"
  fi
done

# --- binaries -------------------------------------------------------------------------------------
if [ -z "$bin_dir" ]; then
  say "building release binaries: cargo build --release -p qwen-worker -p qwen-router"
  cargo build --release -p qwen-worker -p qwen-router || die "cargo build failed"
  bin_dir=${CARGO_TARGET_DIR:-target}/release
fi
worker_bin=$bin_dir/qwen-worker
router_bin=$bin_dir/qwen-router
for b in "$worker_bin" "$router_bin"; do
  [ -x "$b" ] || die "$b not found (build it, or unset QWEN_BIN_DIR to build release binaries)"
done

# --- model ----------------------------------------------------------------------------------------
demo=0
if [ -z "$model_dir" ]; then
  demo=1
  fixture=$root/fixtures/models/qwen2-gqa
  model_dir=$root/.cache/demo-model
  mkdir -p "$root/.cache"
  # Built aside and swapped in only when it differs, so a cluster already serving it is left alone.
  fresh=$(mktemp -d "$root/.cache/demo-model.XXXXXX")
  for f in config.json generation_config.json tokenizer.json model.safetensors; do
    cp "$fixture/$f" "$fresh/$f"
  done
  # Qwen2-Instruct's ChatML template, so /v1/chat/completions works.
  cat >"$fresh/tokenizer_config.json" <<'EOF'
{
  "bos_token": null,
  "eos_token": "<|im_end|>",
  "pad_token": "<|endoftext|>",
  "model_max_length": 256,
  "chat_template": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
}
EOF
  if diff -rq "$fresh" "$model_dir" >/dev/null 2>&1; then
    rm -rf "$fresh"
  else
    rm -rf "$model_dir"
    mv -T "$fresh" "$model_dir" 2>/dev/null || rm -rf "$fresh"
  fi
fi
model_name=$(basename "$model_dir")

# --- processes ------------------------------------------------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/qwen-local-cluster.XXXXXX")
etcd_pid='' worker_pid='' router_pid=''
rank_pids=()
stopping=0

# Children get their own session (setsid), so a Ctrl-C in the terminal reaches only this script,
# which stops them in order: router and worker group first, etcd (where they deregister) last.
spawn() { # LOG CMD... ; sets $spawned
  local log=$1
  shift
  if command -v setsid >/dev/null; then
    setsid "$@" >"$log" 2>&1 </dev/null &
  else
    "$@" >"$log" 2>&1 </dev/null &
  fi
  spawned=$!
}

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# SIGTERM to PIDS, SIGKILL to whatever of them and of ALSO is still running after GRACE seconds.
terminate() { # GRACE PIDS... [-- ALSO...]
  local grace=$1 p
  shift
  local term=() all=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    [ -n "$1" ] && term+=("$1")
    shift
  done
  [ $# -gt 0 ] && shift
  all=("${term[@]}" "$@")
  for p in "${term[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  local deadline=$((SECONDS + grace)) left
  while :; do
    left=()
    for p in "${all[@]}"; do alive "$p" && left+=("$p"); done
    [ ${#left[@]} -eq 0 ] && break
    if [ $SECONDS -ge $deadline ]; then
      err "still running after ${grace} s, killing (SIGKILL): pid ${left[*]}"
      kill -KILL "${left[@]}" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
}

shutdown() { # EXIT_CODE
  [ "$stopping" = 1 ] && return
  stopping=1
  # Nothing interrupts the cleanup.
  trap '' INT TERM HUP
  say "stopping the cluster ..."
  terminate 10 "$router_pid" "$worker_pid" -- "${rank_pids[@]}"
  terminate 5 "$etcd_pid"
  wait 2>/dev/null || true
  rm -rf "$tmp/etcd-data"
  if [ "$1" = 0 ]; then
    rm -rf "$tmp"
    say "stopped"
  else
    err "logs kept in $tmp"
  fi
  exit "$1"
}

# A process that ended: its log's tail, then everything stops with an error.
fail() { # MESSAGE [LOG]
  err "$1"
  if [ -n "${2:-}" ] && [ -s "$2" ]; then
    err "last lines of $2:"
    sed '/^Stack backtrace:/,$d' "$2" | tail -n 30 | sed 's/^/    /' >&2 || true
  fi
  shutdown 1
}

check() { # NAME PID LOG
  if ! alive "$2"; then
    local status=0
    wait "$2" 2>/dev/null || status=$?
    fail "$1 exited early (status $status)" "$3"
  fi
}

check_all() {
  [ -z "$etcd_pid" ] || check etcd "$etcd_pid" "$tmp/etcd.log"
  [ -z "$worker_pid" ] || check "the worker group" "$worker_pid" "$tmp/worker.log"
  [ -z "$router_pid" ] || check "the router" "$router_pid" "$tmp/router.log"
}

# Waits for a line starting with PREFIX in LOG; sets $found to the rest of it.
wait_line() { # LOG PREFIX SECONDS WHAT
  local deadline=$((SECONDS + $3)) line
  while :; do
    line=$(grep -m1 -- "^$2" "$1" 2>/dev/null || true)
    if [ -n "$line" ]; then
      found=${line#"$2"}
      return 0
    fi
    check_all
    [ $SECONDS -lt "$deadline" ] || fail "$4 did not print '$2' within $3 s" "$1"
    sleep 0.2
  done
}

# Processes whose parent is PID (the tp supervisor's ranks).
children_of() { # PID
  local f s ppid
  for f in /proc/[0-9]*/stat; do
    s=$(cat "$f" 2>/dev/null) || continue
    read -r _ ppid _ <<<"${s##*) }"
    if [ "$ppid" = "$1" ]; then
      f=${f#/proc/}
      printf '%s\n' "${f%/stat}"
    fi
  done
}

free_ports() { # N -> N free loopback ports, one per line
  if command -v python3 >/dev/null; then
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print("\n".join(str(s.getsockname()[1]) for s in socks))
EOF
  else
    local i p
    for ((i = 0; i < $1; i++)); do
      p=$((20000 + RANDOM % 40000))
      while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((20000 + RANDOM % 40000)); done
      say "$p"
    done
  fi
}

trap 'shutdown 0' INT TERM HUP
# Any other way out (an unexpected error under set -e) stops the children too.
on_exit() {
  local code=$?
  [ "$stopping" = 1 ] || shutdown "$((code == 0 ? 1 : code))"
}
trap on_exit EXIT

if [ "$demo" = 1 ]; then
  say "Demo model $model_dir: a tiny Qwen2 with RANDOM weights, so the output is gibberish"
  say "by design. For real text pass a model: scripts/local_cluster.sh /models/Qwen2.5-0.5B-Instruct"
else
  say "Model $model_name: $model_dir"
fi

# etcd: discovery for the router, and where the tp ranks meet.
etcd_url=
if command -v etcd >/dev/null; then
  mapfile -t ports < <(free_ports 2)
  [ ${#ports[@]} -eq 2 ] || fail "could not find free ports for etcd"
  etcd_url=http://127.0.0.1:${ports[0]}
  peer_url=http://127.0.0.1:${ports[1]}
  spawn "$tmp/etcd.log" etcd --name local --data-dir "$tmp/etcd-data" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "$peer_url" --initial-advertise-peer-urls "$peer_url" \
    --initial-cluster "local=$peer_url"
  etcd_pid=$spawned
  deadline=$((SECONDS + 30))
  until [[ $(curl -sf "$etcd_url/health" 2>/dev/null) == *'"health":"true"'* ]]; do
    check_all
    [ $SECONDS -lt $deadline ] || fail "etcd did not become healthy within 30 s" "$tmp/etcd.log"
    sleep 0.2
  done
  tp=2
else
  tp=1
  say "etcd is not installed: static membership, and tp 1 instead of tp 2 (tensor-parallel ranks"
  say "meet through etcd; apt-get install etcd-server, or put an etcd binary on PATH)"
fi

# The worker group.
worker_args=(serve --model "$model_dir" --model-name "$model_name" --listen 127.0.0.1:0
  --kv-cache-bytes "$kv_bytes" --drain-timeout-secs 5)
if [ -n "$etcd_url" ]; then
  worker_args+=(--tp "$tp" --etcd "$etcd_url" --group local-0)
fi
worker_help=$("$worker_bin" serve --help 2>&1 || true)
metrics=0
if [[ $worker_help == *--metrics-listen* ]]; then
  metrics=1
  worker_args+=(--metrics-listen 127.0.0.1:0)
fi
say "starting the worker group (tp $tp; loading the model) ..."
spawn "$tmp/worker.log" "$worker_bin" "${worker_args[@]}"
worker_pid=$spawned
wait_line "$tmp/worker.log" "listening on " "$start_secs" "the worker group"
worker_addr=$found
if [ "$tp" -gt 1 ]; then
  mapfile -t rank_pids < <(children_of "$worker_pid")
fi

# The router.
router_args=(--grpc-listen "127.0.0.1:$grpc_port" --http-listen "127.0.0.1:$http_port" --health-interval-ms 500)
if [ -n "$etcd_url" ]; then
  router_args+=(--etcd "$etcd_url")
else
  router_args+=(--worker "$worker_addr")
fi
spawn "$tmp/router.log" "$router_bin" "${router_args[@]}"
router_pid=$spawned
wait_line "$tmp/router.log" "grpc listening on " 30 "the router"
grpc_addr=$found
wait_line "$tmp/router.log" "http listening on " 30 "the router"
http_addr=$found
deadline=$((SECONDS + 60))
until curl -sf -o /dev/null "http://$http_addr/health"; do
  check_all
  [ $SECONDS -lt $deadline ] || fail "the router found no healthy worker group within 60 s" "$tmp/router.log"
  sleep 0.2
done

metrics_line="not available (this qwen-worker has no --metrics-listen)"
if [ "$metrics" = 1 ]; then
  metrics_line="enabled, address not printed (see $tmp/worker.log)"
  m=$(grep -m1 '^metrics on ' "$tmp/worker.log" 2>/dev/null || true)
  [ -z "$m" ] || metrics_line="http://${m#metrics on }/metrics"
fi

{
  cat <<EOF

qwen-serve local cluster
  model:        $model_name
  OpenAI API:   http://$http_addr/v1
  gRPC API:     $grpc_addr  (qwen.serve.v1.Generation, with reflection and health)
  worker group: ${etcd_url:+local-0, }tp $tp, worker gRPC $worker_addr
  metrics:      $metrics_line
  etcd:         ${etcd_url:-none (static membership)}
  logs:         $tmp

Try:
  curl -s http://$http_addr/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model": "$model_name", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'
  grpcurl -plaintext $grpc_addr list
  grpcurl -plaintext -d '{"model": "$model_name", "text": "Hello", "options": {"max_tokens": 16}}' \\
    $grpc_addr qwen.serve.v1.Generation/Generate
  OpenAI clients: base_url="http://$http_addr/v1", api_key="unused", model="$model_name"

Ctrl-C stops the cluster.
cluster ready
EOF
} 2>/dev/null || true

while :; do
  check_all
  sleep 0.5
done
