"""DeepSeek-compatible HTTP API over the engine (OpenAI Chat Completions so far).

deepseek-recipe converts each request (validation, DeepSeek's thinking / tool / passback rules,
errors in DeepSeek's shapes), renders and encodes the V4 prompt, and turns the engine's token
stream into protocol chunks; this module is the transport: auth, limits, queueing, SSE.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass, field

import deepseek_recipe as dr
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.async_engine import AsyncLLM
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


def error(status: int, message: str, kind: str = "invalid_request_error", code: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


class _Reject(Exception):
    def __init__(self, response):
        self.response = response


class _Overloaded(RuntimeError):
    """The engine could not take the request (its decode state exceeds the memory budget)."""


def create_app(llm: AsyncLLM, tokenizer_file: str, config: ServerConfig | None = None) -> FastAPI:
    cfg = config or ServerConfig()
    app = FastAPI(title="dsv4", description="DeepSeek-compatible API served by dsv4")
    recipe_tok = dr.Tokenizer.from_file(str(tokenizer_file))
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

    def release(seq, model: str, account: str, prompt_tokens: int) -> None:
        """A request is over: free its concurrency slot and bill its tokens to the caller's account."""
        state["active"] -= 1
        hit, out = seq.cached_tokens, len(seq.output_ids)
        p_hit, p_miss, p_out = cfg.prices.get(model, cfg.prices.get(cfg.served_model_name, (0.0, 0.0, 0.0)))
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

    async def read_body(request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
            raise _Reject(error(413, f"Request body exceeds {cfg.max_body_bytes} bytes"))
        body = await request.body()
        if len(body) > cfg.max_body_bytes:
            raise _Reject(error(413, f"Request body exceeds {cfg.max_body_bytes} bytes"))
        return body

    @app.exception_handler(_Reject)
    async def _rejected(request, exc: _Reject):
        return exc.response

    @app.exception_handler(_Overloaded)
    async def _overloaded(request, exc: _Overloaded):
        state["errors"] += 1
        return error(503, f"Server overloaded: {exc}", "server_overloaded", "server_overloaded")

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # never a traceback to the client
        state["errors"] += 1
        return error(500, "Internal server error", "internal_error", "internal_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting)}

    @app.get("/models")
    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        names = [cfg.served_model_name] + [n for n in MODEL_NAMES if n != cfg.served_model_name]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "dsv4"} for n in names]}

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
        account = authorize(request)
        body = _json(await read_body(request))
        try:
            prompt_ids, params, model, stream, usage_on = fim_request(body, request.url.path, recipe_tok,
                                                                      cfg.served_model_name)
        except RequestError as e:
            return error(422 if "parameter" in str(e) else 400, str(e))
        return await run_text(_user_id(body.get("user_id")), prompt_ids, params, model, stream, usage_on, account)

    @app.get("/metrics")
    async def metrics():
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
        try:
            seq, queue = llm.submit(ids, params, user=user, constraint=constraint)
        except RequestError as e:
            raise _Reject(error(400, str(e))) from None
        state["active"] += 1
        state["requests"] += 1
        return seq, queue

    async def complete(request: Request, proto: "_Protocol"):
        account = authorize(request)
        body = await read_body(request)
        try:
            d = proto.prepare(body, cfg.served_model_name)
            req = proto.request(d)
            meta = d.get("metadata")
            user = _user_id(d.get("user_id") if proto is CHAT else meta.get("user_id") if isinstance(meta, dict)
                            else None)
            model = req.model
            conv = req.convert(options)
        except dr.ConversionError as e:
            return Response(e.body, status_code=e.status_code, media_type="application/json")
        except (ValueError, TypeError) as e:
            return error(400, f"Invalid request: {e}")
        ids = encoding.encode(conv.conversation)
        app.state.last_prompt_ids = ids  # what the model is fed (inspected by tests and debugging)
        try:
            max_tokens = conv.resolve_max_tokens(len(ids), engine.max_len)
        except dr.ConversionError as e:
            return Response(e.body, status_code=e.status_code, media_type="application/json")
        io, po = conv.inference_options, conv.parsing_options
        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if io.temperature is None else io.temperature,
                top_p=1.0 if io.top_p is None else io.top_p, seed=io.seed,
                logprobs=(io.top_logprobs or 0) if io.logprobs else None, stop=list(po.stop_sequences))
        except RequestError as e:
            return error(422, str(e))
        constraint = _constraint(io.output_constraint, conv, po, engine)
        seq, queue = admit(ids, params, user, constraint)
        rid = proto.new_id()
        processor = dr.StreamProcessor(proto.generator(conv, rid, model), po, recipe_tok)
        chunks = _chunks(llm, seq, queue, processor, len(ids), cfg.keepalive_seconds)
        done = functools.partial(release, seq, model, account, len(ids))
        if conv.stream:
            return StreamingResponse(_sse(chunks, done, proto.response), media_type="text/event-stream")
        try:
            response = None
            async for item in chunks:
                if item is None:
                    continue
                if response is None:
                    response = proto.response(rid, model, int(time.time()), len(ids), seq.cached_tokens)
                response.accumulate(item)
        finally:
            done()
        return Response(response.to_json(), media_type="application/json")

    async def run_text(user, ids, params, model, stream, usage_on, account):
        seq, queue = admit(ids, params, user)
        done = functools.partial(release, seq, model, account, len(ids))
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        chunks = _with_keepalive(llm.stream(seq, queue), cfg.keepalive_seconds)

        def usage():
            done = len(seq.output_ids)
            return {"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": len(ids) + done,
                    "prompt_cache_hit_tokens": seq.cached_tokens,
                    "prompt_cache_miss_tokens": len(ids) - seq.cached_tokens,
                    "prompt_tokens_details": {"cached_tokens": seq.cached_tokens}}

        def choice(text, reason):
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}

        def reason_of(out):
            if out.finish_reason and out.finish_reason.startswith(("error", "abort")):
                raise RuntimeError(out.finish_reason)
            return out.finish_reason

        if stream:
            async def events():
                try:
                    async for out in chunks:
                        if out is None:
                            yield ": keep-alive\n\n"
                            continue
                        reason = reason_of(out) if out.finished else None
                        body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                                "choices": [choice(out.text, reason)]}
                        if reason and usage_on:
                            body["usage"] = usage()
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                except Exception as e:
                    yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'internal_error'}})}\n\n"
                finally:
                    done()
            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            text, reason = "", None
            async for out in chunks:
                if out is not None:
                    text += out.text
                    reason = reason_of(out) if out.finished else reason
        finally:
            done()
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [choice(text, reason)], "usage": usage()}

    app.state.llm = llm
    app.state.stats = state
    return app


