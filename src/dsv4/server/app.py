"""DeepSeek-compatible HTTP API over the engine: OpenAI Chat Completions, Anthropic Messages and FIM completions.

deepseek-recipe converts each request (validation, DeepSeek's thinking / tool / passback rules,
errors in DeepSeek's shapes), renders and encodes the V4 prompt, and turns the engine's token
stream into protocol chunks; this module is the transport: auth, limits, queueing, SSE.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import re
import sys
import time
import uuid
from dataclasses import dataclass, field

import deepseek_recipe as dr
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from ..engine.async_engine import AsyncLLM
from ..engine.constrain import SchemaError
from ..engine.sampling import RequestError, SamplingParams

MODEL_NAMES = ("deepseek-v4-flash", "deepseek-v4-pro", "deepseek-chat", "deepseek-reasoner")
DEFAULT_PRICES = {"deepseek-v4-flash": (0.0028, 0.14, 0.28), "deepseek-v4-pro": (0.003625, 0.435, 0.87),
                  "deepseek-chat": (0.0028, 0.14, 0.28), "deepseek-reasoner": (0.0028, 0.14, 0.28)}


@dataclass
class ServerConfig:
    served_model_name: str = "deepseek-v4-flash"
    api_keys: list = field(default_factory=list)  # empty: no authentication
    max_body_bytes: int = 8 << 20
    max_concurrency: int = 64
    keepalive_seconds: float = 5.0
    # USD per 1M tokens: (cache hit, cache miss, output); DeepSeek's published V4 prices from 2026-05-22
    prices: dict = field(default_factory=lambda: dict(DEFAULT_PRICES))
    # each account's (API key's) balance in USD, spent at those prices; None: no balance, nothing refused
    balance_usd: float | None = None


def error(status: int, message: str, kind: str = "invalid_request_error", code: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    # busy (429, 503): the SDKs' retries wait as long as Retry-After says
    return JSONResponse(body, status_code=status, headers={"Retry-After": "1"} if status in (429, 503) else None)


ANTHROPIC_PREFIXES = ("/anthropic", "/v1/messages")  # DeepSeek's Anthropic base URL; Messages from the root
# Anthropic's error types by status (its SDK raises the matching exception class)
ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    402: "billing_error", 404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error",
                    429: "rate_limit_error", 503: "overloaded_error"}


def shaped(request: Request, response: JSONResponse) -> JSONResponse:
    """An error response in the shape of the caller's protocol: DeepSeek / OpenAI's
    {"error": {message, type, param, code}}, or on the Anthropic routes {"type": "error", "error": {type, message}}:
    any path under /anthropic (an unknown one too, e.g. the SDK's count_tokens) and /v1/messages."""
    path = request.url.path
    if not any(path == p or path.startswith(p + "/") for p in ANTHROPIC_PREFIXES):
        return response
    message = json.loads(response.body)["error"]["message"]
    # another client error (405 wrong method, ...) is the caller's mistake; api_error is Anthropic's own failure
    kind = ANTHROPIC_ERRORS.get(response.status_code, "invalid_request_error" if response.status_code < 500
                                else "api_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}},
                        status_code=response.status_code,
                        headers={k: v for k, v in response.headers.items() if k.lower() == "retry-after"})


def _drop_finishing_eos(out, eos: int) -> None:
    """Drop a final end-of-sequence token from a stream delta (in place): that token is the finish, not output."""
    if out.finished and out.finish_reason == "stop" and out.token_ids and out.token_ids[-1] == eos:
        out.token_ids = out.token_ids[:-1]
        out.logprobs = out.logprobs[:-1] if out.logprobs is not None else None


@dataclass
class _Tally:
    completion: int = 0  # completion tokens the response reports (and the bill counts)

    def count(self, out, eos: int) -> None:
        """Count a stream delta's tokens, less a final end-of-sequence token (dropped from it)."""
        _drop_finishing_eos(out, eos)
        self.completion += len(out.token_ids)


class _WholeCharacters:
    """The output parser's input from the engine's deltas: token runs that end on a whole character.

    The parser holds back a run whose text ends inside a UTF-8 sequence until a later run completes it, and
    drops it, text and tokens, if none does: a reply cut by max_tokens in the middle of a character lost its
    last run (a token, or a whole multi-token delta), and the response reported fewer tokens than were
    generated and billed. Here such tokens wait for the one that completes their character; what is left at
    the end goes to the parser as text that accounts for its tokens (U+FFFD, as the tokenizer decodes it)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=False)  # the parser reads special tokens (DSML, </think>)
        self.ids, self.logprobs = [], []  # tokens of a character not whole yet, and their logprobs

    def inputs(self, out):
        """Yield (parser input, the tokens it accounts for) for a delta (its end of sequence dropped): the held
        tokens and the delta's, up to the last whole character; after the last delta, the rest as text."""
        ids = self.ids + out.token_ids
        logprobs = None if out.logprobs is None else self.logprobs + out.logprobs
        whole = len(self.ids)
        for i in range(len(self.ids), len(ids)):
            if self.stream.step(self.tokenizer, ids[i]) is not None:  # None while a character is incomplete
                whole = i + 1
        self.ids, self.logprobs = ids[whole:], [] if logprobs is None else logprobs[whole:]
        if whole:
            lps = None if logprobs is None else [(lp.logprob, lp.top) for lp in logprobs[:whole]]
            yield dr.InferenceChunk.tokens(ids[:whole], lps), whole
        if out.finished and self.ids:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
            yield dr.InferenceChunk.text(text, len(self.ids)), len(self.ids)


class _Reject(Exception):
    def __init__(self, response):
        self.response = response


class _Overloaded(RuntimeError):
    """The engine could not take the request (its decode state exceeds the memory budget)."""


def _raise_if_failed(reason: str | None) -> None:
    """An engine finish that is a failure raises: over the memory budget -> _Overloaded (503), else RuntimeError."""
    if reason and reason.startswith("error: exceeds"):
        raise _Overloaded(reason[len("error: "):])
    if reason and reason.startswith(("error", "abort")):
        raise RuntimeError(reason)


def create_app(llm: AsyncLLM, tokenizer_file: str, config: ServerConfig | None = None) -> FastAPI:
    cfg = config or ServerConfig()
    # with API keys, every route but /health needs one: FastAPI's own /docs, /redoc and /openapi.json would not
    hidden = {"docs_url": None, "redoc_url": None, "openapi_url": None} if cfg.api_keys else {}
    app = FastAPI(title="dsv4", description="DeepSeek-compatible API served by dsv4", **hidden)
    recipe_tok = dr.Tokenizer.from_file(str(tokenizer_file))
    plain = Tokenizer.from_file(str(tokenizer_file))
    plain.encode_special_tokens = True  # user text is text: a special token's spelling stays characters
    encoding = dr.DeepseekV4Encoding().with_tokenizer(recipe_tok)
    # DeepSeek's rule: in thinking mode, reasoning_content of tool-call turns must be passed back (else 400)
    options = dr.ConversionOptions(reasoning_content_behavior=dr.ReasoningContentBehavior.Reject)
    for name in set(MODEL_NAMES) | {cfg.served_model_name}:
        options = options.with_model_alias(name, dr.ModelVersion.DeepseekV4Pro)
    engine = llm.engine
    state = {"active": 0, "requests": 0, "errors": 0}

    def authorize(request: Request) -> str:
        """-> the caller's account: a short hash of its API key (keys are never stored or logged)."""
        if not cfg.api_keys:
            return "anonymous"
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        ok = False
        for k in cfg.api_keys:  # every key compared, in constant time
            ok |= hmac.compare_digest(key.encode(), k.encode())
        if not ok:
            shown = f"****{key[-4:]}" if len(key) >= 4 else "****"
            raise _Reject(error(401, f"Authentication Fails, Your api key: {shown} is invalid",
                                "authentication_error", "invalid_request_error"))
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    accounts: dict = {}
    # a name without a price (a custom --served-model-name; FIM without a model) is billed as the served model,
    # and a served name without one as DeepSeek's V4 Flash: never free by accident
    default_price = cfg.prices.get(cfg.served_model_name,
                                   cfg.prices.get("deepseek-v4-flash", DEFAULT_PRICES["deepseek-v4-flash"]))

    def release(seq, model: str, account: str, prompt_tokens: int, tally: _Tally) -> None:
        """A request is over: free its concurrency slot and bill the caller's account for the tokens its
        response reports."""
        state["active"] -= 1
        hit, out = seq.cached_tokens, tally.completion
        p_hit, p_miss, p_out = cfg.prices.get(model, default_price)
        cost = (hit * p_hit + (prompt_tokens - hit) * p_miss + out * p_out) / 1e6
        a = accounts.setdefault(account, {"requests": 0, "prompt_tokens": 0, "prompt_cache_hit_tokens": 0,
                                          "completion_tokens": 0, "cost_usd": 0.0})
        a["requests"] += 1
        a["prompt_tokens"] += prompt_tokens
        a["prompt_cache_hit_tokens"] += hit
        a["completion_tokens"] += out
        a["cost_usd"] += cost

    @app.get("/usage")
    async def usage(request: Request):
        """The caller's own totals: requests, tokens and cost under the price table."""
        account = authorize(request)
        return {"account": account, **accounts.get(account, {"requests": 0, "cost_usd": 0.0})}

    def remaining(account: str) -> float | None:
        """The account's balance left in USD (None without a configured balance)."""
        if cfg.balance_usd is None:
            return None
        return max(0.0, cfg.balance_usd - accounts.get(account, {}).get("cost_usd", 0.0))

    def funded(request: Request) -> str:
        """authorize(), and 402 once the caller's balance is spent (a request may overdraw it: its cost is
        known only when it ends, as on DeepSeek's platform)."""
        account = authorize(request)
        if remaining(account) == 0.0:
            raise _Reject(error(402, "Insufficient Balance", "unknown_error"))
        return account

    @app.get("/user/balance")
    @app.get("/v1/user/balance")
    async def balance(request: Request):
        """DeepSeek's balance shape (amounts as strings): the caller's balance left, all of it granted.
        Without a configured balance there is nothing to report and nothing is refused."""
        left = remaining(authorize(request))
        if left is None:
            return {"is_available": True, "balance_infos": []}
        return {"is_available": left > 0, "balance_infos": [{"currency": "USD", "total_balance": f"{left:.2f}",
                                                             "granted_balance": f"{left:.2f}",
                                                             "topped_up_balance": "0.00"}]}

    async def read_body(request: Request) -> bytes:
        """The body, refused (413) as soon as it passes the size cap: a chunked upload without a
        Content-Length is counted as it arrives, never held whole first."""
        too_big = _Reject(error(413, f"Request body exceeds {cfg.max_body_bytes} bytes"))
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
            raise too_big
        parts, n = [], 0
        async for part in request.stream():
            n += len(part)
            if n > cfg.max_body_bytes:
                raise too_big
            parts.append(part)
        return b"".join(parts)

    @app.exception_handler(_Reject)
    async def _rejected(request, exc: _Reject):
        return shaped(request, exc.response)

    @app.exception_handler(_Disconnected)
    async def _gone(request, exc: _Disconnected):  # nobody reads it: nginx's "client closed request"
        return Response(status_code=499)

    @app.exception_handler(_Overloaded)
    async def _overloaded(request, exc: _Overloaded):
        state["errors"] += 1
        return shaped(request, error(503, f"Server overloaded: {exc}", "server_overloaded", "server_overloaded"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):  # unknown path, wrong method: the API's error shape
        return shaped(request, error(exc.status_code, str(exc.detail), "invalid_request_error", "not_found"
                                     if exc.status_code == 404 else "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # never a traceback to the client
        state["errors"] += 1
        return shaped(request, error(500, "Internal server error", "internal_error", "internal_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting)}

    @app.get("/models")
    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        names = [cfg.served_model_name] + [n for n in MODEL_NAMES if n != cfg.served_model_name]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "deepseek"} for n in names]}

    @app.post("/chat/completions")
    @app.post("/v1/chat/completions")
    @app.post("/beta/chat/completions")
    async def chat(request: Request):
        return await complete(request, CHAT)

    @app.post("/anthropic/v1/messages")
    @app.post("/v1/messages")
    async def messages(request: Request):
        return await complete(request, MESSAGES)

    @app.post("/beta/completions")
    @app.post("/completions")
    @app.post("/v1/completions")
    async def completions(request: Request):
        account = funded(request)
        body = _json(await read_body(request))
        try:
            r = fim_request(body, request.url.path, plain, cfg.served_model_name)
        except RequestError as e:
            return error(422 if "parameter" in str(e) else 400, str(e))
        return await run_text(_user_id(body.get("user_id")), r, account, request)

    @app.get("/metrics")
    async def metrics(request: Request):
        """Prometheus text; with API keys configured it needs one (it lists every account's cost)."""
        authorize(request)
        lines = [
            "# TYPE dsv4_requests_total counter", f"dsv4_requests_total {state['requests']}",
            "# TYPE dsv4_requests_active gauge", f"dsv4_requests_active {state['active']}",
            "# TYPE dsv4_errors_total counter", f"dsv4_errors_total {state['errors']}",
            "# TYPE dsv4_running_sequences gauge", f"dsv4_running_sequences {len(engine.running)}",
            "# TYPE dsv4_waiting_sequences gauge", f"dsv4_waiting_sequences {len(engine.waiting)}",
            "# TYPE dsv4_prompt_tokens_total counter", f"dsv4_prompt_tokens_total {engine.stats['prompt_tokens']}",
            "# TYPE dsv4_prompt_cache_hit_tokens_total counter",
            f"dsv4_prompt_cache_hit_tokens_total {engine.stats['cached_tokens']}",
            "# TYPE dsv4_engine_steps_total counter", f"dsv4_engine_steps_total {engine.stats['steps']}",
            "# TYPE dsv4_draft_tokens_proposed_total counter",  # MTP speculation: acceptance = accepted / proposed
            f"dsv4_draft_tokens_proposed_total {engine.stats['proposed']}",
            "# TYPE dsv4_draft_tokens_accepted_total counter",
            f"dsv4_draft_tokens_accepted_total {engine.stats['accepted']}",
            "# TYPE dsv4_cost_usd_total counter",
        ] + [f'dsv4_cost_usd_total{{account="{a}"}} {v["cost_usd"]:.9f}' for a, v in accounts.items()]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def admit(ids, params, user, constraint=None):
        if state["active"] >= cfg.max_concurrency:
            raise _Reject(error(429, "Rate limit reached: too many concurrent requests", "rate_limit_error",
                                "rate_limit_exceeded"))
        if engine.estimate_bytes(len(ids) + params.max_tokens) > engine.cfg.kv_budget_bytes:
            # the engine would refuse it once scheduled; known now, a stream gets its 503 before its 200
            raise _Overloaded("exceeds the decode-state memory budget")
        try:
            seq, queue = llm.submit(ids, params, user=user, constraint=constraint)
        except RequestError as e:
            raise _Reject(error(400, str(e))) from None
        state["active"] += 1
        state["requests"] += 1
        return seq, queue

    async def complete(request: Request, proto: "_Protocol"):
        account = funded(request)
        body = await read_body(request)
        try:
            d = proto.prepare(body)
            req = proto.request(d)
            meta = d.get("metadata")
            user = (_user_id(d.get("user_id")) if proto is CHAT else
                    _metadata_user_id(meta.get("user_id") if isinstance(meta, dict) else None))
            model = req.model
            _check_tools_and_format(d)
            conv = req.convert(options)
        except dr.ConversionError as e:
            return shaped(request, Response(e.body, status_code=e.status_code, media_type="application/json"))
        except (ValueError, TypeError, RecursionError) as e:  # RecursionError: nested past the recipe's 128 levels
            raise _Reject(error(400, f"Invalid request: {e}")) from None
        ids = encoding.encode(conv.conversation)
        app.state.last_prompt_ids = ids  # what the model is fed (inspected by tests and debugging)
        try:
            max_tokens = conv.resolve_max_tokens(len(ids), engine.max_len)
        except dr.ConversionError as e:
            return shaped(request, Response(e.body, status_code=e.status_code, media_type="application/json"))
        io, po = conv.inference_options, conv.parsing_options
        required = proto is MESSAGES and _tool_choice_any(d)
        fmt = d.get("response_format")
        json_mode = proto is CHAT and isinstance(fmt, dict) and fmt.get("type") == "json_object"
        try:
            constraint = _constraint(io.output_constraint, conv, po, engine, d.get("tools"), required, json_mode)
        except SchemaError as e:
            raise _Reject(error(400, f"Invalid request: {e}")) from None
        # Stop sequences end free text, never the reasoning or a constrained answer (a JSON object, a forced call),
        # which they would cut into one that does not parse. The output parser matches them in the answer's text
        # but not inside a DSML tool-call block (tool_choice auto); an answer constrained throughout gets none.
        # The engine's stop check sees the whole output: it applies them only where all of it is free text.
        if constraint is not None and (io.output_constraint.kind != "tool_call" or required or json_mode):
            po.stop_sequences = []
        all_free = constraint is None and not conv.conversation.thinking_mode
        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if io.temperature is None else io.temperature,
                top_p=1.0 if io.top_p is None else io.top_p, seed=io.seed,
                logprobs=(io.top_logprobs or 0) if io.logprobs else None,
                stop=list(po.stop_sequences) if all_free else [])
        except RequestError as e:
            raise _Reject(error(422, str(e))) from None
        # the shortest constrained answer (a JSON object, a forced call; less its end of sequence, plus
        # </think> after reasoning): with fewer tokens it would be empty or cut
        need = constraint.shortest - 1 + int(constraint.start_after is not None) if constraint is not None else 0
        if max_tokens < need:
            forced = required or io.output_constraint.kind == "tool_call_required"
            what = "the tool call it asks for" if forced else "a JSON answer"
            raise _Reject(error(400, f"Invalid request: max_tokens {max_tokens} is too small for {what}, "
                                     f"which needs at least {need} tokens"))
        seq, queue = admit(ids, params, user, constraint)
        rid = proto.new_id()
        processor = dr.StreamProcessor(proto.generator(conv, rid, model), po, recipe_tok)
        tally = _Tally()
        chunks = _chunks(llm, seq, queue, processor, len(ids), cfg.keepalive_seconds, tally)
        done = functools.partial(release, seq, model, account, len(ids), tally)
        if conv.stream:
            return StreamingResponse(_sse(chunks, done, proto), media_type="text/event-stream")

        async def answer():
            response = None
            try:
                async for item in chunks:
                    if item is None:
                        yield None
                        continue
                    if response is None:
                        response = proto.response(rid, model, int(time.time()), len(ids), seq.cached_tokens)
                    response.accumulate(item)
            finally:
                done()
            yield response.to_json()

        return await _answer(request, answer())

    async def run_text(user, r: _TextRequest, account, request: Request):
        seq, queue = admit(r.ids, r.params, user)
        tally = _Tally()
        done = functools.partial(release, seq, r.model, account, len(r.ids), tally)
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        chunks = _with_keepalive(llm.stream(seq, queue), cfg.keepalive_seconds)
        tokenizer = engine.tokenizer
        offset = [0]  # characters of text sent so far (the echoed prompt included)

        def usage():
            n = tally.completion
            return {"prompt_tokens": len(r.ids), "completion_tokens": n, "total_tokens": len(r.ids) + n,
                    "prompt_cache_hit_tokens": seq.cached_tokens,
                    "prompt_cache_miss_tokens": len(r.ids) - seq.cached_tokens,
                    "prompt_tokens_details": {"cached_tokens": seq.cached_tokens}}

        def logprobs(out, text):
            """OpenAI completions logprobs of one delta: each token's text, logprob, top alternatives
            (token text -> logprob; the sampled token always among them, as DeepSeek documents: up to
            logprobs + 1) and the offset of its first character in the response text."""
            if out.logprobs is None:
                return None
            res = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            at = offset[0]
            for lp in out.logprobs:
                piece = tokenizer.decode([lp.token_id], skip_special_tokens=False)
                res["tokens"].append(piece)
                res["token_logprobs"].append(lp.logprob)
                top = dict(lp.top)
                top.setdefault(lp.token_id, lp.logprob)
                res["top_logprobs"].append({tokenizer.decode([t], skip_special_tokens=False): v
                                            for t, v in top.items()})
                res["text_offset"].append(min(at, offset[0] + len(text)))
                at += len(piece)
            return res

        def choice(out, reason, head=""):
            text = head + out.text
            body = {"text": text, "index": 0, "logprobs": logprobs(out, text), "finish_reason": reason}
            offset[0] += len(text)
            return body

        def accept(out):
            """Count the delta's tokens (the end-of-sequence token is the finish, not output) -> finish reason."""
            tally.count(out, engine.eos)
            if out.finished:
                _raise_if_failed(out.finish_reason)
            return out.finish_reason if out.finished else None

        if r.stream:
            async def events():
                head = r.echo
                # include_usage, as DeepSeek documents it: `usage: null` on every chunk, then one more chunk
                # with no choices and the usage before [DONE]
                null_usage = {"usage": None} if r.include_usage else {}
                try:
                    async for out in chunks:
                        if out is None:
                            yield ": keep-alive\n\n"
                            continue
                        reason = accept(out)
                        body = {"id": rid, "object": "text_completion", "created": created, "model": r.model,
                                "choices": [choice(out, reason, head)], **null_usage}
                        head = ""
                        yield f"data: {json.dumps(body)}\n\n"
                    if r.include_usage:
                        body = {"id": rid, "object": "text_completion", "created": created, "model": r.model,
                                "choices": [], "usage": usage()}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                except Exception as e:
                    yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'internal_error'}})}\n\n"
                finally:
                    done()
            return StreamingResponse(events(), media_type="text/event-stream")

        async def answer():
            parts, reason = [], None
            try:
                async for out in chunks:
                    if out is None:
                        yield None
                        continue
                    reason = accept(out) or reason
                    parts.append(out)
            finally:
                done()
            whole = parts[-1]
            whole.token_ids = [t for p in parts for t in p.token_ids]
            whole.text = "".join(p.text for p in parts)
            whole.logprobs = None if whole.logprobs is None else [lp for p in parts for lp in p.logprobs]
            yield json.dumps({"id": rid, "object": "text_completion", "created": created, "model": r.model,
                              "choices": [choice(whole, reason, r.echo)], "usage": usage()})

        return await _answer(request, answer())

    app.state.llm = llm
    app.state.stats = state
    return app


