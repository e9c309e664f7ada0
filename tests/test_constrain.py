"""Grammar constraints at the engine level: JSON objects that always close, DSML calls under a schema."""
import json

import pytest
import torch

import dsv4
from dsv4.engine import EngineConfig, LLMEngine
from dsv4.engine.constrain import GrammarConstraint, JSONObjectConstraint, text_or_tool_call_grammar
from dsv4.server.devmodel import build_dev_model
from dsv4.tokenizer import load_tokenizer

TOOLS = [{"type": "function", "function": {"name": "set_light", "parameters": {
    "type": "object", "properties": {"on": {"type": "boolean"}, "room": {"type": "string", "enum": ["kitchen", "hall"]}},
    "required": ["on", "room"]}}}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = build_dev_model(tmp_path_factory.mktemp("dev"))
    return LLMEngine(dsv4.load_model(path, dtype=torch.float32), load_tokenizer(path), EngineConfig())


@pytest.mark.parametrize("max_tokens", [3, 8, 20, 64])
def test_json_object_closes_within_any_budget(engine, max_tokens):
    tok = engine.tokenizer
    for seed in range(8):
        s = engine.add_request(tok.encode("json please").ids, dsv4.SamplingParams(max_tokens=max_tokens, seed=seed),
                               constraint=JSONObjectConstraint(tok, engine.eos))
        while engine.has_unfinished():
            engine.step()
        assert isinstance(json.loads(s.text), dict), (max_tokens, seed, s.text)


def test_auto_tool_grammar_completes_a_started_call_under_the_schema(engine):
    """Once the model opens a DSML block in auto mode, the rest must be a schema-valid call."""
    tok = engine.tokenizer
    opener = "Sure.\n\n<｜DSML｜tool_calls>\n"
    for seed in range(4):
        c = GrammarConstraint(tok, engine.eos, text_or_tool_call_grammar(TOOLS))
        for t in tok.encode(opener).ids:  # as if the model had written the opener itself
            c.accept(t)
        prompt = tok.encode("lights").ids
        s = engine.add_request(prompt, dsv4.SamplingParams(max_tokens=300, seed=seed), constraint=c)
        while engine.has_unfinished():
            engine.step()
        text = tok.decode(s.output_ids, skip_special_tokens=False)
        assert s.finish_reason == "stop" and text.endswith("</｜DSML｜tool_calls><｜end▁of▁sentence｜>"), text
        assert '<｜DSML｜invoke name="set_light">' in text and ('>kitchen<' in text or '>hall<' in text)


def test_reasoning_cannot_end_the_reply_and_is_closed_in_time(engine):
    """JSON mode with thinking: no EOS inside the reasoning; with 16 tokens left, </think> is forced."""
    tok = engine.tokenizer
    think_end = tok.token_to_id("</think>")
    c = JSONObjectConstraint(tok, engine.eos, start_after=think_end)
    logits = torch.zeros(engine.model.config.vocab_size)
    logits[engine.eos] = 10.0
    early = c.mask(logits, remaining=100)
    dsml = tok.token_to_id("｜DSML｜")
    assert early[engine.eos] == early[dsml] == float("-inf") and torch.isfinite(early).sum() == len(logits) - 2
    late = c.mask(logits, remaining=16)
    assert late.argmax() == think_end and torch.isfinite(late).sum() == 1
    c.accept(think_end)
    assert c.active  # from here on the JSON grammar decides


def test_reasoning_before_a_constrained_reply_writes_no_dsml(engine):
    """The output parser takes a DSML block inside the reasoning for a call (to any name, under no schema) and
    drops the constrained reply after it: before </think> the DSML marker is masked; after it, the tool grammar
    admits it where a block opens."""
    tok = engine.tokenizer
    think_end, dsml = tok.token_to_id("</think>"), tok.token_to_id("｜DSML｜")
    c = GrammarConstraint(tok, engine.eos, text_or_tool_call_grammar(TOOLS), start_after=think_end)
    logits = torch.zeros(engine.model.config.vocab_size)
    logits[dsml] = 10.0
    for t in tok.encode("Call it.\n\n<").ids:
        assert c.mask(logits, remaining=300)[dsml] == float("-inf")
        c.accept(t)
    c.accept(think_end)
    for t in tok.encode("On it.\n\n<").ids:
        c.accept(t)
    assert c.mask(logits, remaining=300).argmax() == dsml


def test_tool_grammar_admits_optional_parameters_and_parallel_calls(engine):
    """Only the required parameters, in order, in exactly one call used to be admitted: a tool without a
    `required` list could only be called with `{}`, optional parameters never, parallel calls never."""
    from dsv4.engine.constrain import MAX_CALLS

    tok, D = engine.tokenizer, "｜DSML｜"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"type": "string"}},
        "required": ["unit"]}}}]

    def call(*params):
        return (f'<{D}invoke name="get_weather">\n' + "".join(
            f'<{D}parameter name="{k}" string="{"false" if k == "days" else "true"}">{v}</{D}parameter>\n'
            for k, v in params) + f"</{D}invoke>\n")

    def accepted(*calls):
        c = GrammarConstraint(tok, engine.eos, text_or_tool_call_grammar(tools))
        text = f"Checking.\n\n<{D}tool_calls>\n" + "".join(calls) + f"</{D}tool_calls>"
        try:
            for t in tok.encode(text).ids + [engine.eos]:
                c.accept(t)
        except RuntimeError:
            return False
        return True

    assert accepted(call(("city", "Paris"), ("days", "3"), ("unit", "C")))  # every parameter
    assert accepted(call(("unit", "C")))  # the required one alone
    assert accepted(call(("city", "Paris"), ("unit", "C")), call(("city", "Rome"), ("unit", "F")))  # parallel
    assert accepted(*[call(("unit", "C"))] * MAX_CALLS)
    assert not accepted(call(("city", "Paris")))  # the required parameter missing
    assert not accepted(call(("unit", "C"), ("unit", "F")))  # a parameter twice
    assert not accepted(call(("days", "x"), ("unit", "C")))  # not an integer
    assert not accepted(*[call(("unit", "C"))] * (MAX_CALLS + 1))


