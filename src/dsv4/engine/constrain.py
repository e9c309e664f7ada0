"""Constrained decoding with xgrammar: JSON-object output that is valid even when max_tokens runs out.

The grammar mask keeps every sampled token on a path to a valid JSON object. Near the end of the
token budget the constraint steers to the shortest completion: among the tokens the grammar allows,
it prefers closers (end of string, '}', ']', end of sequence), then ':' and short literals, so the
object always closes before max_tokens. With thinking on, the constraint starts after '</think>'.
"""
from __future__ import annotations

import json
import re

import torch

_VOCABS: dict = {}


def _bytes_to_unicode() -> dict:
    """The byte-level BPE alphabet: byte value -> the printable character that stands for it."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


_BYTE_CHAR = _bytes_to_unicode()


def _special_strings(tokenizer) -> list:
    return [t.content for t in tokenizer.get_added_tokens_decoder().values()]


class _Vocab:
    """Per-tokenizer tables: xgrammar compiler and the token classes used to finish quickly."""

    def __init__(self, tokenizer, eos: int):
        import xgrammar as xgr

        V = tokenizer.get_vocab_size()
        pieces = [tokenizer.id_to_token(i) for i in range(V)]
        info = xgr.TokenizerInfo(pieces, xgr.VocabType.BYTE_LEVEL, vocab_size=V, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info)
        self.V, self.eos = V, eos
        texts = [tokenizer.decode([i]) for i in range(V)]
        self.texts = texts
        strip = [t.strip() for t in texts]
        closers = torch.tensor([bool(t) and set(t) <= set("}]") for t in strip])
        closers[eos] = True
        colon = torch.tensor([t == ":" for t in strip])
        short = torch.tensor([t in ("0", "1", "null", "true", "false", '""', "{}", "[]") for t in strip])
        quote = torch.tensor([t.startswith('"') and set(t) <= set('"}]:,') for t in strip])
        self.backslash = torch.tensor(["\\" in t for t in texts])
        # byte pieces that could spell the fullwidth bar of special markers ("｜" = EF BD 9C): a DSML tag
        # counts only as the special token, so where the grammar admits a marker token it must not be
        # spelled from bytes (those bytes also occur in other characters: banned only at such steps)
        bar = {_BYTE_CHAR[b] for b in "｜".encode()}
        special = {tokenizer.token_to_id(t) for t in _special_strings(tokenizer)}
        self.bar_bytes = torch.tensor([i not in special and bool(set(p) & bar) for i, p in enumerate(pieces)])
        self.markers = torch.tensor(sorted(i for i in special - {eos} if "｜" in tokenizer.id_to_token(i)),
                                    dtype=torch.long)
        comma = torch.tensor([t == "," for t in strip])  # on to a required key (a digit would lengthen a number)
        self.outside = [closers, colon, comma, short]  # finishing order outside a string
        self.inside = [quote]  # inside a string: end it first
        # a DSML tag's first piece: an end tag's first (a lone "<" may open another call)
        self.tag_starts = [torch.tensor([t.startswith("</") for t in texts]), torch.tensor([t == "<" for t in texts])]
        # tokens that can open something long (another call, a DSML block): where the budget is tight, each
        # class is allowed only if its way to finish still fits
        marker = torch.zeros(V, dtype=torch.bool)
        marker[self.markers] = True
        self.marker_ids = set(self.markers.tolist())
        self.dsml = tokenizer.token_to_id(DSML)  # None for a tokenizer without DSML
        self.openers = [self.tag_starts[1], marker]
        self.opener_ids = [o.nonzero().flatten() for o in self.openers]  # the same, as token ids
        self.tokenizer = tokenizer


def vocab_for(tokenizer, eos: int) -> _Vocab:
    """The tables for this tokenizer object; each entry keeps its tokenizer alive, so its id is never
    reused by another tokenizer while the entry exists."""
    key = (id(tokenizer), eos)
    if key not in _VOCABS:
        _VOCABS[key] = (tokenizer, _Vocab(tokenizer, eos))
    return _VOCABS[key][1]


DSML = "｜DSML｜"


def _lit(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


MAX_CALLS = 8  # calls in one DSML block (parallel calls, api.md section 13)


def text_or_tool_call_grammar(tools: list):
    """tool_choice auto: free text (without DSML markers), optionally followed by a DSML tool-call block
    whose calls follow the tools' schemas."""
    import xgrammar as xgr

    text = xgr.Grammar.from_ebnf('root ::= [^｜]*')
    return xgr.Grammar.concat(text, xgr.Grammar.union(tool_block_grammar(tools), xgr.Grammar.from_ebnf('root ::= ""')))