async def _chunks(llm: AsyncLLM, seq, queue, processor, prompt_tokens: int, keepalive: float, tally: _Tally):
    """Protocol chunks of one request; None while it still waits in the queue (for keep-alives).
    `tally` counts the tokens handed to the processor: the completion tokens the response reports."""
    ready = False
    whole = _WholeCharacters(llm.engine.tokenizer)
    try:
        async for out in _with_keepalive(llm.stream(seq, queue), keepalive):
            if out is None:
                yield None
                continue
            if not ready:  # cache hits are known once the request is admitted
                ready = True
                usage = dr.PromptUsage(prompt_tokens=prompt_tokens, prompt_cache_hit_tokens=seq.cached_tokens)
                for c in processor.push(dr.InferenceChunk.ready(prompt_usage=usage)):
                    yield c
            _drop_finishing_eos(out, llm.engine.eos)
            for inference, n in whole.inputs(out):
                tally.completion += n
                for c in processor.push(inference):
                    yield c
                if processor.finished:  # the parser met a stop sequence: the answer is complete
                    return
            if out.finished:
                _raise_if_failed(out.finish_reason)
                reason = dr.InferenceFinishReason.Length if out.finish_reason == "length" \
                    else dr.InferenceFinishReason.Stop
                for c in processor.push(dr.InferenceChunk.finish(reason)):
                    yield c
                for c in processor.finish():
                    yield c
    finally:
        if not processor.finished:
            processor.close()


