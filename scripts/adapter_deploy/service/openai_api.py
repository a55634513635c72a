"""The OpenAI-compatible face of the service: `/v1/models`, `/v1/chat/completions` and
`/v1/completions`.

A completion is a translation: `model` is a model name from params.yaml; the text is the last
user message of a chat completion, or a completion's `prompt` (a string or a list of one
string). A message's content is a plain string or TranslateGemma's structured parts,
`[{"type": "text", "source_lang_code": "en", "target_lang_code": "es", "text": "..."}]`.
The adapters are trained for one language pair (SOURCE_LANG -> TARGET_LANG): a request for
another pair is refused rather than answered in the wrong language. Sampling parameters
(temperature, top_p, ...) are ignored: a translation is decoded greedily. `max_tokens` (chat
also `max_completion_tokens`) caps the new tokens decoded; it lowers the engine's own budget,
never raises it, and `finish_reason` is `length` when a budget ended the translation, else
`stop`. Errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

`stream: true` answers with server-sent events: the headers and a first chunk (chat: the
assistant's role) go out at once, before the request waits for the engine; the engine decodes
the whole sentence, then its text follows word by word, a last chunk with the finish_reason
(and, with `stream_options: {"include_usage": true}`, one with usage), then `data: [DONE]`.
A refusal found before the headers is an HTTP error like any other; one that comes later
(an overlong text, the engine failing) is one `data: {"error": {...}}` event that ends the
stream. The X-Adapter-Version header of a stream names the release serving when it opened;
each chunk's `system_fingerprint` names the one that answered (they differ only when a reload
lands in between).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from adapter_deploy.engines.base import SOURCE_LANG, TARGET_LANG
from adapter_deploy.service.state import Busy, ClientGone, Service, WrongTask

OWNER = "adapter-deploy"
# What the version header says when the base model answered (start-up fallback): no release.
BASE_VERSION = "base"
VERSION_HEADER = "X-Adapter-Version"  # the release that answered (`base`: fallback)
CLIENT_GONE = 499  # the status /metrics counts for a request dropped because its client left
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
DONE = b"data: [DONE]\n\n"


@dataclass(eq=False)
class ApiError(Exception):
    """A refused request: its HTTP status, one-line message and OpenAI code/param."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def error_type(status: int) -> str:
    if status == 403:
        return "permission_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(err: ApiError) -> dict[str, Any]:
    return {
        "error": {
            "message": err.message,
            "type": error_type(err.status),
            "param": err.param,
            "code": err.code,
        }
    }


# --- requests ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Ask:
    """One completion request as a translation: the model, the text and how to answer."""

    path: str  # CHAT or COMPLETIONS: the shape of the answer
    model: str
    text: str
    max_tokens: int | None = None  # None: the engine's own budget
    stream: bool = False
    include_usage: bool = False  # a stream's last chunk before [DONE] carries usage

    @property
    def chat(self) -> bool:
        return self.path == CHAT


def parse_request(path: str, body: Any) -> Ask:
    """The Ask of a POST to `path` (CHAT or COMPLETIONS), or ApiError 400 saying why."""
    what = "messages" if path == CHAT else "prompt"
    if not isinstance(body, dict):
        raise ApiError(400, f"send a JSON object with model and {what}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model must be a model name, e.g. gemma_4b", "invalid_value", "model")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1: a translation has one answer", "unsupported_value", "n")
    stream = _flag(body, "stream")
    text = chat_text(body) if path == CHAT else prompt_text(body)
    options = body.get("stream_options")
    usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return Ask(path, model, text, _max_tokens(body, path), stream, usage)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", "invalid_type", name)
    return bool(value)


def _max_tokens(body: dict[str, Any], path: str) -> int | None:
    """The cap on new tokens; chat's newer `max_completion_tokens` wins over `max_tokens`."""
    name = "max_tokens"
    if path == CHAT and body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"{name} must be a whole number above 0", "invalid_value", name)
    return value


