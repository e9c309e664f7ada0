"""The server on localhost, driven by the official openai SDK (and raw HTTP for error shapes)."""
import json
import re
import socket
import time
import uuid
import urllib.error
import urllib.request

import pytest
import torch

import dsv4
from dsv4.engine import AsyncLLM, EngineConfig, LLMEngine
from dsv4.server import ServerConfig, create_app
from dsv4.server.app import DEFAULT_PRICES
from dsv4.server.devmodel import build_dev_model
from dsv4.tokenizer import load_tokenizer

from helpers import serving

KEY = "sk-test-0123456789abcdef"
MAX_BODY = 64 << 10  # the test server's max_body_bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = build_dev_model(tmp_path_factory.mktemp("dev-model"))
    model = dsv4.load_model(path, dtype=torch.float32)
    llm = AsyncLLM(LLMEngine(model, load_tokenizer(path), EngineConfig(max_num_seqs=8)))
    app = create_app(llm, str(path / "tokenizer.json"), ServerConfig(api_keys=[KEY], max_concurrency=4,
                                                                      max_body_bytes=MAX_BODY))
    with serving(app) as url:
        yield url, llm, app, path
    llm.close()


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0], api_key=KEY, max_retries=0)


def post(url, body, key=KEY, raw=None, headers=None):
    """(status, JSON body) of a POST; `headers` (e.g. x-api-key) replace the Bearer header."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                          **(headers or {"Authorization": f"Bearer {key}"})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_health(client, server):
    ids = [m.id for m in client.models.list().data]
    assert "deepseek-v4-flash" in ids and "deepseek-reasoner" in ids
    with urllib.request.urlopen(server[0] + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


def test_chat_thinking_on_by_default(client):
    r = client.chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=6)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "length"
    assert msg.model_extra.get("reasoning_content")  # a random model never closes its thinking
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0


def test_chat_stream_thinking_off_with_usage(client):
    stream = client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True}, extra_body={"thinking": {"type": "disabled"}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage]
    assert text and usage and usage[-1].completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_streamed_equals_non_streamed_greedy(client):
    kw = dict(model="deepseek-chat", messages=[{"role": "user", "content": "same"}], max_tokens=8, temperature=0,
              extra_body={"thinking": {"type": "disabled"}})
    full = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert full == streamed and full


def test_repeated_prompt_reports_cache_hits(client):
    messages = [{"role": "system", "content": "x " * 150}, {"role": "user", "content": "cache me"}]
    kw = dict(model="deepseek-chat", messages=messages, max_tokens=2, extra_body={"thinking": {"type": "disabled"}})
    first = client.chat.completions.create(**kw).usage
    second = client.chat.completions.create(**kw).usage
    assert first.model_extra["prompt_cache_hit_tokens"] == 0
    hit = second.model_extra["prompt_cache_hit_tokens"]
    assert hit >= 64 and hit % 64 == 0 and second.prompt_tokens_details.cached_tokens == hit
    assert second.model_extra["prompt_cache_miss_tokens"] == second.prompt_tokens - hit


def test_bad_key_is_401(server):
    from openai import AuthenticationError, OpenAI

    bad = OpenAI(base_url=server[0], api_key="sk-wrong-key-9999", max_retries=0)
    with pytest.raises(AuthenticationError) as e:
        bad.models.list()
    assert "****9999" in str(e.value)


def test_error_shapes(server):
    url = server[0] + "/chat/completions"
    status, body = post(url, None, raw=b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post(url, {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and "model" in body["error"]["message"]
    status, body = post(url, {"model": "deepseek-chat", "messages": []})
    assert status in (400, 422)
    status, body = post(url, None, raw=json.dumps({"model": "deepseek-chat", "messages": [
        {"role": "user", "content": "y" * (70 << 10)}]}).encode())
    assert status == 413 and "exceeds" in body["error"]["message"]


def test_json_that_python_cannot_read_is_a_400_on_every_route(server):
    """api.md section 11: a bad body is a 400. Arrays nested past Python's recursion limit (a 40 KB body), an
    integer of more than 4300 digits, and (Chat, Messages) arrays nested past deepseek-recipe's 128 levels made
    json.loads or the recipe raise RecursionError / ValueError, which were 500s (the SDKs retry those)."""
    def body(x: bytes, seed: bytes = b"1") -> bytes:
        return (b'{"model": "deepseek-chat", "prompt": "x", "max_tokens": 1, "seed": ' + seed + b', "x": ' + x +
                b', "messages": [{"role": "user", "content": "x"}]}')
    for path in ("/chat/completions", "/anthropic/v1/messages", "/beta/completions"):
        cases = {"nested 20000": body(b"[" * 20_000 + b"]" * 20_000), "digits": body(b"0", b"9" * 5001)}
        if path != "/beta/completions":  # FIM ignores what it does not know
            cases["nested 500"] = body(b"[" * 500 + b"]" * 500)
        for what, raw in cases.items():
            status, answer = post(server[0] + path, None, raw=raw)
            assert status == 400 and answer["error"]["type"] == "invalid_request_error", (path, what, status, answer)


def test_thinking_passback_rule(client):
    """A thinking-mode tool-call turn without reasoning_content is DeepSeek's 400."""
    from openai import BadRequestError

    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="deepseek-reasoner", messages=messages, tools=tools, max_tokens=2)
    assert "reasoning_content" in str(e.value) and "passed back" in str(e.value)
    messages[1]["reasoning_content"] = "I should call the tool."
    r = client.chat.completions.create(model="deepseek-reasoner", messages=messages, tools=tools, max_tokens=2)
    assert r.choices[0].finish_reason == "length"
    messages[1]["reasoning_content"] = ""  # an empty reasoning passed back counts as passed back
    r = client.chat.completions.create(model="deepseek-reasoner", messages=messages, tools=tools, max_tokens=2)
    assert r.choices[0].finish_reason == "length"


def test_first_streamed_delta_and_the_developer_role(client, server):
    """lessons.md: clients broke on the first delta's shape and on `developer`. In thinking mode the first
    delta carries the role and `reasoning_content: ""`; `developer` is DeepSeek's 400 (api.md section 2)."""
    stream = client.chat.completions.create(model="deepseek-reasoner", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, stream=True)
    first = next(iter(stream)).choices[0].delta
    assert first.role == "assistant" and first.model_extra.get("reasoning_content") == ""
    status, body = post(server[0] + "/chat/completions", {"model": "deepseek-chat", "max_tokens": 2, "messages": [
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]})
    assert status == 400 and "unknown variant `developer`" in body["error"]["message"]


# ---- Anthropic Messages ----

@pytest.fixture
def claude(server):
    from anthropic import Anthropic

    return Anthropic(base_url=server[0] + "/anthropic", api_key=KEY, max_retries=0)


def test_anthropic_messages_thinking_and_usage(claude):
    r = claude.messages.create(model="claude-sonnet-4-6", max_tokens=6, messages=[{"role": "user", "content": "hi"}])
    assert r.type == "message" and r.stop_reason == "max_tokens"
    assert r.content and r.content[0].type == "thinking"  # thinking on by default
    assert r.usage.input_tokens > 0 and r.usage.output_tokens == 6


def test_anthropic_stream_thinking_disabled(claude):
    events = list(claude.messages.create(model="deepseek-v4-flash", max_tokens=5, stream=True,
                                         thinking={"type": "disabled"},
                                         messages=[{"role": "user", "content": "hello"}]))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert text


def test_anthropic_cache_read_tokens_on_repeat(claude):
    kw = dict(model="claude-opus-4-1", max_tokens=2, thinking={"type": "disabled"}, system="y " * 150,
              messages=[{"role": "user", "content": "again"}])
    claude.messages.create(**kw)
    r = claude.messages.create(**kw)
    assert r.usage.cache_read_input_tokens and r.usage.cache_read_input_tokens % 64 == 0


def test_anthropic_x_api_key_header_authenticates(server):
    """api.md sections 1 and 10: the Anthropic side authenticates with `x-api-key` alone (no Bearer header; this
    anthropic SDK sends a Bearer one): a valid key is served, a wrong one is Anthropic's 401 authentication_error."""
    ask = {"model": "deepseek-v4-flash", "max_tokens": 1, "thinking": {"type": "disabled"},
           "messages": [{"role": "user", "content": "hi"}]}
    status, body = post(server[0] + "/anthropic/v1/messages", ask, headers={"x-api-key": KEY})
    assert status == 200 and body["type"] == "message", body
    status, body = post(server[0] + "/anthropic/v1/messages", ask, headers={"x-api-key": "sk-wrong-key-7777"})
    assert (status, body) == (401, {"type": "error", "error": {
        "type": "authentication_error", "message": "Authentication Fails, Your api key: ****7777 is invalid"}})