class _Disconnected(Exception):
    """The client closed the connection before its (non-streamed) response was ready."""


async def _unless_disconnected(request: Request, work):
    """Await the coroutine `work`, cancelling it if the client disconnects first (its stream then aborts
    the request and frees its decode state, as a closed stream does)."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise _Disconnected
    return task.result()


async def _answer(request: Request, parts) -> Response:
    """A non-streamed response from `parts`: None for each keep-alive interval the request waits with nothing
    new (queued, or in a long prefill: where a stream gets `: keep-alive`), then its JSON.

    As DeepSeek's API does, a request that waits gets a blank line per interval, which JSON parsers (the SDKs'
    too) skip before the body. The first one fixes the status at 200, so they start only once the request has
    waited an interval: what is decided before keeps its status (the 4xx checks, 429 and 503 at admission, an
    engine failure of a request that never waited). What can still fail after it is the server's side (an engine
    step failing, a shutdown): the body then ends in the protocol's error object and the connection is closed
    without finishing the response, so that no client takes it for an answer: the SDKs raise a connection error
    (after their retries, as for a 500), a raw client sees the error object and a cut transfer."""
    step = functools.partial(_unless_disconnected, request)
    try:
        first = await step(anext(parts))
    except BaseException:
        await _close(parts)
        raise
    if first is not None:
        return Response(first, media_type="application/json")

    async def blank_lines_then_json():
        try:
            yield "\n"
            while (part := await step(anext(parts))) is None:
                yield "\n"
            yield part
        except _Disconnected:
            return
        except Exception:
            yield shaped(request, error(500, "Internal server error", "internal_error", "internal_error")).body
            raise  # uvicorn closes the connection mid-response
        finally:  # also when the client left between blank lines: the request ends now
            await _close(parts)

    return StreamingResponse(blank_lines_then_json(), media_type="application/json")


async def _close(agen) -> None:
    """aclose() an async generator, unless a cancelled step of it is still unwinding (it then ends by itself)."""
    if not agen.ag_running:
        await agen.aclose()


async def _with_keepalive(stream, seconds: float):
    """Re-yield `stream`, inserting None whenever nothing arrived for `seconds`."""
    it = stream.__aiter__()
    pending = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=seconds)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(it.__anext__())
    finally:
        if not pending.done():  # let the cancelled step finish first: aclose() on a running generator raises
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        await it.aclose()


async def _sse(chunks, done, proto: "_Protocol"):
    try:
        async for c in chunks:
            if c is None:
                yield ": keep-alive\n\n"
                continue
            name = proto.response.sse_event_name(c)
            yield (f"event: {name}\n" if name else "") + f"data: {c.to_json()}\n\n"
        final = proto.response.sse_done_data()
        if final:
            yield f"data: {final}\n\n"
    except Exception as e:  # mid-stream failure: an error event in the protocol's framing, never a traceback
        if proto is MESSAGES:  # Anthropic: a named `error` event, which the SDK raises
            body = {"type": "error", "error": {"type": "api_error", "message": str(e)}}
            yield f"event: error\ndata: {json.dumps(body)}\n\n"
        else:
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'internal_error'}})}\n\n"
    finally:
        done()


@dataclass
class _Protocol:
    request: type
    response: type
    generator: object  # (conversation request, id, model) -> chunk generator
    prepare: object  # raw body -> body for the request class
    id_prefix: str

    def new_id(self) -> str:
        return f"{self.id_prefix}{uuid.uuid4().hex}"


def _json(body: bytes) -> dict:
    try:
        d = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Reject(error(400, f"Invalid request: body is not valid JSON ({e})")) from None
    except RecursionError:  # arrays or objects nested past Python's recursion limit (~1000 levels: 2 KB)
        raise _Reject(error(400, "Invalid request: body is nested too deeply")) from None
    except ValueError:  # the only other: an integer past Python's digit limit for int conversion
        raise _Reject(error(400, f"Invalid request: body has an integer of more than "
                                 f"{sys.get_int_max_str_digits()} digits")) from None
    if not isinstance(d, dict):
        raise _Reject(error(400, "Invalid request: body must be a JSON object"))
    return d


def _check_tools_and_format(d: dict) -> None:
    """api.md section 2's limits deepseek-recipe does not check: at most 128 tools, names of at most 64
    characters, `response_format` text or json_object only (the recipe also converts json_schema and regex,
    which DeepSeek's API does not offer: regex was accepted and then neither enforced nor refused)."""
    tools = d.get("tools")
    if isinstance(tools, list):
        if len(tools) > 128:
            raise _Reject(error(400, f"Invalid request: at most 128 tools are supported (got {len(tools)})"))
        for t in tools:
            fn = t.get("function", t) if isinstance(t, dict) else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if isinstance(name, str) and len(name) > 64:
                raise _Reject(error(400, f"Invalid request: tool name {name[:16]!r}... is longer than 64 characters"))
    fmt = d.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("json_schema", "regex"):
        raise _Reject(error(400, f"Invalid request: response_format type {kind!r} is not supported (only 'text' "
                                 "and 'json_object'); for JSON use 'json_object' and describe the fields in the "
                                 "prompt"))


def _user_id(user):
    """The request's end-user id (chat and FIM: `user_id`; Messages: `metadata.user_id`), which scopes
    context-cache hits when the engine isolates users; None when absent."""
    if user is None:
        return None
    if not (isinstance(user, str) and len(user) <= 512 and re.fullmatch(r"[A-Za-z0-9_-]+", user)):
        raise _Reject(error(400, "Invalid request: user_id must be 1-512 characters of [a-zA-Z0-9_-]"))
    return user


def _metadata_user_id(user):
    """Messages' `metadata.user_id`: Anthropic allows any string there (a UUID, a hash, an e-mail address), so
    any string of 1-512 characters scopes cache hits as `user_id` does; None when absent."""
    if user is None:
        return None
    if not (isinstance(user, str) and 0 < len(user) <= 512):
        raise _Reject(error(400, "Invalid request: metadata.user_id must be a string of 1-512 characters"))
    return user


def _claude_names(body: bytes):
    """Anthropic side: claude-opus* -> deepseek-v4-pro, other claude-* -> deepseek-v4-flash; '[1m]' suffixes dropped;
    deepseek-chat / deepseek-reasoner select the thinking mode as on the Chat side."""
    d = _chat_aliases(body)
    model = d.get("model")
    if isinstance(model, str):
        name = model.split("[")[0]
        if name.startswith("claude-opus"):
            name = "deepseek-v4-pro"
        elif name.startswith("claude"):
            name = "deepseek-v4-flash"
        d["model"] = name
    return d


def _chat_aliases(body: bytes):
    """deepseek-chat / deepseek-reasoner: V4 with thinking off / on unless the request says otherwise."""
    d = _json(body)
    mode = {"deepseek-chat": "disabled", "deepseek-reasoner": "enabled"}.get(d.get("model"))
    if mode and "thinking" not in d:
        d["thinking"] = {"type": mode}
    return d


CHAT = _Protocol(dr.ChatCompletionRequest, dr.ChatCompletionResponse, dr.ChatCompletionRequest.chunk_generator,
                 _chat_aliases, "chatcmpl-")
MESSAGES = _Protocol(dr.MessagesRequest, dr.MessagesResponse,
                     lambda conv, rid, model: dr.MessagesChunkGenerator(rid, model, conv.conversation.thinking_mode),
                     _claude_names, "msg_")

FIM_MAX_TOKENS = 4096


@dataclass
class _TextRequest:
    """A validated FIM / plain-completion request."""
    ids: list
    params: SamplingParams
    model: str
    stream: bool
    include_usage: bool
    echo: str  # the prompt text to echo before the completion ("" unless `echo`)


def fim_request(body: dict, path: str, plain, served: str) -> _TextRequest:
    """FIM (`/beta/completions`: prompt + suffix) or plain completion. Non-thinking; at most 4K new tokens.

    `plain`: the tokenizer encoding user text as text (a special token's spelling in a prompt stays
    characters: only the FIM markers this function places are special)."""
    from ..tokenizer import FIM_TOKENS

    # DeepSeek's FIM reference documents the parameters as nullable (echo, max_tokens, temperature, top_p, stream,
    # logprobs, penalties, stop, suffix, stream_options): null is the default, as on the chat route
    body = {k: v for k, v in body.items() if v is not None}
    prompt, suffix = body.get("prompt"), body.get("suffix")
    if not isinstance(prompt, str):
        raise RequestError("'prompt' is required and must be a string")
    if suffix is not None and not isinstance(suffix, str):
        raise RequestError("'suffix' must be a string")
    model = body.get("model", served)
    if model not in MODEL_NAMES + (served,):
        raise RequestError(f"Model Not Exist: {model!r}")

    def check(name, ok, what):
        if not ok:
            raise RequestError(f"invalid parameter '{name}': must be {what} (got {body.get(name)!r})")

    max_tokens = body.get("max_tokens", 16)
    check("max_tokens", type(max_tokens) is int and 1 <= max_tokens <= FIM_MAX_TOKENS,
          f"an integer in [1, {FIM_MAX_TOKENS}]")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    check("stop", isinstance(stop, list) and len(stop) <= 16, "a string or a list of at most 16 strings")
    temperature = body.get("temperature", 1.0)
    check("temperature", type(temperature) in (int, float) and 0 <= temperature <= 2, "a number in [0, 2]")
    lp = body.get("logprobs")
    check("logprobs", lp is None or (type(lp) is int and 0 <= lp <= 20), "an integer in [0, 20]")
    for name in ("stream", "echo"):
        check(name, isinstance(body.get(name, False), bool), "a boolean")
    echo = body.get("echo", False)
    check("echo", not (echo and lp is not None), "false when 'logprobs' is set (prompt logprobs are not supported)")
    options = body.get("stream_options")
    check("stream_options", options is None or (isinstance(options, dict) and body.get("stream") is True),
          "an object, and only with stream: true")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=body.get("top_p", 1.0),
                                stop=stop, seed=body.get("seed"), logprobs=lp,
                                presence_penalty=body.get("presence_penalty", 0.0),
                                frequency_penalty=body.get("frequency_penalty", 0.0))
    except RequestError as e:
        raise RequestError(f"invalid parameter: {e}") from None
    try:
        text = [plain.encode(t).ids for t in (prompt, suffix or "")]
    except Exception:  # e.g. a lone UTF-16 surrogate, which JSON can spell but UTF-8 cannot
        raise RequestError("'prompt' and 'suffix' must be valid Unicode text") from None
    names = [dr.SpecialToken.Bos.default_str(), *FIM_TOKENS]
    special = [plain.token_to_id(t) for t in names]
    if None in special:
        raise RequestError(f"this model's tokenizer has no {names[special.index(None)]} token: it cannot do FIM")
    if suffix is not None or path.startswith("/beta"):
        ids = [special[0], special[1], *text[0], special[2], *text[1], special[3]]
    else:
        ids = [special[0], *text[0]]
    return _TextRequest(ids, params, model, bool(body.get("stream")), bool((options or {}).get("include_usage")),
                        prompt if echo else "")


