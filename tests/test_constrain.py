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


def _greedy(c, tok, eos, V, budget, key):
    """Drive constraint `c` for at most `budget` tokens, each time taking the allowed token that `key` ranks
    highest (a sampler that never ends on its own where anything else is allowed). -> (ids, ended with eos)"""
    out = []
    for remaining in range(budget, 0, -1):
        allowed = torch.isfinite(c.mask(torch.zeros(V), remaining)).nonzero().flatten().tolist()
        pick = max(allowed, key=lambda i: key(i, out))
        if pick == eos:
            return out, True
        c.accept(pick)
        out.append(pick)
    return out, False


def test_json_object_closes_even_when_the_model_opens_arrays(engine):
    """Arrays nest like objects: each unclosed '[' is one more closer owed. A sampler that opens '[' wherever
    it may outside strings still ends with a valid object at every budget."""
    tok, V = engine.tokenizer, engine.model.config.vocab_size
    texts = [tok.decode([i]) for i in range(V)]
    nested = 0
    for budget in range(1, 41):
        c = JSONObjectConstraint(tok, engine.eos)
        out, _ = _greedy(c, tok, engine.eos, V, budget, lambda i, out, c=c: (
            i != engine.eos, not c.in_string and texts[i].strip() == "[", texts[i] == '"', texts[i] == ":",
            texts[i].isalpha()))
        assert isinstance(json.loads(tok.decode(out)), dict), (budget, tok.decode(out))
        nested += "[[" in tok.decode(out)
    assert nested >= 20  # the sampler did nest arrays


def test_json_value_that_may_go_on_ends_at_the_end_of_sequence_near_the_budget(engine):
    """The end of sequence is a closer (module docstring): where a value may either end or go on (a number's
    digits), the tight budget keeps only the end, so the reply stops (finish "stop") instead of filling
    max_tokens with digits."""
    tok, V = engine.tokenizer, engine.model.config.vocab_size
    one = tok.encode("1", add_special_tokens=False).ids
    c = JSONObjectConstraint(tok, engine.eos, schema='{"type": "integer"}')
    for t in one:
        c.accept(t)
    roomy = torch.isfinite(c.mask(torch.zeros(V), remaining=50))
    assert roomy[engine.eos] and roomy[one[0]]  # the grammar admits both: more digits or the end
    tight = torch.isfinite(c.mask(torch.zeros(V), remaining=3))
    assert tight.nonzero().flatten().tolist() == [engine.eos]
    for budget in range(2, 12):  # a sampler that always prefers another digit still stops before the budget
        c = JSONObjectConstraint(tok, engine.eos, schema='{"type": "integer"}')
        out, stopped = _greedy(c, tok, engine.eos, V, budget, lambda i, out: (i != engine.eos, i == one[0]))
        assert stopped and json.loads(tok.decode(out)) == int("1" * len(out)), (budget, tok.decode(out))


def _call_accepted(engine, tools, params, tool="f"):
    """Whether a forced DSML call to `tool` with `params` [(name, string attribute, value)] is admitted."""
    from dsv4.engine.constrain import tool_call_grammar

    D = "｜DSML｜"
    text = (f'<{D}invoke name="{tool}">\n' + "".join(
        f'<{D}parameter name="{k}" string="{s}">{v}</{D}parameter>\n' for k, s, v in params)
        + f"</{D}invoke>\n</{D}tool_calls>")
    c = GrammarConstraint(engine.tokenizer, engine.eos, tool_call_grammar(tools))
    try:
        for t in engine.tokenizer.encode(text).ids + [engine.eos]:
            c.accept(t)
    except RuntimeError:
        return False
    return True


def _tool(props, required=None):
    return [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": props, "required": list(props) if required is None else required}}}]


def test_a_string_const_parameter_admits_only_its_value(engine):
    """A string with `const` is a JSON value under its schema (tool_call_grammar docstring), not raw text."""
    tools = _tool({"p": {"type": "string", "const": "x"}})
    assert _call_accepted(engine, tools, [("p", "false", '"x"')])
    assert not _call_accepted(engine, tools, [("p", "false", '"y"')])
    assert not _call_accepted(engine, tools, [("p", "true", "y")])


@pytest.mark.parametrize("schema, member, other", [
    ({"type": "integer", "enum": [1, "a"]}, "1", '"a"'),  # xgrammar alone takes any enum member
    ({"type": "integer", "enum": [1, True]}, "1", "true"),  # a JSON boolean is no integer (Python's bool is)
    ({"type": "number", "enum": [2.5, False]}, "2.5", "false"),
])
def test_a_typed_enum_admits_only_members_of_its_type(engine, schema, member, other):
    """Both `type` and `enum` apply: a member of another type is not a value the parameter can take."""
    tools = _tool({"p": schema})
    assert _call_accepted(engine, tools, [("p", "false", member)])
    assert not _call_accepted(engine, tools, [("p", "false", other)])


@pytest.mark.parametrize("name, props", [
    ("a<b", {}), ("a>b", {}), ("f", {"x<y": {"type": "string"}}), ("f", {"x>y": {"type": "integer"}}),
    ("f", {"x｜y": {"type": "string"}})])
def test_names_with_tag_characters_are_a_schema_error(engine, name, props):
    """'<' and '>' would end or open a DSML tag inside name="...": the tool cannot be called (SchemaError)."""
    from dsv4.engine.constrain import SchemaError, tool_call_grammar

    bad = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props}}}]
    with pytest.raises(SchemaError, match="cannot be written in a DSML call"):
        tool_call_grammar(bad)


def test_a_long_optional_parameter_started_early_still_finishes(engine):
    """The way to finish is re-measured at each DSML marker: a call whose shortest form skips an optional
    parameter has a short way to finish at the start, but once the model opens that parameter (its value
    ~150 tokens at least) checks must begin ~HORIZON tokens before that value's end, not the start's. A
    sampler that opens every optional parameter and writes its free string forever still ends the block."""
    from dsv4.engine.constrain import tool_call_grammar

    tok, V, D = engine.tokenizer, engine.model.config.vocab_size, "｜DSML｜"
    texts = [tok.decode([i]) for i in range(V)]
    keys = {f"key_number_{i}": {"type": "integer"} for i in range(12)}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "big": {"type": "object", "properties": {"note": {"type": "string"}, **keys}, "required": ["note", *keys]}}}}}]
    c = GrammarConstraint(tok, engine.eos, tool_call_grammar(tools))
    m = c.matcher.fork()
    for t in tok.encode(f'<{D}invoke name="f">\n<{D}parameter name="big" string="false">').ids:
        m.accept_token(t)
    long = len(c.finishing_path(4096, m))
    assert long > c.HORIZON + c.shortest + c.SLACK  # the start's horizon would be too late for this value
    # with room for it the parameter is opened and finished; with less room than its value needs beyond the rest
    # of the call it is not opened (it used to be, above the start's horizon: cut at budgets long + 2 to long + 33)
    for budget in [*range(long + 2, long + 40, 6), long + 40, long + 120]:
        c = GrammarConstraint(tok, engine.eos, tool_call_grammar(tools))
        out, stopped = _greedy(c, tok, engine.eos, V, budget, lambda i, out: (
            i != engine.eos, texts[i] == "<", texts[i].isalpha()))
        text = tok.decode(out, skip_special_tokens=False)
        assert stopped and text.endswith(f"</{D}tool_calls>"), (budget, text[-80:])
        values = text.split('name="big" string="false">')[1:]
        assert values or budget < long + 40, budget
        for value in values:
            assert set(json.loads(value.split(f"</{D}parameter>")[0])) == {"note", *keys}
