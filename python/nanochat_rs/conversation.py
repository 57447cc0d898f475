"""Chat formatting: conversations -> token ids plus the supervision mask.

Every problem with the shape of a conversation raises ValueError naming the offending message, so
callers have one exception type to catch for bad chat data.

Layout of a rendered conversation (mask in brackets; 1 = the model is trained to produce it):

    <|bos|>[0]
    <|user_start|>[0] user text[0] <|user_end|>[0]
    <|assistant_start|>[0] assistant text[1] <|assistant_end|>[1]
    ...

Assistant content may be a list of parts. Python parts become
`<|python_start|> code <|python_end|>` (supervised: the model must learn to call the tool), and
python_output parts become `<|output_start|> text <|output_end|>` (not supervised: at inference the
engine forces these tokens from the calculator's result).

A leading system message is merged into the first user message, since the special-token vocabulary
has no system role.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")


class ChatTokenizer(Protocol):
    """What rendering needs from a tokenizer (nanochat_rs.tokenizer.Tokenizer provides it)."""

    @property
    def bos_token_id(self) -> int: ...

    def encode_special(self, name: str) -> int: ...

    def encode(self, text: str) -> list[int]: ...


class _Builder:
    """Accumulates ids and their mask in lockstep so the two can never drift apart."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self.mask: list[int] = []

    def special(self, name: str, mask: int) -> None:
        self.ids.append(self._tokenizer.encode_special(name))
        self.mask.append(mask)

    def text(self, text: str, mask: int) -> None:
        tokens = self._tokenizer.encode(text) if text else []
        self.ids.extend(tokens)
        self.mask.extend([mask] * len(tokens))


def _validate_message(index: int, message: object) -> tuple[str, Any]:
    if not isinstance(message, Mapping):
        raise ValueError(f"messages[{index}] must be a dict with 'role' and 'content', "
                        f"got {type(message).__name__}")
    if "role" not in message or "content" not in message:
        raise ValueError(f"messages[{index}] must have both 'role' and 'content' keys, "
                         f"got keys {sorted(map(str, message))}")
    role = message["role"]
    if role not in ROLES:
        raise ValueError(f"messages[{index}] has unknown role {role!r}; expected one of {', '.join(ROLES)}")
    content = message["content"]
    if role == "assistant" and isinstance(content, list):
        for part_index, part in enumerate(content):
            _validate_part(index, part_index, part)
    elif not isinstance(content, str):
        allowed = "a str or a list of parts" if role == "assistant" else "a str"
        raise ValueError(f"messages[{index}] ({role}) content must be {allowed}, "
                         f"got {type(content).__name__}")
    return role, content


def _validate_part(index: int, part_index: int, part: object) -> None:
    where = f"messages[{index}].content[{part_index}]"
    if not isinstance(part, Mapping):
        raise ValueError(f"{where} must be a dict with 'type' and 'text', got {type(part).__name__}")
    if part.get("type") not in PART_TYPES:
        raise ValueError(f"{where} has type {part.get('type')!r}; expected one of {', '.join(PART_TYPES)}")
    if not isinstance(part.get("text"), str):
        raise ValueError(f"{where} text must be a str, got {type(part.get('text')).__name__}")