async def _chunks(llm: AsyncLLM, seq, queue, processor, prompt_tokens: int, keepalive: float):
    """Protocol chunks of one request; None while it still waits in the queue (for keep-alives)."""
    ready = False
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
            if out.finished and out.finish_reason == "stop" and out.token_ids and out.token_ids[-1] == llm.engine.eos:
                out.token_ids = out.token_ids[:-1]  # end of sequence is the finish, not text
                out.logprobs = out.logprobs[:-1] if out.logprobs is not None else None
            if out.token_ids:
                lps = None
                if out.logprobs is not None:
                    lps = [(lp.logprob, lp.top) for lp in out.logprobs]
                for c in processor.push(dr.InferenceChunk.tokens(out.token_ids, lps)):
                    yield c
            if processor.finished:  # the parser met a stop sequence: the answer is complete
                return
            if out.finished:
                if out.finish_reason and out.finish_reason.startswith("error: exceeds"):
                    raise _Overloaded(out.finish_reason[len("error: "):])
                if out.finish_reason and out.finish_reason.startswith(("error", "abort")):
                    raise RuntimeError(out.finish_reason)
                reason = dr.InferenceFinishReason.Length if out.finish_reason == "length" \
                    else dr.InferenceFinishReason.Stop
                for c in processor.push(dr.InferenceChunk.finish(reason)):
                    yield c
                for c in processor.finish():
                    yield c
    finally:
        if not processor.finished:
            processor.close()


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
        if not pending.done():
            pending.cancel()
        await it.aclose()


async def _sse(chunks, done, response_cls):
    try:
        async for c in chunks:
            if c is None:
                yield ": keep-alive\n\n"
                continue
            name = response_cls.sse_event_name(c)
            yield (f"event: {name}\n" if name else "") + f"data: {c.to_json()}\n\n"
        final = response_cls.sse_done_data()
        if final:
            yield f"data: {final}\n\n"
    except Exception as e:  # mid-stream failure: an error event, never a traceback
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'internal_error'}})}\n\n"
    finally:
        done()


@dataclass
class _Protocol:
    request: type
    response: type
    generator: object  # (conversation request, id, model) -> chunk generator
    prepare: object  # (raw body, served model name) -> body for the request class
    id_prefix: str

    def new_id(self) -> str:
        return f"{self.id_prefix}{uuid.uuid4().hex}"