def test_user_id_scopes_cache_hits_when_users_are_isolated(server):
    """`user_id` (chat, FIM) and `metadata.user_id` (Messages), DeepSeek's end-user field, reach the engine:
    with per-user isolation a prompt cached for one user is a miss for another; a malformed id is a 400."""
    path = server[3]
    llm = AsyncLLM(LLMEngine(dsv4.load_model(path, dtype=torch.float32), load_tokenizer(path),
                             EngineConfig(max_num_seqs=4, isolate_users=True)))
    with serving(create_app(llm, str(path / "tokenizer.json"), ServerConfig())) as url:
        chat = dict(model="deepseek-chat", max_tokens=1, messages=[{"role": "system", "content": "z " * 150},
                                                                   {"role": "user", "content": "hi"}])
        hits = lambda r: r[1]["usage"]["prompt_cache_hit_tokens"]  # noqa: E731
        assert hits(post(f"{url}/chat/completions", chat | {"user_id": "alice"})) == 0
        assert hits(post(f"{url}/chat/completions", chat | {"user_id": "alice"})) >= 64
        assert hits(post(f"{url}/chat/completions", chat | {"user_id": "bob-2"})) == 0
        assert hits(post(f"{url}/chat/completions", chat)) == 0  # no user: its own scope
        fim = dict(model="deepseek-v4-flash", prompt="w " * 150, max_tokens=1)
        assert hits(post(f"{url}/completions", fim | {"user_id": "alice"})) == 0
        assert hits(post(f"{url}/completions", fim | {"user_id": "alice"})) >= 64
        assert hits(post(f"{url}/completions", fim | {"user_id": "carol"})) == 0
        msg = dict(model="deepseek-v4-flash", max_tokens=1, system="q " * 150, thinking={"type": "disabled"},
                   messages=[{"role": "user", "content": "hi"}])
        read = lambda r: r[1]["usage"].get("cache_read_input_tokens") or 0  # noqa: E731
        assert read(post(f"{url}/v1/messages", msg | {"metadata": {"user_id": "alice"}})) == 0
        assert read(post(f"{url}/v1/messages", msg | {"metadata": {"user_id": "alice"}})) >= 64
        assert read(post(f"{url}/v1/messages", msg | {"metadata": {"user_id": "dave"}})) == 0
        # Anthropic allows any string as metadata.user_id (e.g. an e-mail address): it scopes hits too
        for _ in range(2):
            status, body = post(f"{url}/v1/messages", msg | {"metadata": {"user_id": "erin@example.com"}})
            assert status == 200
        assert read((status, body)) >= 64
        for bad in ("a b", "x" * 513, 7, ""):
            status, body = post(f"{url}/chat/completions", chat | {"user_id": bad})
            assert status == 400 and "user_id" in body["error"]["message"]
        assert post(f"{url}/v1/messages", msg | {"metadata": "alice"})[0] == 400  # not an object
        for bad in ("", "x" * 513):
            status, body = post(f"{url}/v1/messages", msg | {"metadata": {"user_id": bad}})
            assert status == 400 and "metadata.user_id" in body["error"]["message"]
    llm.close()


@pytest.mark.parametrize("stream,choice,thinking", [(False, "tool", "disabled"), (True, "tool", "disabled"),
                                                    (False, "any", "disabled"), (True, "any", "enabled")])
def test_anthropic_forced_tool_use_round_trip(claude, stream, choice, thinking):
    """tool_choice {"type": "tool"} or {"type": "any"} (which deepseek-recipe converts as auto: it used to
    answer with text) on Messages: a tool_use block whose input follows the input_schema (constrained
    decoding, even from the random dev model), streamed or not; its tool_result goes back."""
    tool = {"name": "set_light", "description": "Switch a light",
            "input_schema": {"type": "object", "properties": {"on": {"type": "boolean"},
                                                              "room": {"type": "string", "enum": ["kitchen", "hall"]}},
                             "required": ["on", "room"], "additionalProperties": False}}
    ask = [{"role": "user", "content": "Turn on the kitchen light."}]
    kw = dict(model="deepseek-v4-flash", max_tokens=120 if thinking == "disabled" else 400, tools=[tool],
              thinking={"type": thinking} | ({"budget_tokens": 1024} if thinking == "enabled" else {}))
    tool_choice = {"type": "tool", "name": "set_light"} if choice == "tool" else {"type": "any"}
    if stream:
        with claude.messages.stream(tool_choice=tool_choice, messages=ask, **kw) as s:
            r = s.get_final_message()
    else:
        r = claude.messages.create(tool_choice=tool_choice, messages=ask, **kw)
    uses = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "set_light"
    assert set(uses[0].input) == {"on", "room"} and isinstance(uses[0].input["on"], bool)
    assert uses[0].input["room"] in ("kitchen", "hall")
    back = ask + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "done"}]}]
    after = claude.messages.create(messages=back, **kw | {"max_tokens": 4})
    assert after.type == "message" and after.stop_reason in ("end_turn", "max_tokens", "tool_use")

def test_request_checks_deepseek_recipe_leaves_to_the_server(server, claude):
    """api.md section 2: at most 128 tools, names of at most 64 characters, response_format text or json_object
    only (regex, which deepseek-recipe converts, was accepted and then neither enforced nor refused); and
    deepseek-chat / deepseek-reasoner select the thinking mode on the Anthropic route as on Chat."""
    url = server[0]
    fn = lambda name: {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}  # noqa: E731
    chat = dict(model="deepseek-chat", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    for extra, named in (({"tools": [fn(f"f{i}") for i in range(129)]}, "128 tools"),
                         ({"tools": [fn("x" * 65)]}, "64 characters"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
                          "json_schema"),
                         ({"response_format": {"type": "regex", "regex": "[0-9]{3}"}}, "regex")):
        status, body = post(f"{url}/chat/completions", chat | extra)
        assert status == 400 and named in body["error"]["message"]
    assert post(f"{url}/chat/completions", chat | {"tools": [fn(f"f{i}") for i in range(128)]})[0] == 200
    assert post(f"{url}/chat/completions", chat | {"tools": [fn("x" * 64)]})[0] == 200  # 64 characters: allowed
    for model, thinks in (("deepseek-chat", False), ("deepseek-reasoner", True)):
        r = claude.messages.create(model=model, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert (r.content[0].type == "thinking") == thinks, model
    assert _get(f"{url}/v1/user/balance")[0] == 200  # the /v1 alias, as for the other routes

# ---- FIM / completions / metrics ----

def test_fim_completion_stream_and_cap(client, server):
    r = client.completions.create(model="deepseek-v4-pro", prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))",
                                  max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="deepseek-v4-pro", prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))", max_tokens=6,
        temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    status, body = post(server[0] + "/beta/completions", {"model": "deepseek-v4-pro", "prompt": "x", "max_tokens": 5000})
    assert status == 422 and "max_tokens" in body["error"]["message"]


def test_metrics_are_prometheus_text(server, client):
    client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "m"}], max_tokens=1)
    with pytest.raises(urllib.error.HTTPError) as e:  # it lists every account's cost: keys configured, one needed
        urllib.request.urlopen(server[0] + "/metrics")
    assert e.value.code == 401
    req = urllib.request.Request(server[0] + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req) as r:
        text = r.read().decode()
    values = dict(line.split() for line in text.splitlines() if not line.startswith("#"))
    assert int(values["dsv4_requests_total"]) >= 1 and "dsv4_prompt_cache_hit_tokens_total" in values
    assert values["dsv4_draft_tokens_proposed_total"] == "0"  # no speculation in this server


def test_speculative_server_reports_draft_acceptance(server):
    """With MTP speculation on, /metrics counts the drafts proposed and accepted, as the engine does,
    and greedy answers are the plain engine's (speculative greedy = greedy)."""
    path = server[3]
    engine = LLMEngine(dsv4.load_model(path, dtype=torch.float32), load_tokenizer(path),
                       EngineConfig(num_speculative_tokens=2))
    llm = AsyncLLM(engine)
    chat = dict(model="deepseek-chat", max_tokens=12, temperature=0, messages=[{"role": "user", "content": "go"}])
    with serving(create_app(llm, str(path / "tokenizer.json"), ServerConfig())) as url:
        spec = post(f"{url}/chat/completions", chat)[1]["choices"][0]["message"]["content"]
        with urllib.request.urlopen(url + "/metrics") as r:
            values = dict(line.split() for line in r.read().decode().splitlines() if not line.startswith("#"))
    llm.close()
    proposed = int(values["dsv4_draft_tokens_proposed_total"])
    accepted = int(values["dsv4_draft_tokens_accepted_total"])
    assert proposed > 0 and (proposed, accepted) == (engine.stats["proposed"], engine.stats["accepted"])
    assert spec == post(f"{server[0]}/chat/completions", chat)[1]["choices"][0]["message"]["content"]


def test_dsv4_chat_streams_thinking_apart_from_the_answer(server):
    import io

    from dsv4.chat import chat_loop

    out = io.StringIO()
    rc = chat_loop(server[0], KEY, "deepseek-v4-flash", True, 6, inp=io.StringIO("hello\nagain\n\n"), out=out)
    text = out.getvalue()
    assert rc == 0 and text.count("[thinking] ") == 2  # two turns, each streamed into the thinking section
    out = io.StringIO()
    chat_loop(server[0], KEY, "deepseek-v4-flash", False, 4, inp=io.StringIO("hi\n"), out=out)
    assert "[answer] " in out.getvalue() and "[thinking]" not in out.getvalue()
    out = io.StringIO()
    chat_loop(server[0], "bad-key", "deepseek-v4-flash", False, 4, inp=io.StringIO("hi\n"), out=out)
    assert "[error] 401: Authentication Fails" in out.getvalue()  # the server's message, not just "Unauthorized"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert chat_loop(f"http://127.0.0.1:{free}", None, "m", False, 4, inp=io.StringIO("hi\n"), out=out) == 2


def test_cli_errors_for_serve_and_chat_inputs(tmp_path, server, capsys):
    """A model directory without a tokenizer (what save_model writes), an unusable cache directory, a URL
    that is not http(s): each a `dsv4: error` line with status 2, never a traceback."""
    from dsv4.cli import main

    weights = tmp_path / "weights"
    dsv4.save_model(dsv4.load_model(server[3], dtype=torch.float32), weights)
    for argv in (["serve", "--model", str(weights)], ["chat", "--model", str(weights)]):
        assert main(argv) == 2 and "no tokenizer.json" in capsys.readouterr().err
    (weights / "tokenizer.json").write_text('{"garbage": 1}')
    assert main(["serve", "--model", str(weights)]) == 2 and "not a tokenizer file" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["serve", "--model", str(server[3]), "--cache-dir", str(blocker / "x")]) == 2
    assert "prefix cache directory" in capsys.readouterr().err
    assert main(["chat", "--url", "ftp://127.0.0.1:1"]) == 2 and "--url" in capsys.readouterr().err
    assert main(["serve", "--max-concurrency", "0"]) == 2 and "--max-concurrency" in capsys.readouterr().err


