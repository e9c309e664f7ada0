"""Streaming is chunk-invariant: any split of the model's tokens gives the non-streamed message (both APIs)."""
import asyncio
import json

import deepseek_recipe as dr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.engine.sequence import RequestOutput
from dsv4.server.app import CHAT, MESSAGES, _chunks, _Tally
from dsv4.server.devmodel import build_dev_model
from dsv4.tokenizer import load_tokenizer

# what a thinking model emits on a tool-call turn: reasoning, content, DSML tool call, end of sentence
OUTPUT = ("Need the weather first.</think>Let me check.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
          "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
          "</｜DSML｜tool_calls><｜end▁of▁sentence｜>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
BODIES = {
    "chat": {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "weather in Paris?"}],
             "tools": TOOLS},
    "messages": {"model": "deepseek-v4-flash", "max_tokens": 100, "messages": [
        {"role": "user", "content": "weather in Paris?"}],
        "tools": [{"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}]},
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = build_dev_model(tmp_path_factory.mktemp("dev"))
    return load_tokenizer(path), dr.Tokenizer.from_file(str(path / "tokenizer.json"))


class _FakeLLM:
    """Stands in for AsyncLLM.stream: replays token deltas as the engine would deliver them."""

    class engine:  # noqa: N801 - mimics AsyncLLM.engine
        eos = 1

    def __init__(self, deltas):
        self.deltas = deltas

    async def stream(self, seq, queue):
        for i, ids in enumerate(self.deltas):
            last = i == len(self.deltas) - 1
            yield RequestOutput("r", [], ids, "", last, "stop" if last else None)


class _Seq:
    cached_tokens = 0


def run(proto, deltas, recipe_tok):
    body = BODIES["chat" if proto is CHAT else "messages"]
    options = dr.ConversionOptions().with_model_alias("deepseek-v4-flash", dr.ModelVersion.DeepseekV4Pro)
    conv = proto.request(json.dumps(body)).convert(options)
    processor = dr.StreamProcessor(proto.generator(conv, "id-1", "deepseek-v4-flash"), conv.parsing_options,
                                   recipe_tok)

    async def collect():
        response = proto.response("id-1", "deepseek-v4-flash", 0, 10, 0)
        async for c in _chunks(_FakeLLM(deltas), _Seq(), None, processor, 10, 60.0, _Tally()):
            if c is not None:
                response.accumulate(c)
        return json.loads(response.to_json())

    return asyncio.run(collect())


@pytest.mark.parametrize("proto", [CHAT, MESSAGES], ids=["chat", "messages"])
def test_tool_call_is_parsed_from_the_model_output(tok, proto):
    ids = tok[0].encode(OUTPUT).ids
    out = run(proto, [ids], tok[1])
    text = json.dumps(out)
    assert "get_weather" in text and "Paris" in text and "DSML" not in text
    if proto is CHAT:
        msg = out["choices"][0]["message"]
        assert msg["reasoning_content"] == "Need the weather first." and msg["content"] == "Let me check."
        assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
        assert out["choices"][0]["finish_reason"] == "tool_calls"


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=10_000), max_size=12),
       which=st.sampled_from(["chat", "messages"]))
def test_any_split_of_the_tokens_gives_the_same_message(tok, cuts, which):
    proto = CHAT if which == "chat" else MESSAGES
    ids = tok[0].encode(OUTPUT).ids
    points = sorted({c % len(ids) for c in cuts} - {0})
    deltas = [ids[a:b] for a, b in zip([0] + points, points + [len(ids)])]
    whole, split = run(proto, [ids], tok[1]), run(proto, deltas, tok[1])
    assert _without_ids(split) == _without_ids(whole)


def _without_ids(d):
    """Tool-call ids are random per response; everything else must match."""
    if isinstance(d, dict):
        return {k: _without_ids(v) for k, v in d.items() if k not in ("id", "created")}
    if isinstance(d, list):
        return [_without_ids(v) for v in d]
    return d
