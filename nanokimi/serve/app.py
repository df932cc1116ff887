"""The OpenAI-compatible HTTP layer: routes, request validation, OpenAI error bodies, SSE streaming.

    server = Server.load("runs/tiny", ServeOptions(ttft_slo_ms=2000))
    app = create_app(server)                  # FastAPI; uvicorn.run(app) or `nanokimi serve`

Every request is tokenized here, checked against the context length, then handed to the one engine thread
(`EngineLoop`). Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanokimi.data import DataError
from nanokimi.data.chat import ToolCallError, ToolCallStream, parse_tool_calls
from nanokimi.data.tokenizer import END_OF_TURN
from nanokimi.serve.loop import EngineLoop, Update
from nanokimi.serve.schemas import ChatRequest, CompletionRequest, FieldError

PAGE = Path(__file__).with_name("page.html")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ServeOptions:
    max_cache_tokens: int | None = None
    ttft_slo_ms: float | None = None
    tbt_slo_ms: float | None = None
    slo_headroom: float = 0.8
    kv_offload_gb: float = 0.0
    kv_disk: str | None = None
    kv_disk_gb: float = 64.0
    enable_prefix_caching: bool = True
    block_size: int = 16
    max_num_seqs: int = 256
    max_step_tokens: int = 2048
    max_body_bytes: int = 1 << 20
    max_wait_ms: float = 2000.0
    served_model_name: str | None = None
    device: str = "auto"
    speculative: str | None = None  # "ngram": prompt-lookup drafts verified in one forward (docs/seer.md)
    num_speculative_tokens: int = 4


def default_model_name(checkpoint: Path) -> str:
    """The run folder's name for RUN/checkpoints/step-N (or an older RUN/checkpoint), else the folder's own."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent.resolve().name
    if checkpoint.name == "checkpoint":
        return checkpoint.parent.resolve().name
    return checkpoint.resolve().name


class Server:
    """Everything the routes need: the engine loop, tokenizer, chat template, model name and context length."""

    def __init__(self, loop: EngineLoop, tokenizer, template, model_name: str, max_model_len: int,
                 max_body_bytes: int = 1 << 20):
        self.loop, self.tokenizer, self.template = loop, tokenizer, template
        self.model_name, self.max_model_len, self.max_body_bytes = model_name, max_model_len, max_body_bytes
        self.created = int(time.time())

    @classmethod
    def load(cls, ckpt: str, options: ServeOptions | None = None) -> "Server":
        """A server for a checkpoint folder (or run folder): model, tokenizer and chat template from it."""
        from nanokimi.checkpoint import resolve_checkpoint
        from nanokimi.data.chat import ChatTemplate
        from nanokimi.infer import LLM

        options = options or ServeOptions()
        path = resolve_checkpoint(ckpt)
        tiers = _tier_store(options, _fingerprint(path))
        llm = LLM(str(path), device=options.device, kv_tiers=tiers, **_engine_kwargs(options))
        name = options.served_model_name or default_model_name(path)
        return cls.from_llm(llm, ChatTemplate.load(path), name, options)

    @classmethod
    def from_llm(cls, llm, template, model_name: str, options: ServeOptions) -> "Server":
        """A server around an LLM already built (its engine must have been made with `_engine_kwargs(options)`)."""
        from nanokimi.infer import SamplingParams

        cfg = llm.model.config
        llm.engine.stream_outputs = True  # LLM turns it off for generate(); a server streams every step
        llm.engine.copy_outputs = False  # the loop snapshots outputs as views (loop._freeze)
        loop = EngineLoop(llm.engine, SamplingParams, cfg.vocab_size, cfg.max_position_embeddings,
                          options.max_step_tokens,
                          ttft_slo_s=None if options.ttft_slo_ms is None else options.ttft_slo_ms / 1000,
                          tbt_slo_s=None if options.tbt_slo_ms is None else options.tbt_slo_ms / 1000,
                          slo_headroom=options.slo_headroom, max_wait_s=options.max_wait_ms / 1000)
        return cls(loop, llm.tokenizer, template, model_name, cfg.max_position_embeddings, options.max_body_bytes)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}' "
                           "(see GET /v1/models).", "model", code="model_not_found")

    def sampling_params(self, body, prompt_len: int, max_tokens: int | None, logprobs: int | None, param: str,
                        extra_stop: list[str] = ()):
        from nanokimi.infer import SamplingParams

        room = self.max_model_len - prompt_len
        if room < 1:
            raise ApiError(400, f"The prompt has {prompt_len} tokens; this model's context is {self.max_model_len} "
                           "tokens. Shorten the prompt.", param, code="context_length_exceeded")
        if max_tokens is None:  # the rest of the context, as far as the engine's whole cache can hold it
            capacity = self.loop.snapshot().get("raw", {}).get("cache_tokens_total", self.max_model_len)
            max_tokens = max(1, min(room, capacity - prompt_len))
        if prompt_len + max_tokens > self.max_model_len:
            raise ApiError(400, f"This model's context is {self.max_model_len} tokens; the prompt has {prompt_len} "
                           f"and max_tokens asks for {max_tokens} more. Lower max_tokens to at most {room}.",
                           "max_tokens", code="context_length_exceeded")
        bias = body.token_bias
        if bias and max(bias) >= self.loop.vocab_size:
            raise ApiError(400, f"logit_bias names token {max(bias)}; this model's token ids are below "
                           f"{self.loop.vocab_size}.", "logit_bias")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, n=body.n,
                                  seed=body.seed, stop=body.stop_list + list(extra_stop) or None, logprobs=logprobs,
                                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                  repetition_penalty=body.repetition_penalty, logit_bias=bias,
                                  ignore_eos=body.ignore_eos, min_tokens=body.min_tokens)
        except ValueError as e:
            field = str(e).removeprefix("SamplingParams: ").split(" ", 1)[0]
            raise ApiError(400, str(e), field) from e