def json_or_tool_call_grammar(tools: list):
    """tool_choice auto with response_format json_object: a JSON object or a DSML tool-call block, not both
    (deepseek-recipe's output parser reads a JSON-mode reply that opens with '{' as content only: a block after
    the object would be text in it)."""
    import xgrammar as xgr

    return xgr.Grammar.union(xgr.Grammar.from_json_schema('{"type": "object"}'), tool_block_grammar(tools))


def tool_block_grammar(tools: list, max_calls: int = MAX_CALLS):
    """A whole DSML tool-call block, opener included, with 1 to `max_calls` calls under the tools' schemas."""
    import xgrammar as xgr

    opener = xgr.Grammar.from_ebnf(f"root ::= {_lit(chr(10) + chr(10) + f'<{DSML}tool_calls>' + chr(10))}")
    return xgr.Grammar.concat(opener, tool_call_grammar(tools, max_calls))


class SchemaError(ValueError):
    """A tool's parameter schema that the output grammar cannot follow; the message names the tool and field."""


def tool_call_grammar(tools: list, max_calls: int = MAX_CALLS):
    """xgrammar Grammar for a DSML tool-call block (the prompt has opened it): 1 to `max_calls` calls, each
    to one of `tools` (OpenAI-style function definitions), then the block's end. A call's parameters come
    in the schema's property order, each at most once: the required ones always, the others if the model
    writes them (required names the schema does not describe follow, as any JSON value).

    A plain string parameter is raw text without '<' or '｜' (`string="true"`), a string enum one of its values;
    any other parameter (numbers, objects, strings with a `pattern` or `format`, mixed enums, `$ref`s
    into the parameters' `$defs`) is a JSON value under its schema (`string="false"`)."""
    import xgrammar as xgr

    def lit(text):
        return xgr.Grammar.from_ebnf(f"root ::= {_lit(text)}")

    nothing = xgr.Grammar.from_ebnf('root ::= ""')
    invokes = []
    for t in tools:
        fn = t.get("function", t)
        params = fn.get("parameters") or {}
        if not isinstance(params, dict):
            raise SchemaError(f"tool {fn['name']!r}: 'parameters' must be a JSON schema object")
        defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
        props = params.get("properties") or {}
        if not isinstance(props, dict):
            raise SchemaError(f"tool {fn['name']!r}: 'properties' must be an object")
        required = params.get("required") or []
        for name in [fn["name"]] + list(props) + required:  # DSML writes them inside name="..."
            if not isinstance(name, str) or re.search(r'["<>｜\x00-\x1f]', name):
                raise SchemaError(f"tool {fn['name']!r}: the name {name!r} cannot be written in a DSML call "
                                  f"(no quotes, '<', '>', '｜' or control characters)")
        parts = [lit(f'<{DSML}invoke name="{fn["name"]}">\n')]
        for name in list(props) + [r for r in required if r not in props]:
            p = _parameter_grammar(fn["name"], name, props.get(name, {}), defs, lit)
            parts.append(p if name in required else xgr.Grammar.union(p, nothing))
        parts.append(lit(f"</{DSML}invoke>\n"))
        invokes.append(xgr.Grammar.concat(*parts))
    call = invokes[0] if len(invokes) == 1 else xgr.Grammar.union(*invokes)
    end = lit(f"</{DSML}tool_calls>")
    block = xgr.Grammar.concat(call, end)
    for _ in range(max_calls - 1):  # no repetition operator on grammars: each further call nests one level
        block = xgr.Grammar.concat(call, xgr.Grammar.union(end, block))
    return block


def _parameter_grammar(tool: str, name: str, schema, defs: dict, lit):
    """One `<parameter name=...>value</parameter>` line of a call, the value under `schema`."""
    import xgrammar as xgr

    schema = {} if schema is True else schema
    if not isinstance(schema, dict):
        raise SchemaError(f"tool {tool!r} parameter {name!r}: its schema must be an object")
    close = lit(f"</{DSML}parameter>\n")
    enum = schema.get("enum")
    is_str = schema.get("type") == "string"
    try:
        raw = lit(f'<{DSML}parameter name="{name}" string="true">')
        if is_str and enum is None and not {"pattern", "format", "const"} & set(schema):
            return xgr.Grammar.concat(raw, xgr.Grammar.from_ebnf("root ::= [^<｜]*"), close)
        if is_str and isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
            return xgr.Grammar.concat(raw, xgr.Grammar.from_ebnf("root ::= " + " | ".join(_lit(v) for v in enum)),
                                      close)
        if isinstance(enum, list) and "type" in schema:  # both apply; xgrammar would take any enum member
            schema = {**schema, "enum": [v for v in enum if _is_type(v, schema["type"])]}
        # compact JSON: free whitespace let a weak model pad an argument with blanks until max_tokens
        value = xgr.Grammar.from_json_schema(json.dumps({**schema, **defs}), any_whitespace=False)
    except Exception as e:  # xgrammar's own message (less its source location) names the problem
        why = re.sub(r"^\[[^]]*\] \S+:\d+: ", "", str(e).strip().splitlines()[-1])
        raise SchemaError(f"tool {tool!r} parameter {name!r}: unsupported schema ({why})") from None
    return xgr.Grammar.concat(lit(f'<{DSML}parameter name="{name}" string="false">'), value, close)


