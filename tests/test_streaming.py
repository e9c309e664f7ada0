"""Streaming is chunk-invariant: any split of the model's tokens gives the non-streamed message (both APIs)."""
import asyncio
import json
from types import SimpleNamespace

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

    def __init__(self, deltas, tokenizer, reason="stop"):
        self.deltas, self.reason = deltas, reason
        self.engine = SimpleNamespace(eos=1, tokenizer=tokenizer)

    async def stream(self, seq, queue):
        for i, ids in enumerate(self.deltas):
            last = i == len(self.deltas) - 1
            yield RequestOutput("r", [], ids, "", last, self.reason if last else None)


class _Seq:
    cached_tokens = 0


def run(proto, deltas, tok, reason="stop", tally=None):
    body = BODIES["chat" if proto is CHAT else "messages"]
    options = dr.ConversionOptions().with_model_alias("deepseek-v4-flash", dr.ModelVersion.DeepseekV4Pro)
    conv = proto.request(json.dumps(body)).convert(options)
    processor = dr.StreamProcessor(proto.generator(conv, "id-1", "deepseek-v4-flash"), conv.parsing_options,
                                   tok[1])

    async def collect():
        response = proto.response("id-1", "deepseek-v4-flash", 0, 10, 0)
        llm = _FakeLLM(deltas, tok[0], reason)
        async for c in _chunks(llm, _Seq(), None, processor, 10, 60.0, tally or _Tally()):
            if c is not None:
                response.accumulate(c)
        return json.loads(response.to_json())

    return asyncio.run(collect())


@pytest.mark.parametrize("proto", [CHAT, MESSAGES], ids=["chat", "messages"])
def test_tool_call_is_parsed_from_the_model_output(tok, proto):
    ids = tok[0].encode(OUTPUT).ids
    out = run(proto, [ids], tok)
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
    whole, split = run(proto, [ids], tok), run(proto, deltas, tok)
    assert _without_ids(split) == _without_ids(whole)


def _without_ids(d):
    """Tool-call ids are random per response; everything else must match."""
    if isinstance(d, dict):
        return {k: _without_ids(v) for k, v in d.items() if k not in ("id", "created")}
    if isinstance(d, list):
        return [_without_ids(v) for v in d]
    return d


def _cut_inside_a_character(tokenizer) -> list:
    """A thinking reply with multi-byte characters that max_tokens cut after the first byte of an 'é'."""
    from dsv4.engine.constrain import _BYTE_CHAR

    return tokenizer.encode("Météo…</think>Il fait très beau à Paris ☀ ").ids + [tokenizer.token_to_id(_BYTE_CHAR[0xC3])]


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=10_000), max_size=12),
       which=st.sampled_from(["chat", "messages"]))
def test_a_reply_cut_inside_a_character_reports_every_token(tok, cuts, which):
    """The output parser held back a run of tokens that ends inside a character and dropped it at the end (its
    text too: a whole multi-token delta), so usage reported fewer completion tokens than were generated and
    billed. Every split now gives the whole text, the cut character as U+FFFD, and every token, as billed."""
    proto = CHAT if which == "chat" else MESSAGES
    ids = _cut_inside_a_character(tok[0])
    points = sorted({c % len(ids) for c in cuts} - {0})
    tally = _Tally()
    out = run(proto, [ids[a:b] for a, b in zip([0] + points, points + [len(ids)])], tok, "length", tally)
    if proto is CHAT:
        reported, text = out["usage"]["completion_tokens"], out["choices"][0]["message"]["content"]
    else:
        reported, text = out["usage"]["output_tokens"], "".join(b["text"] for b in out["content"] if b["type"] == "text")
    assert text == "Il fait très beau à Paris ☀ \ufffd"
    assert reported == tally.completion == len(ids)