def test_chat_and_reasoner_aliases_set_the_thinking_mode(client):
    chat = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "a"}],
                                          max_tokens=3)
    assert chat.choices[0].message.content and not chat.choices[0].message.model_extra.get("reasoning_content")
    reasoner = client.chat.completions.create(model="deepseek-reasoner", messages=[{"role": "user", "content": "a"}],
                                              max_tokens=3)
    assert reasoner.choices[0].message.model_extra.get("reasoning_content")


@pytest.mark.parametrize("thinking", ["disabled", "enabled"])
@pytest.mark.parametrize("max_tokens", [2, 12, 60])
def test_json_mode_always_returns_a_json_object(client, thinking, max_tokens):
    """Even a random model, even when max_tokens runs out, answers with a parseable JSON object; the
    reasoning is closed in time for it. A budget no object fits in is a 400 (it was an empty answer)."""
    for seed in range(3):
        r = client.chat.completions.create(
            model="deepseek-v4-flash", messages=[{"role": "user", "content": "Give me a JSON object."}],
            response_format={"type": "json_object"}, max_tokens=max_tokens, seed=seed,
            extra_body={"thinking": {"type": thinking}})
        assert isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0].message
    from openai import BadRequestError
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
    with pytest.raises(BadRequestError, match="too small for the tool call"):  # it was cut: arguments ''
        client.chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "pick"}],
                                       tools=[tool], tool_choice="required", max_tokens=10,
                                       extra_body={"thinking": {"type": "disabled"}})
    with pytest.raises(BadRequestError, match="too small for a JSON answer"):
        client.chat.completions.create(
            model="deepseek-v4-flash", messages=[{"role": "user", "content": "Give me a JSON object."}],
            response_format={"type": "json_object"}, max_tokens=1, extra_body={"thinking": {"type": "enabled"}})


def test_usage_and_cost_totals_per_key(client, server):
    def mine():
        req = urllib.request.Request(server[0] + "/usage", headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read())

    before = mine()
    r = client.chat.completions.create(model="deepseek-v4-pro", messages=[{"role": "user", "content": "bill me"}],
                                       max_tokens=3, extra_body={"thinking": {"type": "disabled"}})
    after = mine()
    u = r.usage
    hit = u.model_extra["prompt_cache_hit_tokens"]
    want = (hit * 0.003625 + (u.prompt_tokens - hit) * 0.435 + u.completion_tokens * 0.87) / 1e6
    assert after["requests"] == before["requests"] + 1
    assert abs((after["cost_usd"] - before["cost_usd"]) - want) < 1e-12
    assert KEY not in json.dumps(after)  # accounts are hashes, never the key


@pytest.mark.parametrize("route", ["chat", "fim"])
def test_a_repeated_prompt_is_billed_at_the_cache_hit_price(client, route):
    """api.md sections 9 and 12: a repeated prompt hits the context cache; usage reports prompt_tokens = hit + miss,
    and /usage bills the hits at the cache-hit price and the rest at the miss price (v4-pro: $0.003625 hit,
    $0.435 miss, $0.87 output per 1M tokens) and counts the hits in its prompt_cache_hit_tokens."""
    if route == "chat":
        def ask():
            return client.chat.completions.create(
                model="deepseek-v4-pro", max_tokens=2, extra_body={"thinking": {"type": "disabled"}},
                messages=[{"role": "system", "content": "bill " * 150}, {"role": "user", "content": "twice"}]).usage
    else:
        def ask():
            return client.completions.create(model="deepseek-v4-pro", prompt="def bill(x):\n" + "    x += 1\n" * 40,
                                             suffix="\n", max_tokens=2).usage
    ask()
    before = client.get("/usage", cast_to=object)
    u = ask()
    after = client.get("/usage", cast_to=object)
    hit, miss = u.model_extra["prompt_cache_hit_tokens"], u.model_extra["prompt_cache_miss_tokens"]
    assert hit >= 64 and miss == u.prompt_tokens - hit and u.prompt_tokens_details.cached_tokens == hit
    counts = ("requests", "prompt_tokens", "prompt_cache_hit_tokens", "completion_tokens")
    assert {k: after[k] - before[k] for k in counts} == dict(zip(counts, (1, u.prompt_tokens, hit,
                                                                          u.completion_tokens)))
    want = (hit * 0.003625 + (u.prompt_tokens - hit) * 0.435 + u.completion_tokens * 0.87) / 1e6
    assert after["cost_usd"] - before["cost_usd"] == pytest.approx(want, rel=1e-9)


def test_64_concurrent_streams_complete_or_get_429_and_health_stays_fast(server):
    """Load on loopback: 64 streaming requests at once against a 4-slot server; health latency under load."""
    import concurrent.futures

    url = server[0] + "/chat/completions"
    body = json.dumps({"model": "deepseek-chat", "messages": [{"role": "user", "content": "load"}], "max_tokens": 8,
                       "stream": True}).encode()

    def one(_):
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json",
                                                              "Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                text = r.read().decode()
                return r.status if text.rstrip().endswith("data: [DONE]") else -1
        except urllib.error.HTTPError as e:
            return e.code

    latencies = []

    def health_probe():
        for _ in range(20):
            t = time.perf_counter()
            with urllib.request.urlopen(server[0] + "/health", timeout=30) as r:
                assert r.status == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.02)

    with concurrent.futures.ThreadPoolExecutor(max_workers=65) as pool:
        probe = pool.submit(health_probe)
        codes = list(pool.map(one, range(64)))
        probe.result()
    assert set(codes) <= {200, 429} and codes.count(200) >= 1 and codes.count(429) >= 1
    p99 = sorted(latencies)[int(0.99 * (len(latencies) - 1))]
    print(f"\n64 streams: {codes.count(200)} completed, {codes.count(429)} got 429; health p99 {p99 * 1000:.1f} ms")
    assert p99 < 2.0


def test_context_overflow_is_explained(server):
    url = server[0] + "/chat/completions"
    status, body = post(url, {"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}],
                              "max_tokens": 200_000})
    assert status == 400 and "context" in body["error"]["message"].lower(), body
    status, body = post(url, {"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}],
                              "temperature": "hot"})
    assert status in (400, 422) and body["error"]["type"] == "invalid_request_error"


def _fuzz_strategies():
    from hypothesis import strategies as st

    leaf = st.none() | st.booleans() | st.integers(-10**7, 10**7) | st.floats(allow_nan=False) | st.text(max_size=20)
    value = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                         max_leaves=8)
    role = st.sampled_from(["system", "user", "assistant", "tool", "developer", "function", "", None])
    message = st.fixed_dictionaries({"role": role}, optional={"content": value | st.text(max_size=30),
                                                              "tool_calls": value, "reasoning_content": value,
                                                              "tool_call_id": value, "prefix": value})
    chat = st.fixed_dictionaries(
        {"model": st.sampled_from(["deepseek-chat", "deepseek-v4-flash", "x", 3])},
        optional={"messages": st.lists(message, max_size=3) | value, "max_tokens": value | st.integers(-5, 20),
                  "temperature": value, "top_p": value, "stream": st.booleans() | value, "tools": value,
                  "tool_choice": value, "response_format": value, "thinking": value, "reasoning_effort": value,
                  "stop": value, "logprobs": value, "top_logprobs": value, "stream_options": value,
                  "frequency_penalty": value, "presence_penalty": value, "seed": value})
    messages = st.fixed_dictionaries(
        {"model": st.sampled_from(["claude-sonnet-4-6", "deepseek-v4-flash", 7])},
        optional={"messages": st.lists(message, max_size=3) | value, "max_tokens": value | st.integers(-5, 20),
                  "system": value, "thinking": value, "tools": value, "tool_choice": value,
                  "stop_sequences": value, "stream": st.booleans(), "output_config": value})
    fim = st.fixed_dictionaries({"model": st.sampled_from(["deepseek-v4-pro", "nope"])},
                                optional={"prompt": value | st.text(max_size=30), "suffix": value,
                                          "max_tokens": value | st.integers(-5, 20), "stream": st.booleans(),
                                          "temperature": value, "stop": value, "logprobs": value, "echo": value,
                                          "seed": value, "stream_options": value, "top_p": value})
    return st.one_of(st.tuples(st.just("/chat/completions"), chat),
                     st.tuples(st.just("/anthropic/v1/messages"), messages),
                     st.tuples(st.just("/beta/completions"), fim))