_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "null": type(None),
          "object": dict, "array": list}


def _is_type(value, types) -> bool:
    """Whether a JSON value has one of the JSON Schema `types` (a name or a list of names)."""
    types = types if isinstance(types, list) else [types]
    return any(isinstance(value, _TYPES.get(t, ())) and not (isinstance(value, bool) and t in ("integer", "number"))
               for t in types)


class GrammarConstraint:
    """Masks every sampled token to a compiled xgrammar grammar; starts after `start_after` if given.

    ban_spelled_markers: at steps where the grammar admits a special marker token, forbid the byte
    pieces of the markers' fullwidth bar, so DSML tags can only come out as the special token (the
    output parser only honours that form)."""

    def __init__(self, tokenizer, eos: int, grammar, start_after: int | None = None, ban_spelled_markers=True,
                 reply_reserve: int = 16):
        import xgrammar as xgr

        self.vocab = vocab_for(tokenizer, eos)
        compiled = grammar if isinstance(grammar, xgr.CompiledGrammar) else self.vocab.compiler.compile_grammar(grammar)
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, self.vocab.V)
        self.start_after = start_after
        self.active = start_after is None
        self.ban = ban_spelled_markers
        self.path = []  # a way to finish from the matcher's state (`steer`), when known
        self.shortest = len(self.finishing_path(self.LONGEST))  # the shortest whole reply (about)
        # tokens kept for the constrained reply: the reasoning closes before them
        self.reply_reserve = max(reply_reserve, self.shortest + self.SLACK) if start_after is not None else 0
        self.horizon = None  # from this many tokens left, the way to finish is checked at every step
        self.openers_seen = False  # whether the last step above the horizon allowed an opener

    def mask(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        """logits [V] -> a new tensor with the tokens the grammar forbids at -inf.

        Before `start_after` (the reasoning): no end of sequence and no DSML marker (the output parser takes
        a DSML block in the reasoning for a call, to any name and under no schema, and drops the constrained
        reply after it); `start_after` is forced once only reply_reserve tokens remain, so the constrained
        reply always gets its turn."""
        if not self.active:
            out = logits.clone()
            out[self.vocab.eos] = float("-inf")
            if self.vocab.dsml is not None:
                out[self.vocab.dsml] = float("-inf")
            if remaining <= self.reply_reserve:
                out.fill_(float("-inf"))
                out[self.start_after] = 0.0
            return out
        import xgrammar as xgr

        self.matcher.fill_next_token_bitmask(self.bitmask)
        row = logits[: self.vocab.V].clone()[None].float()
        xgr.apply_token_bitmask_inplace(row, self.bitmask)
        if self.ban and torch.isfinite(row[0][self.vocab.markers]).any():
            row[0][self.vocab.bar_bytes] = float("-inf")
        self.steer(row[0], remaining)
        out = torch.full_like(logits, float("-inf"), dtype=torch.float32)
        out[: self.vocab.V] = row[0]
        return out

    HORIZON = 96  # checks begin this many tokens before the way to finish needs the rest
    SLACK = 8  # tokens kept in hand: one token can lengthen the way to finish (opening a string)
    LONGEST = 4096  # finishing paths are looked for up to this length

    def steer(self, row: torch.Tensor, remaining: int) -> None:
        """Narrow the allowed tokens (row [V], in place) so the output finishes within `remaining` tokens: once
        the way to finish (`finishing_path`) needs nearly all of them, its next token is the only one left;
        a token that opens another call or a DSML block is allowed only where that would still finish.
        Output that may simply stop (free text: the way to finish is the end of sequence alone) may stop."""
        if self.horizon is None:  # at the start and after each DSML marker (a call or a parameter begins)
            self.horizon = self.HORIZON + len(self.finishing_path(self.LONGEST))
        if remaining > self.horizon:
            # where openers become allowed (after a value closes, say), the horizon also covers the way to finish
            # through each of them: an optional parameter's shortest value may be longer than the rest of the call
            allowed = [ids[torch.isfinite(row[ids])] for ids in self.vocab.opener_ids]  # a few ids, every token
            allowed = [ids for ids in allowed if len(ids)]
            if allowed and not self.openers_seen:
                for ids in allowed:
                    probe = self.matcher.fork()
                    probe.accept_token(int(ids[0]))
                    self.horizon = max(self.horizon, self.HORIZON + 1 + len(self.finishing_path(self.LONGEST, probe)))
            self.openers_seen = bool(allowed)
            if remaining > self.horizon:
                return
        if not self.path:  # else the model took the path's first token: the rest still finishes (~0.2 ms a token)
            self.path = self.finishing_path(remaining + 1)
        for opener in self.vocab.openers:
            cand = opener & torch.isfinite(row)
            if cand.any():
                probe = self.matcher.fork()
                probe.accept_token(int(cand.nonzero()[0]))
                if 1 + len(self.finishing_path(remaining, probe)) + self.SLACK > remaining:
                    row[cand] = float("-inf")
        path = self.path
        if path != [self.vocab.eos] and len(path) + self.SLACK >= remaining:
            keep = row[path[0]].clone()
            row.fill_(float("-inf"))
            row[path[0]] = keep if torch.isfinite(keep) else 0.0

    def finishing_path(self, limit: int, matcher=None) -> list:
        """A short token path (at most `limit` tokens) from the matcher's state to the end of the output: at
        each step the end of sequence if allowed, else the `</` of a DSML end tag where the tag follows it
        (it ends a raw string parameter, where quotes are text, or the block where another call could
        start), else the first token of the grammar's forced text, else a token that closes something (a
        quote, a bracket) or a short value."""
        import xgrammar as xgr

        v, m, path = self.vocab, (matcher or self.matcher).fork(), []
        while len(path) < limit and not m.is_terminated():
            m.fill_next_token_bitmask(self.bitmask)
            allowed = torch.zeros(1, v.V)
            xgr.apply_token_bitmask_inplace(allowed, self.bitmask)
            allowed = torch.isfinite(allowed[0])
            if self.ban and allowed[v.markers].any():
                allowed &= ~v.bar_bytes
            token = v.eos if allowed[v.eos] else None
            for tag in (allowed & starts for starts in v.tag_starts):
                if token is None and tag.any():
                    probe = m.fork()
                    probe.accept_token(int(tag.nonzero()[0]))
                    token = int(tag.nonzero()[0]) if probe.find_jump_forward_string() else None
            if token is None and (forced := m.find_jump_forward_string()):
                ids = v.tokenizer.encode(forced, add_special_tokens=False).ids
                token = ids[0] if ids and allowed[ids[0]] else None
            for prio in v.inside + v.outside + [allowed]:
                if token is not None:
                    break
                cand = (allowed & prio).nonzero()
                token = int(cand[0]) if len(cand) else None
            if token is None:
                break  # nothing allowed (cannot happen after a valid prefix)
            m.accept_token(token)
            path.append(token)
        return path

    def accept(self, token: int) -> None:
        if not self.active:
            self.active = token == self.start_after
            return
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} violates the output grammar")
        self.path = self.path[1:] if self.path and self.path[0] == token else []
        if token in self.vocab.marker_ids:  # a call or a parameter begins: its way to finish may be long
            self.horizon, self.openers_seen = None, False
        self.accepted(token)

    def accepted(self, token: int) -> None:
        """Hook: track state after an accepted token."""