def test_a_forced_call_finishes_within_max_tokens(engine):
    """A free JSON value or a raw string argument could run on until max_tokens cut the call (unparsable
    arguments); near the budget's end the call now takes a way to finish, from any state, whatever the
    model prefers. Budgets from the shortest possible call up."""
    from dsv4.engine.constrain import tool_call_grammar

    tok = engine.tokenizer
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {"type": "object", "properties": {
        "a": True, "s": {"type": "string"}, "n": {"type": "integer"},
        "to": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 1}, "y": {"type": "integer"}},
               "required": ["x", "y"]}},  # a number was once finished by more digits, never by its comma
        "required": ["a", "s", "n", "to"]}}}]
    shortest = GrammarConstraint(tok, engine.eos, tool_call_grammar(tools)).shortest
    assert shortest < 200  # a digit loop ran to the limit
    for max_tokens in (shortest, shortest + 7, shortest + 40):
        for seed in range(3):
            c = GrammarConstraint(tok, engine.eos, tool_call_grammar(tools))
            s = engine.add_request(tok.encode("pick").ids, dsv4.SamplingParams(max_tokens=max_tokens, seed=seed),
                                   constraint=c)
            while engine.has_unfinished():
                engine.step()
            text = tok.decode(s.output_ids, skip_special_tokens=False)
            assert s.finish_reason == "stop" and text.endswith("</｜DSML｜tool_calls><｜end▁of▁sentence｜>"), text
            value = text.split('name="a" string="false">')[1].split("</｜DSML｜parameter>")[0]
            json.loads(value)


def test_no_call_starts_that_could_not_finish_and_names_dsml_cannot_write(engine):
    """Auto mode: near the end of the budget a DSML block is not opened when its shortest call would not
    fit (it was opened 3 tokens before the end and cut). A thinking reply keeps room for the shortest call.
    A tool or parameter name with a quote or a newline would break the call's attribute: a SchemaError."""
    from dsv4.engine.constrain import SchemaError, tool_call_grammar

    tok, V = engine.tokenizer, engine.model.config.vocab_size
    marker = tok.token_to_id("｜DSML｜")
    for remaining in (5, 40, 400):
        c = GrammarConstraint(tok, engine.eos, text_or_tool_call_grammar(TOOLS))
        for t in tok.encode("ok\n\n<").ids:
            c.accept(t)
        opens = torch.isfinite(c.mask(torch.zeros(V), remaining=remaining)[marker])
        fits = len(c.finishing_path(1000, _after(c, marker))) + 1 + c.SLACK <= remaining
        assert bool(opens) == fits, remaining
    think_end = tok.token_to_id("</think>")
    c = GrammarConstraint(tok, engine.eos, tool_call_grammar(TOOLS), start_after=think_end)
    assert c.reply_reserve >= c.shortest + c.SLACK
    for name, props in (('say "hi"', {}), ("pick", {"x\ny": {"type": "string"}})):
        bad = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props}}}]
        with pytest.raises(SchemaError, match="cannot be written in a DSML call"):
            tool_call_grammar(bad)