def test_fuzzed_requests_never_get_a_5xx(server):
    """Hypothesis-generated bodies (valid, half-valid and junk) across the three endpoints: always < 500."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=_fuzz_strategies())
    def check(case):
        path, body = case
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 20:
            body["max_tokens"] = 20
        req = urllib.request.Request(server[0] + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "x-api-key": KEY})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status = r.status
                r.read()
        except urllib.error.HTTPError as e:
            status = e.code
            e.read()
        assert status < 500, (path, body, status)

    check()



def _suite():
    import deepseek_recipe as dr

    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    td = dr.ToolDefinition("get_weather", "Weather for a city", {"type": "object", "properties": {"city": {"type": "string"}}})
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    tc = dr.ToolCall("c1", "get_weather", '{"city": "Paris"}')
    return [
        ("system + user, no thinking",
         {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
          "thinking": {"type": "disabled"}},
         dr.Conversation([dr.SystemMessage("Be brief."), dr.UserMessage("Hi")], thinking_mode=False)),
        ("multi-turn thinking, effort max",
         {"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                       {"role": "user", "content": "C"}], "reasoning_effort": "max"},
         dr.Conversation([dr.UserMessage("A"), dr.AssistantMessage("B"), dr.UserMessage("C")],
                         reasoning_effort="max")),
        ("tools, tool call with passback, tool result",
         {"messages": [{"role": "user", "content": "weather?"},
                       {"role": "assistant", "content": "", "reasoning_content": "use the tool", "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], "tools": [tool]},
         dr.Conversation([dr.UserMessage("weather?"), dr.AssistantMessage("", "use the tool", [tc]),
                          dr.ToolMessage("sunny", "c1")], tools=[td])),
        ("tool_choice none keeps tools out",
         {"messages": [{"role": "user", "content": "hi"}], "tools": [tool], "tool_choice": "none",
          "thinking": {"type": "disabled"}},
         dr.Conversation([dr.UserMessage("hi")], thinking_mode=False)),
        ("latest_reminder",
         {"messages": [{"role": "user", "content": "hi"}, {"role": "latest_reminder", "content": "Today is Friday."}],
          "thinking": {"type": "disabled"}},
         dr.Conversation([dr.UserMessage("hi"), dr.LatestReminderMessage("Today is Friday.")], thinking_mode=False)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_prompt_equals_deepseek_recipe_rendering(server, case):
    import deepseek_recipe as dr

    name, body, conversation = _suite()[case]
    status, _ = post(server[0] + "/chat/completions", {"model": "deepseek-v4-flash", "max_tokens": 1, **body})
    assert status == 200, name
    tok = dr.Tokenizer.from_file(str(server[3] / "tokenizer.json"))
    want = dr.DeepseekV4Encoding().with_tokenizer(tok).encode(conversation)
    assert server[2].state.last_prompt_ids == want, name


LIGHT = {"type": "function", "function": {
    "name": "set_light", "description": "Switch a light",
    "parameters": {"type": "object", "properties": {"on": {"type": "boolean"},
                                                    "room": {"type": "string", "enum": ["kitchen", "hall"]}},
                   "required": ["on", "room"], "additionalProperties": False}}}


def test_tool_choice_required_is_refused_in_thinking_mode(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="tool_choice"):  # DeepSeek's rule, via deepseek-recipe
        client.chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "x"}],
                                       tools=[LIGHT], tool_choice="required", max_tokens=4)


@pytest.mark.parametrize("thinking", ["disabled"])
def test_tool_round_trip_with_forced_call(client, thinking):
    """tool_choice=required makes the engine decode a DSML call under the tool's schema (constrained
    decoding through the real engine); the SDK gets a parsed call; the result goes back; an answer comes."""
    messages = [{"role": "user", "content": "Turn on the kitchen light."}]
    extra = {"thinking": {"type": thinking}}
    r = client.chat.completions.create(model="deepseek-v4-flash", messages=messages, tools=[LIGHT],
                                       tool_choice="required", max_tokens=400, extra_body=extra)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "set_light" and isinstance(args["on"], bool) and args["room"] in ("kitchen", "hall")
    assistant = {"role": "assistant", "content": choice.message.content or "", "tool_calls": [call.model_dump()]}
    if thinking == "enabled":
        assistant["reasoning_content"] = choice.message.model_extra.get("reasoning_content") or ""
    messages += [assistant, {"role": "tool", "tool_call_id": call.id, "content": "done"}]
    final = client.chat.completions.create(model="deepseek-v4-flash", messages=messages, tools=[LIGHT],
                                           max_tokens=4, extra_body=extra)
    assert final.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_named_tool_choice_streams_the_same_call(client):
    kw = dict(model="deepseek-v4-flash", messages=[{"role": "user", "content": "hall light off"}], tools=[LIGHT],
              tool_choice={"type": "function", "function": {"name": "set_light"}}, max_tokens=400, seed=3,
              extra_body={"thinking": {"type": "disabled"}})
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0].function
    name, args = "", ""
    for c in client.chat.completions.create(stream=True, **kw):
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            name += tc.function.name or ""
            args += tc.function.arguments or ""
    assert name == whole.name == "set_light" and json.loads(args) == json.loads(whole.arguments)


def test_reasoning_effort_and_anthropic_effort_reach_the_prompt(client, claude, server):
    client.chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "e"}],
                                   max_tokens=1, reasoning_effort="high")
    high = list(server[2].state.last_prompt_ids)
    client.chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "e"}],
                                   max_tokens=1, reasoning_effort="max")
    assert server[2].state.last_prompt_ids != high  # effort max adds its instruction
    claude.messages.create(model="deepseek-v4-flash", max_tokens=1, messages=[{"role": "user", "content": "e"}],
                           extra_body={"output_config": {"effort": "max"}})
    assert len(server[2].state.last_prompt_ids) > len(high)


def test_strict_tool_schema_is_enforced(client):
    strict = json.loads(json.dumps(LIGHT))
    strict["function"]["strict"] = True
    r = client.chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "hall on"}],
                                       tools=[strict], tool_choice="required", max_tokens=400,
                                       extra_body={"thinking": {"type": "disabled"}})
    args = json.loads(r.choices[0].message.tool_calls[0].function.arguments)
    assert set(args) == {"on", "room"} and args["room"] in ("kitchen", "hall")


def test_chat_prefix_completion_continues_the_assistant_message(client, server):
    from openai import OpenAI

    beta = OpenAI(base_url=server[0] + "/beta", api_key=KEY, max_retries=0)
    r = beta.chat.completions.create(
        model="deepseek-v4-flash", max_tokens=3, extra_body={"thinking": {"type": "disabled"}},
        messages=[{"role": "user", "content": "Write code"}, {"role": "assistant", "content": "```python\n",
                                                              "prefix": True}])
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert server[2].state.last_prompt_ids[-1] != 1  # the prefix is continued, not closed with EOS


def test_stop_sequence_ends_the_answer(client):
    kw = dict(model="deepseek-chat", messages=[{"role": "user", "content": "stop test"}], temperature=0,
              max_tokens=12)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full[3:5]
    r = client.chat.completions.create(stop=[stop], **kw)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == full[:full.find(stop)]


def test_engine_failure_is_a_500_without_traceback(server, client, monkeypatch):
    from openai import InternalServerError

    eng = server[1].engine

    def boom():
        raise RuntimeError("simulated device failure")
    monkeypatch.setattr(eng, "step", boom)
    with pytest.raises(InternalServerError) as e:
        client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert "Traceback" not in str(e.value) and e.value.status_code == 500


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("path", ["/chat/completions", "/beta/completions"])
def test_a_request_the_engine_aborts_is_a_failure_not_a_stop(server, monkeypatch, path, stream):
    """A request the engine aborts part-way (finish_reason "abort", e.g. at shutdown) did not finish: it is a 500,
    streamed an error event without [DONE], never a 200 whose cut-off text ends with finish_reason "stop"."""
    llm = server[1]
    seqs, aborted, submit, step = [], set(), llm.submit, llm.engine.step

    def recording(*args, **kw):
        seq, queue = submit(*args, **kw)
        seqs.append(seq)
        return seq, queue

    def step_then_abort():  # once a request has written two tokens, the engine aborts it
        out = step()
        for seq in seqs:
            if len(seq.output_ids) >= 2 and seq.request_id not in aborted:
                aborted.add(seq.request_id)
                llm.abort(seq.request_id)
        return out
    monkeypatch.setattr(llm, "submit", recording)
    monkeypatch.setattr(llm.engine, "step", step_then_abort)
    body = {"model": "deepseek-chat", "max_tokens": 50, "stream": stream} | (
        {"prompt": "def f(x):"} if path == "/beta/completions" else {"messages": [{"role": "user", "content": "x"}]})
    if not stream:
        status, answer = post(server[0] + path, body)
        assert status == 500 and answer["error"]["type"] == "internal_error", answer
    else:
        lines = _stream_lines(server[0] + path, body)
        assert lines[-1] != "data: [DONE]", lines[-3:]
        *chunks, last = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]
        assert last["error"]["type"] == "internal_error" and "abort" in last["error"]["message"]
        assert not any(c.get("finish_reason") for chunk in chunks for c in chunk["choices"])
    assert len(aborted) == 1 and seqs[0].finish_reason == "abort"


def test_keepalive_is_sent_while_waiting():
    import asyncio

    from dsv4.server.app import _with_keepalive

    async def slow():
        await asyncio.sleep(0.35)
        yield "token"

    async def run():
        return [x async for x in _with_keepalive(slow(), 0.1)]

    out = asyncio.run(run())
    assert out[-1] == "token" and out.count(None) >= 2


@pytest.fixture
def gated(server, monkeypatch):
    """(url, app, gate, fail) of a second app on the test engine, with keep-alive intervals of 0.05 s: the engine's
    steps wait until `gate` is set (the requests wait, as queued ones do), then fail if `fail` holds a message."""
    import threading

    _, llm, _, path = server
    gate, fail, step = threading.Event(), [], llm.engine.step

    def gated_step():
        gate.wait(60)
        if fail:
            raise RuntimeError(fail[0])
        return step()
    monkeypatch.setattr(llm.engine, "step", gated_step)
    app = create_app(llm, str(path / "tokenizer.json"), ServerConfig(api_keys=[KEY], keepalive_seconds=0.05))
    try:
        with serving(app) as url:
            yield url, app, gate, fail
    finally:
        fail.clear()
        gate.set()


def _while_waiting(app, calls: dict, gate) -> dict:
    """Run `calls` (name -> function) in threads until each request waits in the engine for a while, then open
    `gate`; -> name -> what it returned or raised."""
    import threading

    out = {}

    def run(name, call):
        try:
            out[name] = call()
        except Exception as e:  # the test looks at what was raised
            out[name] = e
    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while app.state.stats["active"] < len(calls) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # ten keep-alive intervals
    gate.set()
    for t in threads:
        t.join(60)
    return out


def test_a_waiting_non_streamed_request_gets_blank_lines_then_its_json(gated):
    """api.md sections 4 and 11: while a request waits, DeepSeek sends a non-streamed one blank lines (a stream
    gets `: keep-alive`); the SDKs skip them and parse the JSON. The non-streamed ones got nothing at all."""
    from anthropic import Anthropic
    from openai import OpenAI

    url, app, gate, _ = gated
    oai = OpenAI(base_url=url, api_key=KEY, max_retries=0)
    beta = OpenAI(base_url=url + "/beta", api_key=KEY, max_retries=0)
    claude = Anthropic(base_url=url + "/anthropic", api_key=KEY, max_retries=0)
    ask = [{"role": "user", "content": "hi"}]
    out = _while_waiting(app, {
        "chat": lambda: oai.chat.completions.with_raw_response.create(model="deepseek-chat", messages=ask,
                                                                      max_tokens=3),
        "fim": lambda: beta.completions.with_raw_response.create(model="deepseek-v4-pro", prompt="x", max_tokens=3),
        "messages": lambda: claude.messages.with_raw_response.create(model="deepseek-chat", messages=ask,
                                                                     max_tokens=3),
    }, gate)
    for name, raw in out.items():
        assert not isinstance(raw, Exception), (name, raw)
        text = raw.http_response.text
        assert raw.http_response.status_code == 200 and text.startswith("\n\n"), (name, text[:40])
        assert text.lstrip("\n").startswith("{") and json.loads(text)
    chat, fim, message = (out[k].parse() for k in ("chat", "fim", "messages"))
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 3
    assert fim.object == "text_completion" and fim.usage.completion_tokens == 3
    assert message.type == "message" and message.usage.output_tokens == 3
    assert app.state.stats["active"] == 0


def test_a_failure_after_the_blank_lines_cuts_the_response(gated):
    """Once a blank line is sent the status is 200: an engine failure after it ends the body with the error
    object and closes the connection mid-response, so that no client takes it for an answer. The SDKs raise a
    connection error (they retry it as a 500); a raw client sees the error and an incomplete read."""
    import http.client

    import anthropic
    import openai

    url, app, gate, fail = gated
    fail.append("simulated device failure")
    errors = app.state.stats["errors"]

    def raw():
        req = urllib.request.Request(url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                                     data=json.dumps({"model": "deepseek-chat", "max_tokens": 3, "messages": [
                                         {"role": "user", "content": "hi"}]}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    ask = {"model": "deepseek-chat", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    out = _while_waiting(app, {
        "raw": raw,
        "openai": lambda: openai.OpenAI(base_url=url, api_key=KEY, max_retries=0).chat.completions.create(**ask),
        "anthropic": lambda: anthropic.Anthropic(base_url=url + "/anthropic", api_key=KEY,
                                                 max_retries=0).messages.create(**ask),
    }, gate)
    assert isinstance(out["raw"], http.client.IncompleteRead), out["raw"]
    body = out["raw"].partial.decode()
    assert body.startswith("\n") and json.loads(body)["error"]["type"] == "internal_error"
    assert isinstance(out["openai"], openai.APIConnectionError), out["openai"]
    assert isinstance(out["anthropic"], anthropic.APIConnectionError), out["anthropic"]
    assert app.state.stats["errors"] == errors + 3 and app.state.stats["active"] == 0


def test_the_concurrency_limit_admits_that_many_then_429_with_retry_after(gated, server):
    """max_concurrency 4: four requests run at once (streams the engine holds), the fifth gets 429 with Retry-After
    (api.md section 11), and once they end a request is admitted again."""
    import threading

    _, llm, _, path = server
    gate = gated[2]
    app = create_app(llm, str(path / "tokenizer.json"), ServerConfig(api_keys=[KEY], max_concurrency=4,
                                                                      keepalive_seconds=0.05))
    ask = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "wait"}], "max_tokens": 2, "stream": True}
    with serving(app) as url:
        done = []
        threads = [threading.Thread(target=lambda: done.append(_stream_lines(url + "/chat/completions", ask)[-1]))
                   for _ in range(4)]
        try:
            for t in threads:
                t.start()
            deadline = time.time() + 60
            while app.state.stats["active"] < 4 and time.time() < deadline:
                time.sleep(0.02)
            assert app.state.stats["active"] == 4
            req = urllib.request.Request(url + "/chat/completions", data=json.dumps(ask).encode(), headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30).close()
            assert e.value.code == 429 and e.value.headers["Retry-After"] == "1"
            assert json.loads(e.value.read())["error"]["type"] == "rate_limit_error"
        finally:
            gate.set()
            for t in threads:
                t.join(60)
        assert done == ["data: [DONE]"] * 4
        while app.state.stats["active"] and time.time() < deadline:
            time.sleep(0.02)
        assert post(url + "/chat/completions", ask | {"stream": False})[0] == 200


def test_a_client_leaving_during_the_blank_lines_cancels_its_request(gated, server, monkeypatch):
    """As a closed connection cancels a request that has not waited (test_closed_connection_cancels_...)."""
    url, app, gate, _ = gated
    llm, seqs = server[1], []
    submit = llm.submit

    def recording(*args, **kw):
        seq, queue = submit(*args, **kw)
        seqs.append(seq)
        return seq, queue
    monkeypatch.setattr(llm, "submit", recording)
    body = json.dumps({"model": "deepseek-chat", "messages": [{"role": "user", "content": "go"}],
                       "max_tokens": 3000}).encode()
    head = (f"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    with _raw(url, head, body) as sock:
        got = b""
        while b"\r\n\r\n1\r\n\n\r\n" not in got:  # the headers, then the first blank line's chunk
            got += sock.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
    deadline = time.time() + 30
    while app.state.stats["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert app.state.stats["active"] == 0  # released while the engine still waits
    gate.set()
    while (llm.engine.running or llm.engine.waiting) and time.time() < deadline:
        time.sleep(0.05)
    assert not llm.engine.running and not llm.engine.waiting
    assert seqs[0].finish_reason == "abort" and len(seqs[0].output_ids) < 3000
    assert app.state.stats["errors"] == 0


def test_a_quick_non_streamed_answer_is_plain_json(client):
    """A request that never waited a keep-alive interval: no blank lines, its length known (and its status, had
    it failed: see test_engine_failure_is_a_500_without_traceback)."""
    raw = client.chat.completions.with_raw_response.create(model="deepseek-chat", max_tokens=2,
                                                           messages=[{"role": "user", "content": "hi"}])
    assert raw.http_response.text.startswith("{") and raw.http_response.headers["content-length"]


def test_request_beyond_the_decode_state_budget_is_503(server, client):
    """Chat and FIM alike (FIM used to answer 500)."""
    from openai import InternalServerError

    eng = server[1].engine
    budget = eng.cfg.kv_budget_bytes
    eng.cfg.kv_budget_bytes = 1000  # smaller than any sequence's state
    try:
        with pytest.raises(InternalServerError) as e:
            client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "x"}],
                                           max_tokens=2)
        assert e.value.status_code == 503 and "overloaded" in str(e.value).lower()
        status, body = post(f"{server[0]}/beta/completions", {"model": "deepseek-v4-flash", "prompt": "x",
                                                              "max_tokens": 2})
        assert status == 503 and "overloaded" in body["error"]["message"].lower()
        # streamed: the 503 comes before the stream starts (it used to be a 200, then an error event)
        for path in ("/chat/completions", "/v1/messages"):
            status, body = post(f"{server[0]}{path}", {"model": "deepseek-chat", "max_tokens": 2, "stream": True,
                                                       "messages": [{"role": "user", "content": "x"}]})
            assert status == 503, path
        # with Retry-After, which the SDKs' retries wait for (kept in Anthropic's error shape too)
        req = urllib.request.Request(f"{server[0]}/v1/messages", headers={"x-api-key": KEY}, data=json.dumps(
            {"model": "deepseek-chat", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.headers["Retry-After"] == "1" and json.loads(e.value.read())["error"]["type"] == "overloaded_error"
    finally:
        eng.cfg.kv_budget_bytes = budget


def test_thinking_mode_ignores_temperature(server, client, monkeypatch):
    """As DeepSeek's API: in thinking mode `temperature` has no effect (sampling at 1.0); without, it applies."""
    _, llm, _, _ = server
    seen, submit = [], llm.submit

    def recording(ids, params, **kw):
        seen.append(params.temperature)
        return submit(ids, params, **kw)

    monkeypatch.setattr(llm, "submit", recording)
    for model in ("deepseek-reasoner", "deepseek-chat"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                       max_tokens=8)
    assert seen == [1.0, 0.0]


