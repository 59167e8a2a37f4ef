"""OpenAI's completion and chat-completion bodies: parsing with one-line errors, responses and stream chunks."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from typing import Any, Optional

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}

# Parameters this server does not implement, with the values that mean "off" (anything else is refused).
UNSUPPORTED = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
               "top_logprobs": (None, 0), "suffix": (None,), "logit_bias": (None, {}),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []),
               "response_format": (None, {"type": "text"})}


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}` with HTTP `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Params:
    """What one parsed request asks for. `prompt` is text or token ids (completions) or a message list (chat);
    `max_tokens` None means: what fits the slot."""

    model: Optional[str]
    prompt: Any
    max_tokens: Optional[int]
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}")
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_KINDS = {(bool,): "true or false", (int,): "an integer", (int, float): "a number", (str,): "a string",
          (dict,): "an object"}


def _field(body: dict, name: str, kinds: tuple, default=None):
    """`body[name]` if it is of `kinds` (a key of `_KINDS`; None or absent: `default`), else a 400 naming it."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise APIError(400, f"{name} must be {_KINDS[kinds]}, got {_short(value)}", param=name)
    return value


def _check_supported(body: dict) -> None:
    for name, off in UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise APIError(400, f"{name}={_short(body[name])} is not supported by this server", param=name)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"stop must be a non-empty string or a list of them, got {_short(body['stop'])}",
                       param="stop")
    return tuple(stop)


def _common(body: dict, prompt, max_tokens) -> Params:
    _check_supported(body)
    stream = _field(body, "stream", (bool,), False)
    options = _field(body, "stream_options", (dict,), {})
    if options and not stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
    return Params(model=_field(body, "model", (str,)), prompt=prompt, max_tokens=max_tokens,
                  temperature=float(_field(body, "temperature", (int, float), 1.0)),
                  top_p=float(_field(body, "top_p", (int, float), 1.0)),
                  seed=_field(body, "seed", (int,), secrets.randbits(31)) & 0x7FFFFFFF,
                  stop=_stop(body), stream=stream, include_usage=bool(options.get("include_usage")))


def completion_params(body: dict) -> Params:
    """Parses a `/v1/completions` body: one prompt, text or token ids (a list of one of either is accepted)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    ok = isinstance(prompt, str) or (isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt))
    if not ok:
        raise APIError(400, f"prompt must be a string or a list of token ids (one prompt per request), "
                            f"got {_short(prompt)}", param="prompt")
    return _common(body, prompt, _field(body, "max_tokens", (int,), 16))


def chat_params(body: dict) -> Params:
    """Parses a `/v1/chat/completions` body; message contents may be text or lists of text parts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, f"messages must be a non-empty list, got {_short(messages)}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role, got {_short(m)}", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported, got {_short(content)}",
                               param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be text, got {_short(content)}", param="messages")
        out.append({"role": m["role"], "content": content})
    max_tokens = _field(body, "max_completion_tokens", (int,), _field(body, "max_tokens", (int,)))
    return _common(body, out, max_tokens)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """Builds the response (or the stream chunks) of one request of kind "text_completion" or "chat.completion"."""

    def __init__(self, chat: bool, request_id: str, model: str):
        self.chat, self.model, self.created = chat, model, int(time.time())
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id

    def _choice(self, text: Optional[str], finish: Optional[str], stream: bool) -> dict:
        reason = None if finish is None else FINISH_REASONS[finish]
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        if stream:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason}

    def full(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [self._choice(text, finish, False)],
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: Optional[str] = None, finish: Optional[str] = None, *, role: bool = False,
              usage: Optional[dict] = None, include_usage: bool = False) -> str:
        """One server-sent event: a text delta, the finish reason, the chat role, or (choices empty) the usage."""
        if usage is not None:
            choices = []
        elif role:
            choices = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}]
        else:
            choices = [self._choice(text, finish, True)]
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"


DONE = "data: [DONE]\n\n"
