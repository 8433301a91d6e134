#!/usr/bin/env bash
# Soak: a router over two worker groups found through etcd (group A: 2 tensor-parallel ranks,
# group B: 1 rank; the tiny qwen2-gqa fixture), 32 concurrent streams for SECONDS while faults
# are injected in turn: kill -9 of B, SIGSTOP of one rank of A, SIGSTOP of B, etcd kill -9 and
# restart, drain (SIGTERM) of B. A keeper restarts a group whose process exits, as Kubernetes
# would. Everything is on loopback, bounded in time, and stopped by PID at the end.
#
#   scripts/soak.sh [SECONDS]      # default 600; CI runs a short one
#
# Prints one JSON line: the client's tally (started, completed, failed by status, lost = not
# ended within --hang-secs, p50/p99, longest wait), router and worker RSS at start and end, KV
# blocks held once idle, and panics found in the logs. Exit 1 if a request was lost, a process
# panicked, or KV blocks stay held. Environment: QWEN_BIN_DIR (default target/debug, built by
# `cargo build --workspace --bins`).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
bin=${QWEN_BIN_DIR:-target/debug}
for b in qwen-worker qwen-router qwen-soak; do
  [ -x "$bin/$b" ] || { echo "soak: $bin/$b missing: cargo build --workspace --bins" >&2; exit 1; }
done
command -v etcd >/dev/null || { echo "soak: etcd missing: sudo scripts/setup.sh" >&2; exit 1; }
tmp=$(mktemp -d)
model=fixtures/models/qwen2-gqa
pids=()
cleanup() {
  touch "$tmp/stop"
  for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null || true; done
  pkill -CONT -f -- "--group soak-" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -f -- "--group soak-" 2>/dev/null || true
  sleep 1
  pkill -9 -f -- "--group soak-" 2>/dev/null || true
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
log() { printf 'soak %(%H:%M:%S)T %s\n' -1 "$*" >&2; }

etcd_client=$(free_port) etcd_peer=$(free_port)
etcd_url=http://127.0.0.1:$etcd_client
start_etcd() {
  etcd --name soak --data-dir "$tmp/etcd" --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "soak=http://127.0.0.1:$etcd_peer" >>"$tmp/etcd.log" 2>&1 &
  echo $! >"$tmp/etcd.pid"
  until curl -sf "$etcd_url/health" >/dev/null 2>&1; do sleep 0.2; done
}
start_etcd
pids+=("$(cat "$tmp/etcd.pid")")

# keeper NAME ARGS...: runs the group, restarting it whenever it exits, until the soak stops.
keeper() {
  local name=$1
  shift
  while [ ! -f "$tmp/stop" ]; do
    "$bin/qwen-worker" serve --model "$model" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
      --etcd "$etcd_url" --group "soak-$name" --registration-ttl-secs 2 --kv-cache-bytes 4000000 \
      --collective-timeout-ms 2000 --stuck-after-ms 500 --drain-timeout-secs 5 "$@" >>"$tmp/$name.log" 2>&1 || true
    [ -f "$tmp/stop" ] || { echo "restart" >>"$tmp/$name.restarts"; sleep 0.5; }
  done
}
keeper a --tp 2 &
pids+=($!)
keeper b &
pids+=($!)
"$bin/qwen-router" --etcd "$etcd_url" --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --first-token-timeout-secs 10 --inter-token-timeout-secs 5 >"$tmp/router.out" 2>"$tmp/router.log" &
router=$!
pids+=("$router")
until grep -q "http listening on" "$tmp/router.out" 2>/dev/null; do sleep 0.2; done
grpc=$(sed -n 's/^grpc listening on //p' "$tmp/router.out")
http=$(sed -n 's/^http listening on //p' "$tmp/router.out")
deadline=$((SECONDS + 120))
until [ "$(curl -s "http://$http/v1/models" | grep -o '"id"' | wc -l)" -ge 1 ] && [ "$(grep -c 'listening on' "$tmp/a.log" "$tmp/b.log" | grep -c ':[1-9]')" -eq 2 ]; do
  [ $SECONDS -lt $deadline ] || { echo "soak: the cluster did not come up" >&2; exit 1; }
  sleep 0.5
done
group_pid() { pgrep -f -- "--group soak-$1" | head -n "${2:-1}" | tail -n 1; }
rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$1/status" 2>/dev/null || echo 0; }
log "cluster up: router grpc $grpc; load for ${seconds}s"

"$bin/qwen-soak" --grpc "http://$grpc" --model qwen2-gqa --streams 32 --seconds "$seconds" --hang-secs 45 \
  >"$tmp/client.json" 2>"$tmp/client.log" &
client=$!
pids+=("$client")
sleep 5
rss_start="{\"router\": $(rss "$router"), \"worker_b\": $(rss "$(group_pid b)")}"

# Faults, spread over the run.
# Five gaps plus the faults' own 12 s fit in the run.
step=$(((seconds - 14) / 5))
[ "$step" -ge 1 ] || step=1
fault() { log "fault: $*"; }
sleep "$step"; fault "kill -9 group b"; kill -9 "$(group_pid b)" 2>/dev/null || true
sleep "$step"; fault "SIGSTOP rank 1 of group a for 3 s"
rank1=$(pgrep -f -- "--rank 1 --world-size 2 --group soak-a" | head -n 1 || true)
if [ -n "$rank1" ]; then kill -STOP "$rank1"; sleep 3; kill -CONT "$rank1" 2>/dev/null || true; fi
sleep "$step"; fault "SIGSTOP group b for 6 s"
b=$(group_pid b); kill -STOP "$b" 2>/dev/null || true; sleep 6; kill -CONT "$b" 2>/dev/null || true
sleep "$step"; fault "etcd kill -9, back after 3 s"
kill -9 "$(cat "$tmp/etcd.pid")"; sleep 3; start_etcd; pids+=("$(cat "$tmp/etcd.pid")")
sleep "$step"; fault "drain group b (SIGTERM)"; kill -TERM "$(group_pid b)" 2>/dev/null || true
wait "$client" || true
rss_end="{\"router\": $(rss "$router"), \"worker_b\": $(rss "$(group_pid b)")}"

# Idle: no KV block may stay held by a sequence.
sleep 3
held=0
for g in a b; do
  m=$(sed -n 's/^metrics on //p' "$tmp/$g.log" | tail -n 1)
  used=$(curl -s "http://$m/metrics" | awk '/^qwen_serve_worker_kv_blocks_used/ {print $2}' | head -n 1)
  held=$((held + ${used:-0}))
done
panics=$(cat "$tmp"/*.log | grep -c "panicked" || true)
restarts="{\"a\": $(cat "$tmp/a.restarts" 2>/dev/null | wc -l), \"b\": $(cat "$tmp/b.restarts" 2>/dev/null | wc -l)}"
echo "{\"client\": $(cat "$tmp/client.json"), \"rss_start\": $rss_start, \"rss_end\": $rss_end, \"kv_blocks_held_idle\": $held, \"panics\": $panics, \"restarts\": $restarts}"
lost=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["lost"])' "$tmp/client.json")
[ "$lost" = 0 ] && [ "$panics" = 0 ] && [ "$held" = 0 ]