def _stream_lines(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return [line.decode().strip() for line in r if line.strip()]


def test_bad_fim_parameters_are_4xx_and_leave_other_requests_running(server):
    """A bool where an integer belongs, a non-object stream_options, a bad seed, an unencodable prompt,
    a temperature over 2 and 17 stop strings: each a 4xx for its own request, while a stream runs."""
    import threading

    url = server[0] + "/beta/completions"
    lines = []
    runner = threading.Thread(target=lambda: lines.extend(_stream_lines(server[0] + "/chat/completions", {
        "model": "deepseek-chat", "messages": [{"role": "user", "content": "long"}], "max_tokens": 200,
        "stream": True})))
    runner.start()
    base = {"model": "deepseek-v4-pro", "prompt": "x", "max_tokens": 2}
    for bad in ({"logprobs": True}, {"max_tokens": True}, {"stream_options": "x", "stream": True},
                {"stream_options": {"include_usage": True}}, {"seed": "x"}, {"seed": 1.5}, {"seed": 2**70},
                {"temperature": 2.5}, {"stop": ["s"] * 17}, {"echo": "yes"}, {"echo": True, "logprobs": 1}):
        status, body = post(url, {**base, **bad})
        assert status == 422 and "parameter" in body["error"]["message"], (bad, status, body)
    status, body = post(url, None, raw=b'{"model": "deepseek-v4-pro", "prompt": "\\ud800", "max_tokens": 2}')
    assert status == 400 and "Unicode" in body["error"]["message"]
    runner.join()
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1] if line.startswith("data: ")]
    assert events and not any("error" in e for e in events)  # the model's text may say "error"; no event is one


