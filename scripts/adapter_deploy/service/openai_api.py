"""The OpenAI-compatible face of the service: `/v1/models` and `/v1/chat/completions`.

A chat completion is a translation: `model` is a model name from params.yaml, the last user
message is the text. Its content is a plain string or TranslateGemma's structured parts,
`[{"type": "text", "source_lang_code": "en", "target_lang_code": "es", "text": "..."}]`.
The adapters are trained for one language pair (SOURCE_LANG -> TARGET_LANG): a request for
another pair is refused rather than answered in the wrong language. Sampling parameters
(temperature, max_tokens, ...) are ignored: a translation is decoded greedily. Errors take
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from adapter_deploy.engines.base import SOURCE_LANG, TARGET_LANG

OWNER = "adapter-deploy"
# What the version header says when the base model answered (start-up fallback): no release.
BASE_VERSION = "base"


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


def chat_request(body: Any) -> tuple[str, str]:
    """(model, text to translate) of a chat completion request, or ApiError 400 saying why."""
    if not isinstance(body, dict):
        raise ApiError(400, "send a JSON object with model and messages")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model must be a model name, e.g. gemma_4b", "invalid_value", "model")
    if body.get("stream"):
        raise ApiError(
            400,
            "stream: true is not supported; a translation comes back whole "
            "(leave stream out or send stream: false)",
            "unsupported_value",
            "stream",
        )
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1: a translation has one answer", "unsupported_value", "n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "invalid_value", "messages")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return model, _text_of(message.get("content"))
    raise ApiError(400, "no user message: it holds the text to translate", None, "messages")


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


def chat_completion(model: str, answer: dict[str, Any]) -> dict[str, Any]:
    """A `chat.completion` object for one translation answer of `Service.translate`."""
    usage = answer.get("usage") or {}
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": version_header(answer),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer["text"]},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


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
