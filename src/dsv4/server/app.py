"""DeepSeek-compatible HTTP API over the engine (OpenAI Chat Completions so far).

deepseek-recipe converts each request (validation, DeepSeek's thinking / tool / passback rules,
errors in DeepSeek's shapes), renders and encodes the V4 prompt, and turns the engine's token
stream into protocol chunks; this module is the transport: auth, limits, queueing, SSE.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field

import deepseek_recipe as dr
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.async_engine import AsyncLLM
from ..engine.sampling import RequestError, SamplingParams

MODEL_NAMES = ("deepseek-v4-flash", "deepseek-v4-pro", "deepseek-chat", "deepseek-reasoner")


@dataclass
class ServerConfig:
    served_model_name: str = "deepseek-v4-flash"
    api_keys: list = field(default_factory=list)  # empty: no authentication
    max_body_bytes: int = 8 << 20
    max_concurrency: int = 64
    keepalive_seconds: float = 5.0


def error(status: int, message: str, kind: str = "invalid_request_error", code: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


class _Reject(Exception):
    def __init__(self, response):
        self.response = response


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

    def authorize(request: Request) -> None:
        if not cfg.api_keys:
            return
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        ok = False
        for k in cfg.api_keys:  # every key compared, in constant time
            ok |= hmac.compare_digest(key.encode(), k.encode())
        if not ok:
            shown = f"****{key[-4:]}" if len(key) >= 4 else "****"
            raise _Reject(error(401, f"Authentication Fails, Your api key: {shown} is invalid",
                                "authentication_error", "invalid_request_error"))

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
        authorize(request)
        body = await read_body(request)
        try:
            req = dr.ChatCompletionRequest(body)
            model = req.model
            conv = req.convert(options)
        except dr.ConversionError as e:
            return Response(e.body, status_code=e.status_code, media_type="application/json")
        except (ValueError, TypeError) as e:
            return error(400, f"Invalid request: {e}")
        ids = encoding.encode(conv.conversation)
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
        if state["active"] >= cfg.max_concurrency:
            return error(429, "Rate limit reached: too many concurrent requests", "rate_limit_error",
                         "rate_limit_exceeded")
        state["active"] += 1
        state["requests"] += 1
        try:
            seq, queue = llm.submit(ids, params, user=request.headers.get("x-user-id"))
        except RequestError as e:
            state["active"] -= 1
            return error(400, str(e))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        processor = dr.StreamProcessor(dr.ChatCompletionRequest.chunk_generator(conv, rid, model), po, recipe_tok)
        chunks = _chunks(llm, seq, queue, processor, len(ids), cfg.keepalive_seconds)
        if conv.stream:
            return StreamingResponse(_sse(chunks, state), media_type="text/event-stream")
        try:
            response = None
            async for item in chunks:
                if item is None:
                    continue
                if response is None:
                    response = dr.ChatCompletionResponse(rid, model, int(time.time()), len(ids), seq.cached_tokens)
                response.accumulate(item)
        finally:
            state["active"] -= 1
        return Response(response.to_json(), media_type="application/json")

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
            if out.token_ids:
                lps = None
                if out.logprobs is not None:
                    lps = [(lp.logprob, lp.top) for lp in out.logprobs]
                for c in processor.push(dr.InferenceChunk.tokens(out.token_ids, lps)):
                    yield c
            if out.finished:
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


async def _sse(chunks, state):
    try:
        async for c in chunks:
            if c is None:
                yield ": keep-alive\n\n"
                continue
            name = dr.ChatCompletionResponse.sse_event_name(c)
            yield (f"event: {name}\n" if name else "") + f"data: {c.to_json()}\n\n"
        done = dr.ChatCompletionResponse.sse_done_data()
        if done:
            yield f"data: {done}\n\n"
    except Exception as e:  # mid-stream failure: an error event, never a traceback
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'internal_error'}})}\n\n"
    finally:
        state["active"] -= 1