def _normalise(messages: object) -> list[tuple[str, Any]]:
    """Validate, merge a leading system message into the first user turn, check alternation."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is empty: a conversation needs at least one user message")
    turns = [_validate_message(i, m) for i, m in enumerate(messages)]
    for i, (role, _) in enumerate(turns[1:], start=1):
        if role == "system":
            raise ValueError(f"messages[{i}] is a system message; only the first message may be one")
    if turns[0][0] == "system":
        if len(turns) < 2 or turns[1][0] != "user":
            raise ValueError("a system message must be followed by a user message to merge into")
        system, (_, user) = turns[0][1], turns[1]
        turns = [("user", f"{system}\n\n{user}" if system else user)] + turns[2:]
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"turn {i} has role {role!r} where {expected!r} was expected: "
                             "conversations must alternate user/assistant, starting with user "
                             "(after merging any system message)")
    return turns


def _render_assistant(builder: _Builder, content: str | list[Mapping[str, str]]) -> None:
    builder.special("<|assistant_start|>", 0)
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    for part in parts:
        kind, text = part["type"], part["text"]
        if kind == "text":
            builder.text(text, 1)
        elif kind == "python":
            builder.special("<|python_start|>", 1)
            builder.text(text, 1)
            builder.special("<|python_end|>", 1)
        else:  # python_output: produced by the tool at inference, so never a training target
            builder.special("<|output_start|>", 0)
            builder.text(text, 0)
            builder.special("<|output_end|>", 0)
    builder.special("<|assistant_end|>", 1)


def _render_user(builder: _Builder, text: str) -> None:
    builder.special("<|user_start|>", 0)
    builder.text(text, 0)
    builder.special("<|user_end|>", 0)


def _render(tokenizer: ChatTokenizer, turns: list[tuple[str, Any]]) -> _Builder:
    builder = _Builder(tokenizer)
    builder.ids.append(tokenizer.bos_token_id)
    builder.mask.append(0)
    for role, content in turns:
        if role == "user":
            _render_user(builder, content)
        else:
            _render_assistant(builder, content)
    return builder


def validate_conversation(messages: object) -> None:
    """Raise the ValueError rendering would raise for `messages` (roles out of order, an empty
    conversation, a malformed message), without a tokenizer: for checking data before training on it."""
    _normalise(messages)


def render_conversation(tokenizer: ChatTokenizer, messages: Sequence[Mapping[str, Any]],
                        max_tokens: int = 2048) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its mask (1 = supervised), both cut to `max_tokens`."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    builder = _render(tokenizer, _normalise(messages))
    return builder.ids[:max_tokens], builder.mask[:max_tokens]


def render_for_completion(tokenizer: ChatTokenizer, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Ids that prime the assistant's reply: the conversation up to its last user message, then
    <|assistant_start|>. A trailing assistant message (e.g. the reference answer) is dropped."""
    turns = _normalise(messages)
    if turns[-1][0] == "assistant":
        turns = turns[:-1]
    builder = _render(tokenizer, turns)
    builder.special("<|assistant_start|>", 0)
    return builder.ids


def render_next_turn(tokenizer: ChatTokenizer, user_text: str) -> list[int]:
    """Ids that extend a rendered conversation (ending in <|assistant_end|>, or just <|bos|>) by one
    user message and prime the reply: <|user_start|> text <|user_end|> <|assistant_start|>.

    For chat front ends that keep the conversation as tokens, so the assistant's replies stay
    exactly as generated instead of being re-encoded from their text."""
    if not isinstance(user_text, str):
        raise ValueError(f"user_text must be a str, got {type(user_text).__name__}")
    builder = _Builder(tokenizer)
    _render_user(builder, user_text)
    builder.special("<|assistant_start|>", 0)
    return builder.ids


# How a reply's tool call reads in a terminal or a web page: "[calculator] 123*45 -> 5535", then the
# assistant's own words on the next line.
TOOL_DISPLAY = {"<|python_start|>": "[calculator] ", "<|python_end|>": " ", "<|output_start|>": "-> ",
                "<|output_end|>": "\n"}


class DisplayTokenizer(ChatTokenizer, Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


def readable_reply(tokenizer: DisplayTokenizer, tokens: Sequence[int]) -> str:
    """The text of a reply with its tool calls and their output shown as `TOOL_DISPLAY` says instead of
    as raw special tokens; every other token decodes as usual."""
    markers = {tokenizer.encode_special(name): text for name, text in TOOL_DISPLAY.items()}
    pieces: list[str] = []
    start = 0
    for i, token in enumerate(tokens):
        if token in markers:
            pieces.append(tokenizer.decode(tokens[start:i]))
            pieces.append(markers[token])
            start = i + 1
    pieces.append(tokenizer.decode(tokens[start:]))
    return "".join(pieces)