def test_fim_logprobs_and_echo(client):
    kw = dict(model="deepseek-v4-pro", prompt="def add(a, b):", suffix="\n    return c", max_tokens=6, temperature=0)
    r = client.completions.create(logprobs=3, **kw)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the chosen token is the best one
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r.choices[0].logprobs is not None and client.completions.create(**kw).choices[0].logprobs is None
    echoed = client.completions.create(echo=True, **kw).choices[0].text
    assert echoed == kw["prompt"] + r.choices[0].text
    first = [c.choices[0].text for c in client.completions.create(echo=True, stream=True, **kw) if c.choices][0]
    assert first.startswith(kw["prompt"])


def test_fim_logprobs_always_include_the_sampled_token(client):
    """DeepSeek's FIM reference (api.md section 8, D12): "The API will always return the logprob of the sampled
    token, so there may be up to logprobs+1 elements". Sampled at temperature 2, the token is often not among
    the best N, and it was left out."""
    kw = dict(model="deepseek-v4-pro", prompt="def f(x):", suffix="\n", max_tokens=8, temperature=2, seed=0)
    outside = 0
    for n in (0, 1, 3):
        lp = client.completions.create(logprobs=n, **kw).choices[0].logprobs
        assert len(lp.tokens) == len(lp.top_logprobs) == 8
        for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert top[token] == chosen and len(top) <= n + 1
            best = sorted(top.values(), reverse=True)
            outside += len(top) == n + 1
            assert chosen in best[:n] or (len(top) == n + 1 and chosen == best[-1])  # the N best, then it
    assert outside >= 8  # logprobs=0 alone: every position holds just the sampled token


def test_fim_nulls_mean_the_defaults(server):
    """DeepSeek's FIM reference (api.md section 8, D12) documents echo, max_tokens, temperature, top_p, stream,
    logprobs, frequency/presence_penalty, stop, suffix and stream_options as nullable: null is the default, as
    on the chat route (most of them were a 422)."""
    url = server[0] + "/beta/completions"
    base = {"model": "deepseek-v4-pro", "prompt": "def f(x):", "max_tokens": 4, "temperature": 0}
    status, ref = post(url, base)
    assert status == 200
    for name in ("echo", "top_p", "stream", "logprobs", "presence_penalty", "frequency_penalty", "stop", "suffix",
                 "stream_options", "seed", "user_id"):
        status, body = post(url, base | {name: None})
        assert status == 200 and body["choices"][0]["text"] == ref["choices"][0]["text"], (name, body)
        assert body["choices"][0]["logprobs"] is None
    status, body = post(url, base | {"max_tokens": None})  # 16
    assert status == 200
    assert body["usage"]["completion_tokens"] == 16 or body["choices"][0]["finish_reason"] == "stop"
    status, body = post(url, base | {"temperature": None})  # 1
    assert status == 200 and body["usage"]["completion_tokens"] <= 4


def test_fim_stream_usage_comes_in_a_last_chunk_without_choices(server, client):
    """DeepSeek's FIM reference (D12, stream_options.include_usage): "an additional chunk will be streamed before
    the data: [DONE] message ... the choices field will always be an empty array. All other chunks will also
    include a usage field, but with a null value". The usage rode on the finish chunk, the others had none."""
    kw = {"model": "deepseek-v4-pro", "prompt": "def f(x):", "suffix": "\n", "max_tokens": 3, "stream": True}
    lines = _stream_lines(server[0] + "/beta/completions", kw | {"stream_options": {"include_usage": True}})
    assert lines[-1] == "data: [DONE]"
    *chunks, last = [json.loads(line[len("data: "):]) for line in lines[:-1] if line.startswith("data: ")]
    assert chunks and all(len(c["choices"]) == 1 and "usage" in c and c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert last["choices"] == [] and last["object"] == "text_completion" and last["id"] == chunks[0]["id"]
    assert last["usage"]["completion_tokens"] == 3
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 3
    streamed = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                              **{k: v for k, v in kw.items() if k != "stream"}))
    assert [c.usage is not None for c in streamed] == [False] * (len(streamed) - 1) + [True]
    assert not any("usage" in line for line in _stream_lines(server[0] + "/beta/completions", kw))  # not asked


def test_fim_prompt_text_spelling_a_special_token_stays_text(client, server):
    """Only the FIM markers the server places are special: user code that contains a marker's spelling is
    encoded as characters (it used to become an end-of-sentence token)."""
    tok = load_tokenizer(server[3])
    eos = "<｜end▁of▁sentence｜>"
    r = client.completions.create(model="deepseek-v4-pro", prompt="x" + eos, suffix="y", max_tokens=1)
    tok.encode_special_tokens = True
    as_text = len(tok.encode("x" + eos).ids) + len(tok.encode("y").ids)
    assert as_text > 2 and r.usage.prompt_tokens == as_text + 4  # BOS and the three FIM markers


TOOL_SCHEMAS = {  # (strict, properties, more of the parameters' schema, check of the value)
    "ref": (True, {"a": {"$ref": "#/$defs/word"}}, {"$defs": {"word": {"type": "string", "enum": ["red", "blue"]}}},
            lambda v: v in ("red", "blue")),
    "ref_not_strict": (False, {"a": {"$ref": "#/$defs/n"}}, {"$defs": {"n": {"type": "integer", "minimum": 3}}},
                       lambda v: isinstance(v, int) and v >= 3),
    "pattern": (True, {"a": {"type": "string", "pattern": "[a-z]{3}"}}, {}, lambda v: re.fullmatch("[a-z]{3}", v)),
    "format": (True, {"a": {"type": "string", "format": "uuid"}}, {}, lambda v: str(uuid.UUID(v)) == v.lower()),
    "mixed_enum": (False, {"a": {"type": "string", "enum": ["x", 1]}}, {}, lambda v: v == "x"),
    "true_schema": (False, {"a": True}, {}, lambda v: True),
}


@pytest.mark.parametrize("kind", sorted(TOOL_SCHEMAS))
def test_strict_tool_schemas_with_refs_patterns_formats_and_enums(client, kind):
    strict, props, extra, ok = TOOL_SCHEMAS[kind]
    tool = {"type": "function", "function": {"name": "pick", "strict": strict, "parameters": {
        "type": "object", "properties": props, "required": ["a"], "additionalProperties": False, **extra}}}
    r = client.chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "pick"}],
                                       tools=[tool], tool_choice="required", max_tokens=200,
                                       extra_body={"thinking": {"type": "disabled"}})
    call = r.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "pick" and set(args) == {"a"} and ok(args["a"]), args


def test_tool_schema_the_grammar_cannot_follow_is_a_400_naming_it(server, claude):
    import anthropic

    url = server[0] + "/chat/completions"
    for props in ({"a": False}, {"a": {"$ref": "#/$defs/missing"}}, {"a": {"type": "integer", "minimum": "x"}}):
        tool = {"type": "function", "function": {"name": "pick", "parameters": {
            "type": "object", "properties": props, "required": ["a"]}}}
        status, body = post(url, {"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}],
                                  "tools": [tool], "tool_choice": "required"})
        assert status == 400 and "'pick'" in body["error"]["message"], (props, body)  # the recipe's or ours
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="deepseek-v4-flash", max_tokens=20, messages=[{"role": "user", "content": "x"}],
                               tools=[{"name": "pick", "input_schema": {"type": "object", "required": ["a"],
                                                                        "properties": {"a": False}}}],
                               tool_choice={"type": "any"}, thinking={"type": "disabled"})
    assert "'pick' parameter 'a'" in str(e.value) and e.value.body["type"] == "error"


def test_stop_strings_end_the_answer_not_the_reasoning(client):
    """Thinking mode: a stop string that occurs in the reasoning does not cut it (the dev model never
    closes its thinking, so the whole budget is reasoning)."""
    kw = dict(model="deepseek-v4-flash", messages=[{"role": "user", "content": "hi"}], max_tokens=40, seed=7)
    free = client.chat.completions.create(**kw)
    reasoning = free.choices[0].message.model_extra["reasoning_content"]
    stop = reasoning.strip()[:2]
    assert stop
    r = client.chat.completions.create(stop=[stop], **kw)
    assert r.choices[0].message.model_extra["reasoning_content"] == reasoning
    assert r.choices[0].finish_reason == "length"


def test_billed_completion_tokens_equal_the_reported_ones(client):
    """JSON mode ends with the end-of-sequence token: it is the finish, neither reported nor billed."""
    usage = client.get("/usage", cast_to=object)
    r = client.chat.completions.create(
        model="deepseek-chat", response_format={"type": "json_object"}, max_tokens=30, temperature=0,
        messages=[{"role": "user", "content": "json"}])
    after = client.get("/usage", cast_to=object)
    assert r.choices[0].finish_reason == "stop"
    assert after["completion_tokens"] - usage["completion_tokens"] == r.usage.completion_tokens


# ---- what a model writes: the server, engine and parser are real, only the model's choice of tokens is set ----