def chat_text(body: dict[str, Any]) -> str:
    """The text of a chat completion request: its last user message's."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "invalid_value", "messages")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    raise ApiError(400, "no user message: it holds the text to translate", None, "messages")


def prompt_text(body: dict[str, Any]) -> str:
    """The text of a completion request: `prompt`, a string or a list of one string."""
    if body.get("echo"):
        message = "echo: true is not supported; the answer is the translation alone"
        raise ApiError(400, message, "unsupported_value", "echo")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "send one prompt per request", "unsupported_value", "prompt")
    if not isinstance(prompt, str):
        message = "prompt must be the text to translate, a string (token ids are not taken)"
        raise ApiError(400, message, "invalid_value", "prompt")
    if not prompt.strip():
        raise ApiError(400, "the prompt has no text to translate", None, "prompt")
    return prompt


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        text = content
    elif isinstance(content, list) and content:
        text = "\n".join(_part_text(part) for part in content)
    else:
        message = "user content must be a string or a list of text parts"
        raise ApiError(400, message, "invalid_value", "messages")
    if not text.strip():
        raise ApiError(400, "the user message has no text to translate", None, "messages")
    return text


def _part_text(part: Any) -> str:
    if not isinstance(part, dict) or part.get("type") != "text":
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        message = f"content part of type {kind!r}: only text parts are translated"
        raise ApiError(400, message, "unsupported_value", "messages")
    if not isinstance(part.get("text"), str):
        raise ApiError(400, "a text part needs a string text", "invalid_value", "messages")
    pair = (part.get("source_lang_code", SOURCE_LANG), part.get("target_lang_code", TARGET_LANG))
    if (str(pair[0]).lower(), str(pair[1]).lower()) != (SOURCE_LANG, TARGET_LANG):
        raise ApiError(
            400,
            f"this service translates {SOURCE_LANG} -> {TARGET_LANG} (the adapters' language "
            f"pair), not {pair[0]} -> {pair[1]}",
            "unsupported_language_pair",
            "messages",
        )
    return part["text"]


# --- answers ----------------------------------------------------------------------------
def usage_of(answer: dict[str, Any]) -> dict[str, int]:
    usage = answer.get("usage") or {}
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def finish_of(answer: dict[str, Any]) -> str:
    return "length" if answer.get("finish_reason") == "length" else "stop"


def completion(ask: Ask, answer: dict[str, Any]) -> dict[str, Any]:
    """The answer object of a request that does not stream."""
    if ask.chat:
        return chat_completion(ask.model, answer)
    return text_completion(ask.model, answer)


def chat_completion(model: str, answer: dict[str, Any]) -> dict[str, Any]:
    """A `chat.completion` object for one translation answer of `Service.translate`."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": answer["text"]},
        "logprobs": None,
        "finish_reason": finish_of(answer),
    }
    return _envelope("chatcmpl", "chat.completion", model, answer, [choice])


def text_completion(model: str, answer: dict[str, Any]) -> dict[str, Any]:
    """A `text_completion` object (legacy /v1/completions) for one translation answer."""
    choice = {
        "index": 0,
        "text": answer["text"],
        "logprobs": None,
        "finish_reason": finish_of(answer),
    }
    return _envelope("cmpl", "text_completion", model, answer, [choice])


def _envelope(
    prefix: str, kind: str, model: str, answer: dict[str, Any], choices: list[Any]
) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": version_header(answer),
        "choices": choices,
        "usage": usage_of(answer),
    }