def _tool_choice_any(d: dict) -> bool:
    choice = d.get("tool_choice")
    return isinstance(choice, dict) and choice.get("type") == "any" and bool(d.get("tools"))


def _constraint(oc, conv, po, engine, request_tools=None, required: bool = False, json_mode: bool = False):
    """The engine-side output constraint for deepseek-recipe's OutputConstraint, or None.

    json: a valid JSON object (after the thinking, if any). tool_call_required (tool_choice required
    or a named function): the DSML tool-call block the prompt opened, under the tools' schemas.
    `request_tools`: the request's own tool list, whose `$defs` the strict conversion drops.
    required: a call is due though the prompt opened no block (Anthropic tool_choice any, which
    deepseek-recipe converts as auto): the answer is the block, opener included.
    json_mode: response_format json_object, which deepseek-recipe drops for tool_choice auto (tool_call):
    the answer is a JSON object or a call."""
    if oc is None:
        return None
    from ..engine.constrain import (GrammarConstraint, JSONObjectConstraint, json_or_tool_call_grammar,
                                    text_or_tool_call_grammar, tool_block_grammar, tool_call_grammar)

    think_end = engine.tokenizer.token_to_id(dr.SpecialToken.ThinkingEnd.default_str())
    if oc.kind == "json":
        return JSONObjectConstraint(engine.tokenizer, engine.eos, think_end if conv.conversation.thinking_mode else None)
    if oc.kind not in ("tool_call_required", "tool_call"):
        return None
    tools = _with_defs(json.loads(oc.schema), request_tools)
    # a call the request forces (a named tool, "required", Anthropic "any") is one call, with room after the
    # reasoning for all of it (not only a short JSON reply); where the model chose to call (auto), it may
    # make several in the block
    if oc.kind == "tool_call_required":
        start = None if po.starts_in_tool_calls else think_end
        return GrammarConstraint(engine.tokenizer, engine.eos, tool_call_grammar(tools, max_calls=1), start,
                                 reply_reserve=128)
    start = think_end if conv.conversation.thinking_mode else None
    if required:
        return GrammarConstraint(engine.tokenizer, engine.eos, tool_block_grammar(tools, max_calls=1), start,
                                 reply_reserve=128)
    # auto: free text (in JSON mode a JSON object, or else a call), and any calls follow the tools' schemas
    grammar = json_or_tool_call_grammar(tools) if json_mode else text_or_tool_call_grammar(tools)
    return GrammarConstraint(engine.tokenizer, engine.eos, grammar, start)


def _with_defs(tools: list, request_tools) -> list:
    """`tools` (converted) with each function's `$defs` / `definitions` restored from the request's own
    tool (Chat `function.parameters` or Anthropic `input_schema`), so `$ref`s into them resolve."""
    defs = {}
    for t in request_tools if isinstance(request_tools, list) else []:
        fn = t.get("function", t) if isinstance(t, dict) else None
        schema = (fn.get("parameters") or fn.get("input_schema")) if isinstance(fn, dict) else None
        if isinstance(schema, dict):
            defs[fn.get("name")] = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
    for t in tools:
        fn = t.get("function", t)
        if isinstance(fn.get("parameters"), dict):
            fn["parameters"] = {**defs.get(fn.get("name"), {}), **fn["parameters"]}
    return tools
