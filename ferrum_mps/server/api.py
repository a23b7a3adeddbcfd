"""The HTTP side of `serve`: OpenAI's /v1/models, /v1/chat/completions, /v1/completions and /health on Starlette.

Requests are validated here (pydantic, strict types, unknown fields refused the way OpenAI does),
tokenized, checked against the context, and handed to the Engine as Jobs; its events come back
through an asyncio.Queue per request, as one JSON body or as server-sent events ending in [DONE].
Every client mistake is an OpenAI-style `{"error": {...}}` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Delta, Done, Engine, Failed, Job, Sampling

log = logging.getLogger(__name__)


# A chat request near a 128k context is ~1 MB of JSON; 32 MiB leaves room without inviting a memory blow-up.
MAX_BODY_BYTES = 32 * 2**20


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": type, "param": param, "code": code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body}, status_code=self.status)


# ------------------------------------------------------------------------------ request schemas


class _Strict(BaseModel):
    # strict: "10" is not an int, true is not a number; forbid: OpenAI refuses unrecognized arguments too.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict:
        content = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(p.text for p in self.content)
        # "developer" is OpenAI's newer name for "system"; chat templates know only the older one.
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class StreamOptions(_Strict):
    include_usage: bool = False


# Accepted at their neutral value only (clients send them by default); anything else is refused by name.
_NEUTRAL = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": (None, False),
            "top_logprobs": None, "best_of": 1, "echo": False, "suffix": None, "tools": None,
            "tool_choice": (None, "none", "auto"),
            "response_format": (None, {"type": "text"})}


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop: at most 4 stop sequences", param="stop")
        if any(not s for s in stop):
            raise APIError(400, "stop: stop sequences must be non-empty strings", param="stop")
        return tuple(stop)

    def refuse_unsupported(self) -> None:
        for name, neutral in _NEUTRAL.items():
            if name in self.model_fields_set:
                value = getattr(self, name)
                ok = value in neutral if isinstance(neutral, tuple) else value in (None, neutral)
                if not ok:
                    raise APIError(400, f"{name}={json.dumps(value)} is not supported by this server "
                                        f"(supported: {json.dumps(neutral if not isinstance(neutral, tuple) else neutral[-1])})",
                                   param=name, code="unsupported_parameter")


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None


async def _body(request: Request) -> bytes:
    too_big = APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(model_cls: type[_Strict], raw: bytes):
    try:
        req = model_cls.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {err['msg']}") from None
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unrecognized request argument supplied: {loc}", param=loc,
                           code="unsupported_parameter") from None
        raise APIError(400, f"{loc or 'body'}: {err['msg']}" + (f" (got {json.dumps(err['input'])[:80]})"
                                                                   if loc and "input" in err else ""),
                       param=loc or None) from None
    req.refuse_unsupported()
    return req


# ------------------------------------------------------------------------------ the app


class Server:
    """The Starlette app around one Engine; `model_id` is the name /v1/models lists and requests must use."""

    def __init__(self, engine: Engine, model_id: str, api_key: str | None = None, default_max_tokens: int = 4096):
        if default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {default_max_tokens}")
        self.engine, self.model_id, self.api_key = engine, model_id, api_key
        # Without max_tokens a request may run to the end of the context; generate() preallocates its
        # static K/V cache for prompt + max_tokens (~100 KB per token for Qwen3-30B-A3B: 40k tokens = 4 GB
        # per row), so an unbounded default would make every bare request that expensive.
        self.default_max_tokens = default_max_tokens
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        handlers = {APIError: lambda r, e: e.response(), HTTPException: self._http_error, Exception: self._internal}
        self.app = Starlette(routes=routes, exception_handlers=handlers)

    # ---- errors

    @staticmethod
    def _http_error(request, exc: HTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind).response()

    @staticmethod
    def _internal(request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error").response()

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    # ---- small endpoints

    async def health(self, request: Request) -> JSONResponse:
        alive = self.engine.alive
        return JSONResponse({"status": "ok" if alive else "model worker stopped", "model": self.model_id,
                             "context": self.engine.context, "max_batch": self.engine.max_batch,
                             "default_max_tokens": self.default_max_tokens, **self.engine.load()},
                            status_code=200 if alive else 503)

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "ferrum-mps"}

    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> JSONResponse:
        self._authorize(request)
        self._check_model(request.path_params["model_id"])
        return JSONResponse(self._model_card())

    def _check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(404, f"the model '{name}' does not exist; this server has '{self.model_id}'",
                           param="model", code="model_not_found")

    # ---- completions

    async def chat(self, request: Request):
        self._authorize(request)
        req = _parse(ChatRequest, await _body(request))
        self._check_model(req.model)
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        ids = self._chat_ids([m.as_template_input() for m in req.messages])
        return await self._run(request, req, ids, "chat", req.max_completion_tokens or req.max_tokens)

    async def completions(self, request: Request):
        self._authorize(request)
        req = _parse(CompletionRequest, await _body(request))
        self._check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request is supported, got {len(prompt)}",
                               param="prompt", code="unsupported_parameter")
            prompt = prompt[0]
        if isinstance(prompt, str):
            with self.engine.tokenizer_lock:
                ids = self.tokenizer(prompt).input_ids
        else:
            ids = prompt
            vocab = len(self.tokenizer)
            if any(not 0 <= i < vocab for i in ids):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        if not ids:
            raise APIError(400, "prompt: the prompt must not be empty", param="prompt")
        return await self._run(request, req, ids, "text", req.max_tokens)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's GGUF has no chat template: use /v1/completions", param="messages")
        try:
            with self.engine.tokenizer_lock:
                out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        except Exception as e:  # noqa: BLE001 - a template may reject a conversation (jinja raise_exception)
            raise APIError(400, f"messages: the chat template rejected them: {e}", param="messages") from None
        return list(out["input_ids"])

    def _sampling(self, req: _Common, n_prompt: int, max_tokens: int | None) -> Sampling:
        context = self.engine.context
        if n_prompt >= context:
            raise APIError(400, f"the prompt is {n_prompt} tokens; this model's context is {context} tokens",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(context - n_prompt, self.default_max_tokens)
        elif n_prompt + max_tokens > context:
            raise APIError(400, f"the prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds this model's "
                                f"context of {context} tokens", param="max_tokens", code="context_length_exceeded")
        return Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                        stop=req.stop_strings())

    async def _run(self, request: Request, req: _Common, ids: list[int], kind: str, max_tokens: int | None):
        sampling = self._sampling(req, len(ids), max_tokens)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(event):  # called from the model thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        job = Job(ids, sampling, deliver)
        try:
            self.engine.submit(job)
        except RuntimeError as e:
            raise APIError(503, str(e), type="server_error") from None
        reply = _Reply(kind, self.model_id)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(reply.stream(job, events, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply.whole(request, job, events)


class _Reply:
    """One response in OpenAI's shapes: chat.completion / text_completion, whole or as chunks."""

    def __init__(self, kind: str, model_id: str):
        self.kind, self.model_id = kind, model_id
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model_id, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    @staticmethod
    def _usage(done: Done) -> dict:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens}

    def _choice(self, text: str | None, finish_reason: str | None, delta: bool, first: bool = False) -> dict:
        if self.kind == "text":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if not delta:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        d = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}

    async def whole(self, request: Request, job: Job, events: asyncio.Queue) -> JSONResponse:
        # The body is read, so receive() now only reports the client leaving: then stop its generation.
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel()
            events.put_nowait(None)  # wake the loop below: nobody is left to answer

        watcher = asyncio.ensure_future(watch())
        try:
            while True:
                event = await events.get()
                if event is None:
                    return Response(status_code=499)  # nginx's "client closed request"; never reaches anyone
                if isinstance(event, Done):
                    obj = "chat.completion" if self.kind == "chat" else "text_completion"
                    return JSONResponse(self._envelope(obj, [self._choice(event.text, event.finish_reason, False)],
                                                       self._usage(event)))
                if isinstance(event, Failed):
                    raise APIError(500, event.message, type="server_error")
        finally:
            watcher.cancel()
            job.cancel()  # no-op once finished; stops the row if we are leaving early

    async def stream(self, job: Job, events: asyncio.Queue, include_usage: bool):
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"

        def sse(payload: dict | str) -> str:
            return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

        try:  # starlette cancels this generator when the client disconnects: `finally` stops the row
            if self.kind == "chat":
                yield sse(self._envelope(obj, [self._choice("", None, True, first=True)]))
            while True:
                event = await events.get()
                if isinstance(event, Delta):
                    yield sse(self._envelope(obj, [self._choice(event.text, None, True)]))
                elif isinstance(event, Done):
                    yield sse(self._envelope(obj, [self._choice("", event.finish_reason, True)]))
                    if include_usage:
                        yield sse(self._envelope(obj, [], self._usage(event)))
                    break
                else:  # headers are sent: the error goes in the stream, as OpenAI does
                    yield sse({"error": {"message": event.message, "type": "server_error", "param": None,
                                         "code": None}})
                    break
            yield sse("[DONE]")
        finally:
            job.cancel()