class JSONObjectConstraint(GrammarConstraint):
    """A JSON object that always closes before the token budget runs out."""

    def __init__(self, tokenizer, eos: int, start_after: int | None = None, schema: str = '{"type": "object"}'):
        vocab = vocab_for(tokenizer, eos)
        super().__init__(tokenizer, eos, vocab.compiler.compile_json_schema(schema), start_after,
                         ban_spelled_markers=False)
        self.shortest = len(tokenizer.encode("{}", add_special_tokens=False).ids) + 1  # {} and the end
        self.depth = 0  # unclosed { and [ outside strings
        self.in_string = False
        self.owed = 0  # characters an escape in the current string still needs (\uXXXX: up to 5 after the \\)

    ESCAPE = 6  # the longest escape, \uXXXX

    def steer(self, row: torch.Tensor, remaining: int) -> None:
        if remaining > self.depth + 4 + self.owed + self.ESCAPE:
            return
        if self.in_string and not self.owed:  # no new escape: it might not finish in time
            row[self.vocab.backslash] = float("-inf")
        if remaining > self.depth + 4 + self.owed:
            return
        allowed = torch.isfinite(row)
        for prio in (self.vocab.inside if self.in_string else []) + self.vocab.outside:
            cand = allowed & prio
            if cand.any():
                row[~cand] = float("-inf")
                return

    def accepted(self, token: int) -> None:
        for ch in self.vocab.texts[token]:
            if self.in_string:
                if self.owed == 5:  # the character after a backslash: 'u' owes four hex digits more
                    self.owed = 4 if ch == "u" else 0
                elif self.owed:
                    self.owed -= 1
                elif ch == "\\":
                    self.owed = 5
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
