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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    # a str, or (assistant) a list of {"type": "text" | "python" | "python_output", "text": ...} parts
    content: str | list[dict[str, Any]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI reads an explicit null as "not given" (clients send e.g. "temperature": null)
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data

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
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise PydanticCustomError("too_many_stops", "at most {limit} stop sequences are allowed, got {count}",
                                      {"limit": MAX_STOP_STRINGS, "count": len(stops)})
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise PydanticCustomError("stop_too_long", "a stop sequence may have at most {limit} characters, got "
                                      "{length}", {"limit": MAX_STOP_CHARS, "length": longest})
        return stop

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: str
