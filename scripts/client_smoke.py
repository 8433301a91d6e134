"""Real clients against a running router: the official `openai` Python client (completions,
chat, streaming) and gRPC server reflection through Python's grpcio-reflection client (v1alpha).
Usage: client_smoke.py HTTP_BASE GRPC_ADDR MODEL. Exits non-zero on any mismatch."""
import sys

import grpc
import openai
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

http_base, grpc_addr, model = sys.argv[1:4]
client = openai.OpenAI(base_url=f"{http_base}/v1", api_key="unused")

models = [m.id for m in client.models.list().data]
assert model in models, models

greedy = dict(temperature=0.0, extra_body={"repetition_penalty": 1.0, "ignore_eos": True})
done = client.completions.create(model=model, prompt="Hello, Qwen!", max_tokens=8, **greedy)
assert done.choices[0].finish_reason == "length", done
assert done.usage.completion_tokens == 8, done.usage
streamed = "".join(
    c.choices[0].text for c in client.completions.create(model=model, prompt="Hello, Qwen!", max_tokens=8, stream=True, **greedy)
)
assert streamed == done.choices[0].text, (streamed, done.choices[0].text)

chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, **greedy)
assert chat.choices[0].message.role == "assistant"
parts = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True, **greedy
)
streamed = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
assert streamed == chat.choices[0].message.content, (streamed, chat.choices[0].message.content)

try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.body["param"] == "model", e.body
try:
    client.completions.create(model=model, prompt="x", max_tokens=1, temperature=-1)
    raise AssertionError("bad temperature accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body

with grpc.insecure_channel(grpc_addr) as channel:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = [s.name for r in responses for s in r.list_services_response.service]
    assert "qwen.serve.v1.Generation" in services, services
    # Only what the port serves: the worker's service shares the descriptor set but not the port.
    assert "qwen.worker.v1.Worker" not in services, services
print("openai client and grpc reflection (v1alpha): ok")