async def _read_json(request: Request, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"The request body has {int(length)} bytes; the limit is {limit} "
                       "(start the server with a larger --max-body-bytes).", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"The request body is larger than the limit of {limit} bytes.",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"The body is not valid JSON ({e}).", code="invalid_json") from e
    if not isinstance(data, dict):
        raise ApiError(400, f"The body must be a JSON object, got {type(data).__name__}.", code="invalid_json")
    return data


def _param_of(loc: tuple) -> str | None:
    """pydantic's error location -> OpenAI's param, e.g. ('messages', 0, 'role') -> 'messages[0].role'.
    Union-member tags pydantic inserts ('str', 'list[int]', ...) end the path."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict"):
            out += f".{part}" if out else part
        else:
            break
    return out or None


def _parse(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, FieldError):
            raise ApiError(400, str(cause), cause.param) from None
        param = _param_of(err["loc"])
        raise ApiError(400, f"{param or 'body'}: {err['msg']}" + ("" if err["type"] == "missing"
                       else f" (got {json.dumps(err.get('input'))[:80]})"), param) from None


def _logprob_entries(tokenizer, token_ids, logprobs, top: int) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """Per generated token: (token text, its logprob, the top `top` alternatives as (text, logprob))."""
    out = []
    for token, lp in zip(token_ids, logprobs):
        best = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
        chosen = lp.get(token, max(lp.values()) if lp else 0.0)
        out.append((tokenizer.decode([token]), float(chosen), [(tokenizer.decode([t]), float(v)) for t, v in best]))
    return out


def _completion_logprobs(entries, offset: int) -> dict:
    text_offset = []
    for text, _, _ in entries:
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": text_offset}


def _chat_logprobs(entries) -> dict:
    def item(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in top]} for t, lp, top in entries]}


def _stable_text(text: str, stops: list[str], finished: bool) -> str:
    """The prefix of a running sample's text that can no longer change: hold back a tail that could still grow
    into a stop string, and an unfinished UTF-8 character (decoded as U+FFFD)."""
    if finished:
        return text
    end = len(text)
    if stops:
        end = max(0, end - (max(len(s) for s in stops) - 1))
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return text[:end]


class _Call:
    """One request's life: submit, wait for the verdict, then stream or collect its updates."""

    def __init__(self, server: Server, request: Request, prompt_ids: list[int], params, chat: bool, body,
                 stops: list[str], top_logprobs: int | None):
        self.server, self.request, self.prompt_ids, self.params = server, request, prompt_ids, params
        self.chat, self.body, self.stops, self.top_logprobs = chat, body, stops, top_logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.finished = False

    async def _next(self) -> tuple[str, object]:
        while True:
            try:
                return await asyncio.wait_for(self.sink.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    raise asyncio.CancelledError("client disconnected")

    async def start(self) -> None:
        arrival = self.request.scope.get("state", {}).get("arrival")
        self.sink = self.server.loop.submit(self.id, self.prompt_ids, self.params, arrival)
        try:
            kind, payload = await self._next()
        except BaseException:
            self.server.loop.abort(self.id)
            raise
        if kind == "rejected":
            raise ApiError(429, f"The server is overloaded: this request would miss its {payload.reason.upper()} "
                           f"SLO (predicted TTFT {payload.ttft_s * 1000:.0f} ms, TBT {payload.tbt_s * 1000:.1f} ms). "
                           "Retry later.", None, "rate_limit_error", "rate_limit_exceeded",
                           {"Retry-After": str(payload.retry_after_s)})
        if kind == "error":  # the engine refused it (e.g. longer than its whole cache)
            raise ApiError(400, str(payload))

    def usage(self, update: Update | None) -> dict:
        completion = sum(len(c.token_ids) for c in update.choices) if update else 0
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_ids) + completion}

    def _logprobs(self, choice, start: int, text_offset: int):
        if self.top_logprobs is None or choice.logprobs is None:
            return None
        entries = _logprob_entries(self.server.tokenizer, choice.token_ids[start:], choice.logprobs[start:],
                                   self.top_logprobs)
        return _chat_logprobs(entries) if self.chat else _completion_logprobs(entries, text_offset)

    async def collect(self) -> dict:
        last = None
        try:
            while True:
                kind, payload = await self._next()
                if kind == "error":
                    raise ApiError(500, str(payload), type="server_error")
                last = payload
                if last.finished:
                    self.finished = True
                    break
        finally:
            if not self.finished:
                self.server.loop.abort(self.id)
        choices = []
        for c in last.choices:
            if self.chat:
                message = {"role": "assistant", "content": c.text}
                finish_reason = c.finish_reason
                if self.body.tools:
                    try:
                        content, calls = parse_tool_calls(c.text)
                    except ToolCallError:
                        calls = []  # malformed calls stay in the content, as the model wrote them
                    if calls:
                        message = {"role": "assistant", "content": content or None, "tool_calls": calls}
                        finish_reason = "tool_calls"
                choice = {"index": c.index, "message": message, "logprobs": self._logprobs(c, 0, 0),
                          "finish_reason": finish_reason}
            else:
                choice = {"index": c.index, "text": c.text, "logprobs": self._logprobs(c, 0, 0),
                          "finish_reason": c.finish_reason}
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.server.model_name, "choices": choices,
                "usage": self.usage(last)}

    def _chunk(self, choices: list[dict], usage=None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.server.model_name, "choices": choices}
        if self.body.stream_options is not None and self.body.stream_options.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def stream(self):
        n = self.params.n
        sent_text, sent_tokens, done = [""] * n, [0] * n, [False] * n
        tools = [ToolCallStream() for _ in range(n)] if self.chat and self.body.tools else None
        last = None
        try:
            if self.chat:
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(n)])
            while not self.finished:
                kind, payload = await self.sink.get()
                if kind == "error":
                    yield f"data: {json.dumps({'error': {'message': str(payload), 'type': 'server_error'}})}\n\n"
                    break
                last = payload
                self.finished = last.finished
                choices = []
                for c in last.choices:
                    if done[c.index]:
                        continue
                    final = c.finish_reason is not None
                    text = _stable_text(c.text, self.stops, final)
                    delta = text[len(sent_text[c.index]):] if text.startswith(sent_text[c.index]) else ""
                    if len(c.token_ids) == sent_tokens[c.index] and not final:
                        continue  # one frame per step that produced tokens, even if their text is held back
                    logprobs = self._logprobs(c, sent_tokens[c.index], len(sent_text[c.index]))
                    sent_tokens[c.index] = len(c.token_ids)
                    sent_text[c.index] += delta
                    done[c.index] = final
                    if self.chat and tools is not None:
                        choices.append(_tool_stream_choice(tools[c.index], c.index, delta, logprobs, c.finish_reason))
                    elif self.chat:
                        choices.append({"index": c.index, "delta": {"content": delta},
                                        "logprobs": logprobs, "finish_reason": c.finish_reason})
                    else:
                        choices.append({"index": c.index, "text": delta, "logprobs": logprobs,
                                        "finish_reason": c.finish_reason})
                if choices:
                    yield self._chunk(choices)
            if self.finished and self.body.stream_options is not None and self.body.stream_options.include_usage:
                yield self._chunk([], self.usage(last))
            yield "data: [DONE]\n\n"
        finally:
            if not self.finished:
                self.server.loop.abort(self.id)