def _after(c, token):
    m = c.matcher.fork()
    m.accept_token(token)
    return m


def test_json_tool_arguments_are_compact(engine):
    """A JSON-valued tool parameter admits no free whitespace: the bundled model padded a nested argument
    with blanks until max_tokens ran out (unparsable arguments from a forced call)."""
    from dsv4.engine.constrain import tool_call_grammar

    tok = engine.tokenizer
    tools = [{"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "$defs": {"place": {"type": "object", "properties": {"days": {"type": "integer"}},
                                              "required": ["days"]}},
        "properties": {"dest": {"$ref": "#/$defs/place"}}, "required": ["dest"]}}}]
    c = GrammarConstraint(tok, engine.eos, tool_call_grammar(tools))
    for t in tok.encode('<｜DSML｜invoke name="book">\n<｜DSML｜parameter name="dest" string="false">{').ids:
        c.accept(t)
    allowed = torch.isfinite(c.mask(torch.zeros(engine.model.config.vocab_size), remaining=100))
    assert allowed.any()
    assert not any(allowed[i] and not tok.decode([i]).strip() for i in range(len(allowed)))


def test_only_marker_steps_ban_the_bars_bytes(engine):
    """The fullwidth bar's bytes (EF BD 9C) also occur in CJK, Cyrillic and fullwidth punctuation: those
    stay possible in free text and string arguments; where a DSML tag is due, only the marker token is."""
    from dsv4.engine.constrain import tool_call_grammar

    tok, V = engine.tokenizer, engine.model.config.vocab_size
    tools = [{"type": "function", "function": {"name": "say", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}]
    text = "你好，ну"
    for grammar, prefix in ((text_or_tool_call_grammar(tools), "ok "),
                            (tool_call_grammar(tools), '<｜DSML｜invoke name="say">\n<｜DSML｜parameter name="text" string="true">')):
        c = GrammarConstraint(tok, engine.eos, grammar)
        for t in tok.encode(prefix).ids:
            c.accept(t)
        for t in tok.encode(text).ids:  # the tokenizer's own spelling, byte pieces included
            assert torch.isfinite(c.mask(torch.zeros(V), remaining=100)[t]), tok.id_to_token(t)
            c.accept(t)
    c = GrammarConstraint(tok, engine.eos, tool_call_grammar(tools))
    c.accept(tok.token_to_id("<"))
    allowed = torch.isfinite(c.mask(torch.zeros(V), remaining=100))
    assert allowed[tok.token_to_id("｜DSML｜")] and not allowed[c.vocab.bar_bytes].any()


def test_json_object_closes_even_when_the_model_writes_escapes(engine):
    """A sampler that starts a \\uXXXX escape whenever it may and never closes on its own still ends
    with a valid object at every budget: an escape owes up to five characters past the backslash."""
    tok, V = engine.tokenizer, engine.model.config.vocab_size
    texts = [tok.decode([i]) for i in range(V)]
    for budget in range(1, 24):
        c, out = JSONObjectConstraint(tok, engine.eos), []
        for remaining in range(budget, 0, -1):
            allowed = torch.isfinite(c.mask(torch.zeros(V), remaining)).nonzero().flatten().tolist()
            text = tok.decode(out)
            after_backslash = (len(text) - len(text.rstrip("\\"))) % 2 == 1
            pick = max(allowed, key=lambda i: (i != engine.eos, after_backslash and texts[i].startswith("u"),
                                               "\\" in texts[i], texts[i][:1].isalnum()))
            if pick == engine.eos:
                break
            c.accept(pick)
            out.append(pick)
        assert isinstance(json.loads(tok.decode(out)), dict), (budget, tok.decode(out))