def _json(body: bytes) -> dict:
    try:
        d = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Reject(error(400, f"Invalid request: body is not valid JSON ({e})")) from None
    if not isinstance(d, dict):
        raise _Reject(error(400, "Invalid request: body must be a JSON object"))
    return d


def _user_id(user):
    """The request's end-user id (chat and FIM: `user_id`; Messages: `metadata.user_id`), which scopes
    context-cache hits when the engine isolates users; None when absent."""
    if user is None:
        return None
    if not (isinstance(user, str) and len(user) <= 512 and re.fullmatch(r"[A-Za-z0-9_-]+", user)):
        raise _Reject(error(400, "Invalid request: user_id must be 1-512 characters of [a-zA-Z0-9_-]"))
    return user


def _claude_names(body: bytes, served: str):
    """Anthropic side: claude-opus* -> deepseek-v4-pro, other claude-* -> deepseek-v4-flash; '[1m]' suffixes dropped."""
    d = _json(body)
    model = d.get("model")
    if isinstance(model, str):
        name = model.split("[")[0]
        if name.startswith("claude-opus"):
            name = "deepseek-v4-pro"
        elif name.startswith("claude"):
            name = "deepseek-v4-flash"
        d["model"] = name
    return d


def _chat_aliases(body: bytes, served: str):
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


def fim_request(body: dict, path: str, tok, served: str):
    """FIM (`/beta/completions`: prompt + suffix) or plain completion. Non-thinking; at most 4K new tokens."""
    from ..tokenizer import FIM_TOKENS

    prompt, suffix = body.get("prompt"), body.get("suffix")
    if not isinstance(prompt, str):
        raise RequestError("'prompt' is required and must be a string")
    if suffix is not None and not isinstance(suffix, str):
        raise RequestError("'suffix' must be a string")
    model = body.get("model", served)
    if model not in MODEL_NAMES + (served,):
        raise RequestError(f"Model Not Exist: {model!r}")
    max_tokens = body.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= FIM_MAX_TOKENS:
        raise RequestError(f"invalid parameter 'max_tokens': must be an integer in [1, {FIM_MAX_TOKENS}]")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    bos = dr.SpecialToken.Bos.default_str()
    if suffix is not None or path.startswith("/beta"):
        text = f"{bos}{FIM_TOKENS[0]}{prompt}{FIM_TOKENS[1]}{suffix or ''}{FIM_TOKENS[2]}"
    else:
        text = f"{bos}{prompt}"
    lp = body.get("logprobs")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=body.get("temperature", 1.0),
                                top_p=body.get("top_p", 1.0), stop=stop, seed=body.get("seed"),
                                presence_penalty=body.get("presence_penalty", 0.0),
                                frequency_penalty=body.get("frequency_penalty", 0.0),
                                logprobs=lp if isinstance(lp, int) else None)
    except (RequestError, TypeError) as e:
        raise RequestError(f"invalid parameter: {e}") from None
    usage_on = bool((body.get("stream_options") or {}).get("include_usage"))
    return tok.encode(text), params, model, bool(body.get("stream")), usage_on


def _constraint(oc, conv, po, engine):
    """The engine-side output constraint for deepseek-recipe's OutputConstraint, or None.

    json: a valid JSON object (after the thinking, if any). tool_call_required (tool_choice required
    or a named function): the DSML tool-call block the prompt opened, under the tools' schemas."""
    if oc is None:
        return None
    from ..engine.constrain import GrammarConstraint, JSONObjectConstraint, text_or_tool_call_grammar, tool_call_grammar

    think_end = engine.tokenizer.token_to_id(dr.SpecialToken.ThinkingEnd.default_str())
    if oc.kind == "json":
        return JSONObjectConstraint(engine.tokenizer, engine.eos, think_end if conv.conversation.thinking_mode else None)
    if oc.kind == "tool_call_required":
        start = None if po.starts_in_tool_calls else think_end
        return GrammarConstraint(engine.tokenizer, engine.eos, tool_call_grammar(json.loads(oc.schema)), start)
    if oc.kind == "tool_call":  # auto: free text, and any call it makes follows the tools' schemas
        start = think_end if conv.conversation.thinking_mode else None
        return GrammarConstraint(engine.tokenizer, engine.eos, text_or_tool_call_grammar(json.loads(oc.schema)),
                                 start)
    return None