def _tool_stream_choice(stream: ToolCallStream, index: int, delta: str, logprobs, finish_reason) -> dict:
    """A chat stream's choice when the request offered tools: text before a tool-call section streams as content;
    at the end the section becomes OpenAI's `tool_calls` deltas and finish_reason "tool_calls" (a malformed
    section stays content, as in the non-streamed reply)."""
    content = stream.feed(delta)
    message: dict = {"content": content}
    if finish_reason is not None:
        try:
            rest, calls = stream.finish()
        except ToolCallError:
            rest, calls = stream.text[stream.sent:], []
        message["content"] = content + rest
        if calls:
            message["tool_calls"] = [{"index": j, **call} for j, call in enumerate(calls)]
            finish_reason = "tool_calls"
    return {"index": index, "delta": message, "logprobs": logprobs, "finish_reason": finish_reason}


def _engine_kwargs(options: ServeOptions) -> dict:
    return dict(max_cache_tokens=options.max_cache_tokens, block_size=options.block_size,
                max_num_seqs=options.max_num_seqs, max_step_tokens=options.max_step_tokens,
                enable_prefix_caching=options.enable_prefix_caching, speculative=options.speculative,
                num_speculative_tokens=options.num_speculative_tokens)


def _tier_store(options: ServeOptions, namespace: str):
    """The CPU/disk KV tiers the options ask for, or None."""
    if options.kv_offload_gb <= 0 and not options.kv_disk:
        return None
    from nanokimi.infer.tiers import KVTierStore
    store = KVTierStore(int(options.kv_offload_gb * 2**30), options.kv_disk, int(options.kv_disk_gb * 2**30),
                        block_size=options.block_size, namespace=namespace)
    store.reserve()  # pinned at start: pinning while serving would stall engine steps
    return store