class _Writes:
    """Stands in for a request's output constraint: the model writes `script` (token ids) as a model bent on it
    would, while the request's own constraint, if any, still has the last word on each token; once the output
    leaves the script (the constraint forbade its next token), the model samples as before."""

    def __init__(self, script: list, constraint):
        self.script, self.constraint, self.at = script, constraint, 0

    def mask(self, logits, remaining):
        if self.at < len(self.script):
            logits = logits.clone()
            logits[self.script[self.at]] = 1e4
        return logits if self.constraint is None else self.constraint.mask(logits, remaining)

    def accept(self, token):
        on_script = self.at < len(self.script) and token == self.script[self.at]
        self.at = self.at + 1 if on_script else len(self.script)
        if self.constraint is not None:
            self.constraint.accept(token)


@pytest.fixture
def model_writes(server, monkeypatch):
    """model_writes(text or token ids): what the model of the requests that follow writes."""
    llm = server[1]
    submit = llm.submit

    def writes(script):
        ids = llm.engine.tokenizer.encode(script).ids if isinstance(script, str) else list(script)
        monkeypatch.setattr(llm, "submit", lambda prompt, params, constraint=None, **kw: submit(
            prompt, params, constraint=_Writes(ids, constraint), **kw))
    return writes


def _chat_reply(client, stream: bool, **kw):
    """(content, [(tool name, arguments)], finish_reason, completion_tokens) of a chat completion."""
    if not stream:
        r = client.chat.completions.create(**kw)
        c = r.choices[0]
        calls = [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls or []]
        return c.message.content or "", calls, c.finish_reason, r.usage.completion_tokens
    content, calls, finish, tokens = "", {}, None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for t in c.delta.tool_calls or []:
                name, args = calls.get(t.index, ("", ""))
                calls[t.index] = (name + (t.function.name or ""), args + (t.function.arguments or ""))
    return content, [(n, json.loads(a)) for n, a in calls.values()], finish, tokens


def _messages_reply(claude, stream: bool, **kw):
    """(text, [(tool name, input)], stop_reason, output_tokens) of an Anthropic Messages reply."""
    if stream:
        with claude.messages.stream(**kw) as s:
            r = s.get_final_message()
    else:
        r = claude.messages.create(**kw)
    text = "".join(b.text for b in r.content if b.type == "text")
    return text, [(b.name, b.input) for b in r.content if b.type == "tool_use"], r.stop_reason, r.usage.output_tokens


D, EOS = "｜DSML｜", "<｜end▁of▁sentence｜>"
CALL = (f'<{D}invoke name="set_light">\n<{D}parameter name="on" string="false">true</{D}parameter>\n'
        f'<{D}parameter name="room" string="true">kitchen</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>')
BLOCK = f"\n\n<{D}tool_calls>\n" + CALL  # a call the answer opens itself
LIGHT_CALL = [("set_light", {"on": True, "room": "kitchen"})]
ANSWER = {"a": "x, y", "b": [1, 2]}
STOPS = [",", '"', "}", "<", "\n", "=", "kitchen"]  # each occurs in the JSON answer or in the call


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("route,ask,thinking", [
    ("chat", "json", "disabled"), ("chat", "json", "enabled"), ("chat", "required", "disabled"),
    ("messages", "any", "disabled"), ("messages", "any", "enabled"), ("messages", "tool", "disabled")])
def test_stop_strings_never_cut_a_constrained_answer(client, claude, model_writes, route, ask, thinking, stream):
    """A JSON answer and a forced call are guaranteed to parse, so a stop string that occurs in them does not
    end the output there (it used to: `stop: [","]` cut the arguments, `["\""]` lost the call)."""
    reasoning = 'First, "think": a, b.</think>' if thinking == "enabled" else ""
    answer = json.dumps(ANSWER) if ask == "json" else CALL if ask in ("required", "tool") else BLOCK
    model_writes(reasoning + answer + EOS)
    ask_for = "Give me a JSON object." if ask == "json" else "Turn on the kitchen light."
    if route == "chat":
        kw = dict(model="deepseek-v4-flash", messages=[{"role": "user", "content": ask_for}], max_tokens=300,
                  stop=STOPS, extra_body={"thinking": {"type": thinking}})
        if ask == "json":
            kw["response_format"] = {"type": "json_object"}
        else:
            kw.update(tools=[LIGHT], tool_choice="required")
        content, calls, finish, _ = _chat_reply(client, stream, **kw)
        assert (json.loads(content), finish) == (ANSWER, "stop") if ask == "json" else \
            (calls, finish) == (LIGHT_CALL, "tool_calls")
    else:
        tool = {"name": "set_light", "input_schema": LIGHT["function"]["parameters"]}
        _, calls, stop_reason, _ = _messages_reply(
            claude, stream, model="deepseek-v4-flash", max_tokens=300, stop_sequences=STOPS, tools=[tool],
            tool_choice={"type": "any"} if ask == "any" else {"type": "tool", "name": "set_light"},
            thinking={"type": thinking} | ({"budget_tokens": 1024} if thinking == "enabled" else {}),
            messages=[{"role": "user", "content": ask_for}])
        assert (calls, stop_reason) == (LIGHT_CALL, "tool_use")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("route", ["chat", "messages"])
