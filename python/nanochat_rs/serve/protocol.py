"""The OpenAI-compatible wire format: typed request bodies and the error shape.

Fields OpenAI defines that this server does not implement (logprobs, tools, ...) are ignored, as
unknown fields are; `top_k` is an extension."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

__all__ = ["MAX_STOP_CHARS", "MAX_STOP_STRINGS", "APIError", "ChatCompletionRequest", "ChatMessage",
           "CompletionRequest", "StreamOptions", "error_body"]

# OpenAI takes up to 4 stop sequences. Every one is matched against the reply's tail for every token
# on the event loop, so their number and length bound that work.
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256


class APIError(Exception):
    """An error answered in OpenAI's shape with its HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _WireModel(BaseModel):
    # strict: a JSON true is not max_tokens 1, nor "0.5" a temperature (ints still pass as floats)
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI reads an explicit null as "not given" (clients send e.g. "temperature": null)
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data


class ChatMessage(_WireModel):
    role: str
    # a str, or a list of {"type": ..., "text": ...} parts: OpenAI's "text" parts for any role, and
    # (assistant) this project's "python" / "python_output"; none (an assistant turn that only called a
    # tool, in OpenAI's terms) is ""
    content: str | list[dict[str, Any]] = ""

    def as_turn(self) -> dict[str, Any]:
        """The message as `nanochat_rs.conversation` takes it: OpenAI's "developer" role is the system
        prompt, and the text parts of a user or system message are one text."""
        role = "system" if self.role == "developer" else self.role
        content = self.content
        if role != "assistant" and isinstance(content, list) and all(
                part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
            content = "\n".join(part["text"] for part in content)
        return {"role": role, "content": content}


class StreamOptions(_WireModel):
    include_usage: bool = False


class _SamplingRequest(_WireModel):

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = _stop_list(stop)
        if len(stops) > MAX_STOP_STRINGS:
            raise PydanticCustomError("too_many_stops", "at most {limit} stop sequences are allowed, got {count}",
                                      {"limit": MAX_STOP_STRINGS, "count": len(stops)})
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise PydanticCustomError("stop_too_long", "a stop sequence may have at most {limit} characters, got "
                                      "{length}", {"limit": MAX_STOP_CHARS, "length": longest})
        for text in stops:  # a lone surrogate could never match a reply: say so rather than ignore it
            try:
                text.encode()
            except UnicodeEncodeError:
                raise PydanticCustomError("invalid_unicode", "a stop sequence holds an unpaired surrogate, which is "
                                          "not valid Unicode") from None
        return stop

    @property
    def stop_strings(self) -> list[str]:
        return _stop_list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def token_limit_param(self) -> str:
        """The field that limits the reply's tokens (named in error messages)."""
        return "max_tokens"

    @property
    def token_limit(self) -> int | None:
        return getattr(self, self.token_limit_param)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens

    @property
    def token_limit_param(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"


class CompletionRequest(_SamplingRequest):
    prompt: str


def _stop_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])