def _fingerprint(path: Path) -> str:
    import hashlib
    weights = path / "model.safetensors"
    stat = weights.stat() if weights.exists() else None
    key = f"{(path / 'config.json').read_text() if (path / 'config.json').exists() else ''}|"
    key += f"{stat.st_size if stat else 0}|{stat.st_mtime_ns if stat else 0}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class _StampArrival:
    """ASGI middleware: the time a request reached the server (TTFT counts from here, before body parsing)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope.setdefault("state", {})["arrival"] = time.perf_counter()
        await self.app(scope, receive, send)


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(server.loop.start)
        yield
        await asyncio.to_thread(server.loop.stop)

    app = FastAPI(title="nanokimi", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_StampArrival)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind).response()

    async def run(request: Request, prompt_ids, params, chat: bool, body, stops, top_logprobs):
        call = _Call(server, request, prompt_ids, params, chat, body, stops, top_logprobs)
        await call.start()
        if body.stream:
            return StreamingResponse(call.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await call.collect())

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = _parse(CompletionRequest, await _read_json(request, server.max_body_bytes))
        server.check_model(body.model)
        if isinstance(body.prompt, str):
            prompt_ids = server.tokenizer.encode(body.prompt) or [server.tokenizer.eot_id]
        else:
            prompt_ids = list(body.prompt)
            bad = next((t for t in prompt_ids if not 0 <= t < server.loop.vocab_size), None)
            if not prompt_ids or bad is not None:
                raise ApiError(400, f"prompt token ids must be a non-empty list of ids in [0, "
                               f"{server.loop.vocab_size}); got {bad if prompt_ids else 'an empty list'}.", "prompt")
        params = server.sampling_params(body, len(prompt_ids), body.max_tokens, body.logprobs, "prompt")
        return await run(request, prompt_ids, params, False, body, body.stop_list, body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = _parse(ChatRequest, await _read_json(request, server.max_body_bytes))
        server.check_model(body.model)
        try:
            text = server.template.render([m.as_dict() for m in body.messages], add_generation_prompt=True,
                                          tools=body.tools)
        except DataError as e:
            raise ApiError(400, str(e), "messages") from None
        prompt_ids = server.tokenizer.encode_chat(text)
        top = (body.top_logprobs or 0) if body.logprobs else None
        # A tokenizer without the end-of-turn token still ends the turn at its text.
        extra = [] if server.tokenizer.token_to_id(END_OF_TURN) is not None else [END_OF_TURN]
        params = server.sampling_params(body, len(prompt_ids), body.max_new_tokens, top, "messages", extra)
        return await run(request, prompt_ids, params, True, body, params.stop or [], top)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "nanokimi", "max_model_len": server.max_model_len}]}

    @app.get("/health")
    async def health():
        ok = server.loop.error is None and server.loop._thread.is_alive()
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(server.loop.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text().replace("{{MODEL}}", server.model_name))

    return app