def test_stop_strings_end_free_text_but_not_a_tool_call(client, claude, model_writes, route, stream):
    """tool_choice auto: a stop string still ends the text before a call (the call is then not made; the newlines
    and '<' that open the block count as that text, as DeepSeek's output parser reads them), but one that occurs
    inside the DSML block the model opened does not cut the call (it used to, without thinking)."""
    model_writes("On it." + BLOCK + EOS)
    inside = ['"', "=", "true", "kitchen", "tool_calls"]
    for stops, want in ((inside, ("On it.", LIGHT_CALL)), ([" it"], ("On", []))):
        if route == "chat":
            content, calls, finish, _ = _chat_reply(
                client, stream, model="deepseek-v4-flash", messages=[{"role": "user", "content": "Kitchen light on."}],
                tools=[LIGHT], max_tokens=300, stop=stops, extra_body={"thinking": {"type": "disabled"}})
            assert (content, calls, finish) == (*want, "tool_calls" if want[1] else "stop"), stops
        else:
            text, calls, reason, _ = _messages_reply(
                claude, stream, model="deepseek-v4-flash", max_tokens=300, stop_sequences=stops,
                tools=[{"name": "set_light", "input_schema": LIGHT["function"]["parameters"]}],
                tool_choice={"type": "auto"}, thinking={"type": "disabled"},
                messages=[{"role": "user", "content": "Kitchen light on."}])
            assert (text, calls, reason) == (*want, "tool_use" if want[1] else "stop_sequence"), stops


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("thinking", ["disabled", "enabled"])
def test_json_mode_with_tools_answers_json_or_calls(client, model_writes, thinking, stream):
    """response_format json_object with tools (auto): deepseek-recipe converts it as auto alone, so a plain answer
    was free text. The answer is now a JSON object whatever the model writes, or a call; not both, as the recipe's
    parser reads a JSON-mode reply that opens with '{' as content only. Stop strings do not cut the object."""
    reasoning = 'First, "think": a, b.</think>' if thinking == "enabled" else ""
    kw = dict(model="deepseek-v4-flash", messages=[{"role": "user", "content": "Kitchen light on, in json."}],
              tools=[LIGHT], response_format={"type": "json_object"}, max_tokens=300, stop=STOPS,
              extra_body={"thinking": {"type": thinking}})
    for writes, want in (("Sure, here it is.", None), (BLOCK, ("", LIGHT_CALL)),
                         (json.dumps(ANSWER) + BLOCK, (json.dumps(ANSWER), []))):
        model_writes(reasoning + writes + EOS)
        content, calls, finish, _ = _chat_reply(client, stream, **kw)
        if want is None:  # the model's text is not JSON: the constraint made it an object, or a call
            assert content == "" and [name for name, _ in calls] == ["set_light"] * len(calls) if calls else \
                isinstance(json.loads(content), dict), (content, calls)
        else:
            assert (content, calls) == want and finish == ("tool_calls" if calls else "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("route", ["chat", "messages"])
def test_usage_counts_a_last_token_that_ends_inside_a_character(client, claude, server, model_writes, route, stream):
    """max_tokens can stop the model after the first byte of a character: that token is generated and billed,
    and usage reports it (it reported one token less), its character as U+FFFD."""
    from dsv4.engine.constrain import _BYTE_CHAR

    tok = server[1].engine.tokenizer
    script = tok.encode("Hi").ids + [tok.token_to_id(_BYTE_CHAR["é".encode()[0]])]
    model_writes(script)
    billed = client.get("/usage", cast_to=object)["completion_tokens"]
    ask = [{"role": "user", "content": "hi"}]
    if route == "chat":
        text, _, finish, reported = _chat_reply(client, stream, model="deepseek-v4-flash", messages=ask,
                                                max_tokens=len(script), extra_body={"thinking": {"type": "disabled"}})
    else:
        text, _, finish, reported = _messages_reply(claude, stream, model="deepseek-v4-flash", messages=ask,
                                                    max_tokens=len(script), thinking={"type": "disabled"})
    assert finish in ("length", "max_tokens") and text == "Hi\ufffd"
    assert reported == len(script) == client.get("/usage", cast_to=object)["completion_tokens"] - billed


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_fim_end_of_sequence_is_the_finish_not_a_completion_token(client, server, model_writes, stream):
    """A FIM completion the model ends with its end-of-sequence token: that token is the finish, so usage and
    the bill count only the tokens of the text written, one logprobs entry each."""
    written = "return a + b"
    n = len(server[1].engine.tokenizer.encode(written).ids)
    model_writes(written + EOS)
    billed = client.get("/usage", cast_to=object)["completion_tokens"]
    kw = {"model": "deepseek-v4-pro", "prompt": "def add(a, b):\n    ", "suffix": "\n", "max_tokens": 50, "logprobs": 0}
    if stream:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
    else:
        r = client.completions.create(**kw)
        text, tokens, finish, usage = r.choices[0].text, r.choices[0].logprobs.tokens, [r.choices[0].finish_reason], \
            r.usage
    assert (text, finish) == (written, ["stop"])
    assert usage.completion_tokens == len(tokens) == n
    assert client.get("/usage", cast_to=object)["completion_tokens"] - billed == n


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("route", ["chat", "messages"])
def test_dsml_in_the_reasoning_is_not_a_tool_call(client, claude, model_writes, route, stream):
    """A model that writes a DSML call inside its thinking: the output parser took that for the call (naming a
    tool the request never defined, under no schema) and dropped the forced one after the thinking. The
    reasoning now writes no DSML; a call names a defined tool and follows its schema."""
    model_writes("Let me call it." + BLOCK.replace("set_light", "rm_rf") + " Done.</think>" + BLOCK + EOS)
    ask = [{"role": "user", "content": "Kitchen light on."}]
    if route == "chat":  # tool_choice auto: the dev model, off the script, thinks to the end of max_tokens
        _, calls, _, _ = _chat_reply(client, stream, model="deepseek-v4-flash", messages=ask, tools=[LIGHT],
                                     max_tokens=200)
        assert calls == []
    else:  # tool_choice any: the call is due after the thinking
        tool = {"name": "set_light", "input_schema": LIGHT["function"]["parameters"]}
        _, calls, reason, _ = _messages_reply(claude, stream, model="deepseek-v4-flash", max_tokens=400, tools=[tool],
                                              tool_choice={"type": "any"}, messages=ask,
                                              thinking={"type": "enabled", "budget_tokens": 1024})
        assert reason == "tool_use" and [name for name, _ in calls] == ["set_light"]
        assert isinstance(calls[0][1]["on"], bool) and calls[0][1]["room"] in ("kitchen", "hall")


def test_anthropic_routes_answer_errors_in_anthropic_shape(server, claude, monkeypatch):
    """401, 404 and a mid-stream engine failure reach the anthropic SDK as its own error types."""
    import anthropic

    bad = anthropic.Anthropic(base_url=server[0] + "/anthropic", api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="deepseek-v4-flash", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    status, body = post(server[0] + "/no/such/path", {})
    assert status == 404 and body["error"]["message"] == "Not Found"
    # deepseek-recipe's own conversion errors too (they used to come back in OpenAI's shape)
    for bad in ({"max_tokens": 0}, {"max_tokens": 5, "temperature": 5, "thinking": {"type": "disabled"}}):
        status, body = post(server[0] + "/v1/messages", {"model": "deepseek-v4-flash",
                                                         "messages": [{"role": "user", "content": "x"}], **bad})
        assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    eng = server[1].engine
    real, calls = eng.step, []

    def fail_later():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("simulated device failure")
        return real()
    monkeypatch.setattr(eng, "step", fail_later)
    with pytest.raises(anthropic.APIStatusError) as e:
        with claude.messages.stream(model="deepseek-v4-flash", max_tokens=50, thinking={"type": "disabled"},
                                    messages=[{"role": "user", "content": "x"}]) as stream:
            stream.get_final_message()
    assert "simulated device failure" in str(e.value)


def test_unknown_anthropic_paths_answer_in_anthropic_shape(server, claude):
    """Any path under /anthropic (and /v1/messages/...) is Anthropic's: a 404 there is its not_found_error (the
    SDK's count_tokens and models.list got OpenAI's shape); OpenAI's paths keep OpenAI's."""
    import anthropic

    expected = {"type": "error", "error": {"type": "not_found_error", "message": "Not Found"}}
    root = anthropic.Anthropic(base_url=server[0], api_key=KEY, max_retries=0)
    for call in (lambda: claude.messages.count_tokens(model="deepseek-v4-flash", messages=[
                     {"role": "user", "content": "x"}]),
                 lambda: root.messages.count_tokens(model="deepseek-v4-flash", messages=[
                     {"role": "user", "content": "x"}]),
                 lambda: claude.models.list()):
        with pytest.raises(anthropic.NotFoundError) as e:
            call()
        assert e.value.body == expected
    assert post(server[0] + "/anthropic/x", {}) == (404, expected)
    with pytest.raises(urllib.error.HTTPError) as e:  # a wrong method is the caller's error, not Anthropic's api_error
        urllib.request.urlopen(urllib.request.Request(server[0] + "/anthropic/v1/messages", method="GET"))
    assert e.value.code == 405 and json.loads(e.value.read())["error"]["type"] == "invalid_request_error"
    status, body = post(server[0] + "/v1/no/such/path", {})
    assert status == 404 and body["error"]["code"] == "not_found"


def _raw(url: str, head: str, body: bytes = b"") -> socket.socket:
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode() + body)
    return sock


def test_body_over_the_cap_is_refused_while_it_still_arrives(server):
    """A chunked upload (no Content-Length) gets its 413 once past the cap, not after the whole body."""
    head = (f"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    part = b"y" * (70 << 10)
    sock = _raw(server[0], head, f"{len(part):x}\r\n".encode() + part + b"\r\n")  # the body is not finished
    sock.settimeout(20)
    with sock:
        assert sock.recv(64).startswith(b"HTTP/1.1 413")


def test_a_body_of_exactly_the_size_cap_is_accepted(server):
    """max_body_bytes is the largest body served: one of exactly that size is answered, one byte more is a 413."""
    body = json.dumps({"model": "deepseek-chat", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
    exact = body.encode() + b" " * (MAX_BODY - len(body))  # JSON allows whitespace after the value
    assert len(exact) == MAX_BODY and post(server[0] + "/chat/completions", None, raw=exact)[0] == 200
    status, answer = post(server[0] + "/chat/completions", None, raw=exact + b" ")
    assert status == 413 and "exceeds" in answer["error"]["message"]


def test_closed_connection_cancels_a_non_streamed_request(server):
    body = json.dumps({"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "go"}],
                       "max_tokens": 3000}).encode()
    head = (f"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    eng = server[1].engine
    errors = server[2].state.stats["errors"]
    with _raw(server[0], head, body):
        deadline = time.time() + 30
        while not eng.running and time.time() < deadline:
            time.sleep(0.05)
        assert eng.running
    deadline = time.time() + 10
    while (eng.running or eng.waiting) and time.time() < deadline:
        time.sleep(0.05)
    assert not eng.running and not eng.waiting and server[2].state.stats["active"] == 0
    time.sleep(0.5)
    assert server[2].state.stats["errors"] == errors  # a client leaving is not a server error (it raised)


def test_with_api_keys_no_route_but_health_answers_without_one(server):
    """FastAPI's own /docs, /redoc and /openapi.json are not served when keys are required (they answered
    without one); without keys they are."""
    url, llm, _, path = server
    for route in ("/docs", "/redoc", "/openapi.json"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + route)
        assert e.value.code == 404, route
    assert create_app(llm, str(path / "tokenizer.json"), ServerConfig()).openapi_url == "/openapi.json"


def test_user_balance_and_402_once_spent(server):
    """GET /user/balance in DeepSeek's shape; with --balance-usd each key's balance is spent at the price
    table and a key whose balance is gone gets 402 Insufficient Balance (Anthropic: billing_error)."""
    url, _, _, path = server
    status, body = _get(f"{url}/user/balance")
    assert status == 200 and body == {"is_available": True, "balance_infos": []}  # no balance configured
    other = "sk-test-other-key"
    llm = AsyncLLM(LLMEngine(dsv4.load_model(path, dtype=torch.float32), load_tokenizer(path), EngineConfig()))
    cfg = ServerConfig(api_keys=[KEY, other], balance_usd=1.0, prices={"deepseek-chat": (0.0, 1e6, 1e6)})
    with serving(create_app(llm, str(path / "tokenizer.json"), cfg)) as url:
        status, body = _get(f"{url}/user/balance")
        assert status == 200 and body == {"is_available": True, "balance_infos": [
            {"currency": "USD", "total_balance": "1.00", "granted_balance": "1.00", "topped_up_balance": "0.00"}]}
        chat = dict(model="deepseek-chat", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
        assert post(f"{url}/chat/completions", chat)[0] == 200  # $1 per token: this one overdraws the balance
        status, body = _get(f"{url}/user/balance")
        assert body["is_available"] is False and body["balance_infos"][0]["total_balance"] == "0.00"
        assert post(f"{url}/chat/completions", chat) == (402, {"error": {
            "message": "Insufficient Balance", "type": "unknown_error", "param": None, "code": "invalid_request_error"}})
        assert post(f"{url}/beta/completions", {"model": "deepseek-chat", "prompt": "x", "max_tokens": 1})[0] == 402
        status, body = post(f"{url}/v1/messages", chat)
        assert status == 402 and body["type"] == "error" and body["error"]["type"] == "billing_error"
        assert post(f"{url}/chat/completions", chat, key=other)[0] == 200  # each key has its own balance
    # a custom served name is billed as deepseek-v4-flash unless the table prices it, also for FIM without a model
    cfg = ServerConfig(api_keys=[KEY], served_model_name="mymodel", balance_usd=1e-9)
    with serving(create_app(llm, str(path / "tokenizer.json"), cfg)) as url:
        assert post(f"{url}/chat/completions", {**chat, "model": "mymodel"})[0] == 200
        status, body = _get(f"{url}/usage")
        hit, miss, out = DEFAULT_PRICES["deepseek-v4-flash"]
        assert body["cost_usd"] == pytest.approx((body["prompt_cache_hit_tokens"] * hit + (
            body["prompt_tokens"] - body["prompt_cache_hit_tokens"]) * miss + body["completion_tokens"] * out) / 1e6)
        assert body["cost_usd"] > 0
        assert post(f"{url}/chat/completions", {**chat, "model": "mymodel"})[0] == 402
        assert post(f"{url}/beta/completions", {"prompt": "x", "max_tokens": 1})[0] == 402
    llm.close()


def _get(url, key=KEY):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