# --- streams ----------------------------------------------------------------------------
def event(data: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def words(text: str) -> list[str]:
    """The text in word-sized pieces (each with the whitespace after it) that join back to it."""
    return [piece for piece in re.split(r"(?<=\s)(?=\S)", text) if piece]


@dataclass
class Stream:
    """The chunks of one streamed completion: `opening()` before the translation, then
    `rest(answer)` once it is done. Every chunk shares one id and created time."""

    ask: Ask
    version: str  # the release serving when the stream opened (X-Adapter-Version)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def opening(self) -> bytes:
        first = {"role": "assistant"} if self.ask.chat else ""
        return event(self._chunk(first, None, self.version))

    def rest(self, answer: dict[str, Any]) -> list[bytes]:
        version = version_header(answer)
        end = {} if self.ask.chat else ""
        chunks = [self._chunk(self._delta(piece), None, version) for piece in words(answer["text"])]
        chunks.append(self._chunk(end, finish_of(answer), version))
        if self.ask.include_usage:
            last = {**self._chunk(end, None, version), "choices": [], "usage": usage_of(answer)}
            chunks.append(last)
        return [*map(event, chunks), DONE]

    def _delta(self, piece: str) -> Any:
        return {"content": piece} if self.ask.chat else piece

    def _chunk(self, delta: Any, finish: str | None, version: str) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.ask.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        choice.update(logprobs=None, finish_reason=finish)
        kind = "chat.completion.chunk" if self.ask.chat else "text_completion"
        prefix = "chatcmpl" if self.ask.chat else "cmpl"
        return {
            "id": f"{prefix}-{self.id}",
            "object": kind,
            "created": self.created,
            "model": self.ask.model,
            "system_fingerprint": version,
            "choices": [choice],
        }


# --- the routes -------------------------------------------------------------------------
class OpenAIRoutes:
    """`POST /v1/chat/completions` and `/v1/completions`, mixed into serve.Handler: it uses
    the handler's request reading, refusals and /metrics counting (annotated below)."""

    if TYPE_CHECKING:  # what serve.Handler provides
        path: str
        close_connection: bool
        wfile: Any
        service: Service
        _read_json: Callable[[], tuple[bool, Any]]
        _name_model: Callable[[Any], None]
        _fail: Callable[[ApiError], None]
        _reply: Callable[..., None]
        _call: Callable[[str, Callable[[], dict[str, Any]]], dict[str, Any] | None]
        _refusal: Callable[[str, Exception], ApiError]
        _count: Callable[[int], None]
        _client_gone: Callable[[], bool]
        send_response: Callable[[int], None]
        send_header: Callable[[str, str], None]
        end_headers: Callable[[], None]

    def _completion_request(self) -> None:
        read, request = self._read_json()
        if not read:
            return
        self._name_model(request)
        try:
            ask = parse_request(urlsplit(self.path).path, request)
        except ApiError as err:
            self._fail(err)
            return
        if ask.stream:
            self._stream(ask)
            return
        answer = self._call(ask.model, lambda: self._translate(ask))
        if answer is not None:
            self._reply(200, completion(ask, answer), {VERSION_HEADER: version_header(answer)})

    def _translate(self, ask: Ask) -> dict[str, Any]:
        return self.service.translate(ask.model, ask.text, self._client_gone, ask.max_tokens)

    def _stream(self, ask: Ask) -> None:
        """Headers and the first chunk at once; the text once the engine has translated."""
        serving = self._call(ask.model, lambda: self._stream_check(ask.model))
        if serving is None:  # refused with an HTTP status: nothing was streamed
            return
        stream = Stream(ask, version_header(serving))
        self._open_stream(stream.version)
        self.wfile.write(stream.opening())
        try:
            answer = self._translate(ask)
        except ClientGone:
            self._count(CLIENT_GONE)
            return
        except Exception as err:  # the stream is open: the refusal is its last event
            refusal = self._refusal(ask.model, err)
            self.wfile.write(event(error_body(refusal)))
            self._count(refusal.status)  # /metrics counts the outcome, not the 200 sent
            return
        for data in stream.rest(answer):
            self.wfile.write(data)
        self._count(200)

    def _stream_check(self, model: str) -> dict[str, Any]:
        """What can be refused with an HTTP status before a stream opens: a model not served
        (KeyError), of the other task (WrongTask), a full queue (Busy). Names what serves."""
        served = self.service.served.get(model)
        if served is None or served.engine is None:
            raise KeyError(model)
        if served.task != "translation":
            raise WrongTask(model, served.task)
        if self.service.queued >= self.service.config.max_queue:
            raise Busy(self.service.queued)
        return {"version_id": served.release.version_id if served.release else None}

    def _open_stream(self, version: str) -> None:
        """200 and the event-stream headers, sent now. HTTP/1.0: no length, no chunked
        encoding; the body ends when the connection closes after the last event."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header(VERSION_HEADER, version)
        self.end_headers()
        self.close_connection = True


# --- models -----------------------------------------------------------------------------
def version_header(answer: dict[str, Any]) -> str:
    """The X-Adapter-Version value: the release that answered, or `base` (fallback)."""
    return answer.get("version_id") or BASE_VERSION


def model_entry(name: str, status: dict[str, Any]) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _epoch(status), "owned_by": OWNER}


def model_list(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`/v1/models` from `/status`'s models: those that answer requests now."""
    data = [model_entry(name, s) for name, s in sorted(models.items()) if s["ready"]]
    return {"object": "list", "data": data}


def _epoch(status: dict[str, Any]) -> int:
    """When the model's engine started serving (seconds since the epoch), 0 when unknown."""
    loaded_at = status.get("loaded_at")
    return int(datetime.fromisoformat(loaded_at).timestamp()) if loaded_at else 0
