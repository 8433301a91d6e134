"""Real clients against a running router: the official `openai` Python client (completions,
chat, streaming) and gRPC server reflection through Python's grpcio-reflection client (v1alpha).
Usage: client_smoke.py HTTP_BASE GRPC_ADDR MODEL [--api-key KEY] [--cacert CA.pem] [--agent]: with a
key, requests carry it (and one without it must be refused); with a CA, both ports are TLS. With
--agent (a router whose template renders tools) only the agent checks run: forced tool calls and
structured outputs, whose validity on random weights comes from the worker's grammar mask.
Exits non-zero on any mismatch."""
import argparse

import grpc
import openai
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

parser = argparse.ArgumentParser()
parser.add_argument("http_base")
parser.add_argument("grpc_addr")
parser.add_argument("model")
parser.add_argument("--api-key", default=None)
parser.add_argument("--cacert", default=None)
parser.add_argument("--agent", action="store_true")
args = parser.parse_args()
http_base, grpc_addr, model = args.http_base, args.grpc_addr, args.model


def openai_client(key):
    # openai's own httpx client class, whichever httpx it ships with.
    http_client = openai.DefaultHttpxClient(verify=args.cacert) if args.cacert else None
    return openai.OpenAI(base_url=f"{http_base}/v1", api_key=key, http_client=http_client, max_retries=0)


client = openai_client(args.api_key or "unused")
if args.api_key:
    try:
        openai_client("sk-not-a-key-0000000000").models.list()
        raise AssertionError("a wrong API key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and e.body["code"] == "invalid_api_key", e.body

models = [m.id for m in client.models.list().data]
assert model in models, models


def agent_checks():
    import json

    import pydantic

    # Small: the fixture's context is 256 tokens, nearly one per character.
    tools = [{"type": "function", "function": {"name": "w", "parameters": {
        "type": "object", "properties": {"c": {"enum": ["P", "L"]}}, "required": ["c"]}}}]
    ask = [{"role": "user", "content": "P?"}]
    forced = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="required", temperature=0)
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls", forced
    call = choice.message.tool_calls[0]
    assert call.function.name == "w" and json.loads(call.function.arguments)["c"] in ("P", "L"), call
    named = client.chat.completions.create(
        model=model, messages=ask, tools=tools, tool_choice={"type": "function", "function": {"name": "w"}}, temperature=0
    )
    assert named.choices[0].message.tool_calls[0].function.arguments == call.function.arguments, named
    # Streamed: the name once, then the argument text, as OpenAI streams calls.
    name, arguments, finish = "", "", None
    for chunk in client.chat.completions.create(
        model=model, messages=ask, tools=tools, tool_choice="required", temperature=0, stream=True
    ):
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            name += d.function.name or ""
            arguments += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, arguments, finish) == ("w", call.function.arguments, "tool_calls"), (name, arguments, finish)
    # The round trip: the call and its result go back, the model answers (auto: any text). The
    # tool goes without its schema here to leave the context room for the history.
    history = ask + [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "9"}]
    bare = [{"type": "function", "function": {"name": "w"}}]
    answer = client.chat.completions.create(model=model, messages=history, tools=bare, max_tokens=2, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop", "tool_calls"), answer

    class Weather(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=4)
        sunny: bool

    parsed = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "W?"}], response_format=Weather, temperature=1.0, seed=5
    )
    w = parsed.choices[0].message.parsed
    assert isinstance(w, Weather) and len(w.city) <= 4, parsed
    try:
        client.chat.completions.create(model=model, messages=ask, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "string", "minLength": 5, "maxLength": 2}}})
        raise AssertionError("an unsatisfiable schema was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "response_format.json_schema.schema", e.body
    print("openai client: forced tool calls, round trip, structured outputs: ok")


if args.agent:
    agent_checks()
    raise SystemExit(0)

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

# Agent fields as the openai client sends them: tools, a call and its result in the history.
tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]
history = [
    {"role": "user", "content": "Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18"},
]
agent = client.chat.completions.create(model=model, messages=history, tools=tools, max_tokens=4, **greedy)
assert agent.choices[0].finish_reason in ("length", "stop", "tool_calls"), agent
try:
    client.chat.completions.create(model=model, messages=history, tools=tools, tool_choice="required", max_tokens=1)
    raise AssertionError("a forced call accepted where the router parses no tool calls (--tool-parser none)")
except openai.BadRequestError as e:
    assert e.body["param"] == "tool_choice", e.body

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

if args.cacert:
    with open(args.cacert, "rb") as f:
        channel = grpc.secure_channel(grpc_addr, grpc.ssl_channel_credentials(root_certificates=f.read()))
else:
    channel = grpc.insecure_channel(grpc_addr)
metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
with channel:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    responses = stub.ServerReflectionInfo(request, metadata=metadata)
    services = [s.name for r in responses for s in r.list_services_response.service]
    assert "qwen.serve.v1.Generation" in services, services
    # Only what the port serves: the worker's service shares the descriptor set but not the port.
    assert "qwen.worker.v1.Worker" not in services, services
    if args.api_key:
        try:
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            raise AssertionError("reflection without a key was served")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
secured = " with an API key" if args.api_key else ""
secured += " over TLS" if args.cacert else ""
print(f"openai client and grpc reflection (v1alpha){secured}: ok")
