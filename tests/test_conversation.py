"""Chat rendering: the exact token layout, which tokens are supervised, and clear errors."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nanochat_rs.conversation import render_conversation, render_for_completion, render_next_turn
from nanochat_rs.tokenizer import Tokenizer

_CORPUS = ["The quick brown fox jumps over the lazy dog. 12 + 30 = 42, and 7 * 6 is 42 too!",
           "hello world, how are you today? I am fine, thanks for asking."]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(_CORPUS * 20, vocab_size=256 + 9 + 50)


def _sp(tok: Tokenizer, name: str) -> int:
    return tok.encode_special(f"<|{name}|>")


def _enc(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text)  # type: ignore[return-value]


def test_layout_and_mask_of_a_plain_conversation(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "I am fine"},
                {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "thanks"}]
    ids, mask = render_conversation(tok, messages)
    u, a = _enc(tok, "hello world"), _enc(tok, "I am fine")
    u2, a2 = _enc(tok, "how are you"), _enc(tok, "thanks")
    expected = ([(tok.bos_token_id, 0), (_sp(tok, "user_start"), 0)] + [(t, 0) for t in u]
                + [(_sp(tok, "user_end"), 0), (_sp(tok, "assistant_start"), 0)] + [(t, 1) for t in a]
                + [(_sp(tok, "assistant_end"), 1), (_sp(tok, "user_start"), 0)] + [(t, 0) for t in u2]
                + [(_sp(tok, "user_end"), 0), (_sp(tok, "assistant_start"), 0)] + [(t, 1) for t in a2]
                + [(_sp(tok, "assistant_end"), 1)])
    assert list(zip(ids, mask, strict=True)) == expected
    assert tok.decode(ids) == ("<|bos|><|user_start|>hello world<|user_end|><|assistant_start|>I am fine"
                               "<|assistant_end|><|user_start|>how are you<|user_end|><|assistant_start|>"
                               "thanks<|assistant_end|>")


def test_system_message_is_merged_into_the_first_user_message(tok: Tokenizer) -> None:
    with_system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                   {"role": "assistant", "content": "hi"}]
    merged = [{"role": "user", "content": "be brief\n\nhello"}, {"role": "assistant", "content": "hi"}]
    assert render_conversation(tok, with_system) == render_conversation(tok, merged)


def test_tool_parts_are_wrapped_and_only_the_call_is_supervised(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "what is 12 + 30?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me compute. "},
                    {"type": "python", "text": "12 + 30"},
                    {"type": "python_output", "text": "42"},
                    {"type": "text", "text": " The answer is 42."}]}]
    ids, mask = render_conversation(tok, messages)
    start = ids.index(_sp(tok, "assistant_start"))
    reply = list(zip(ids[start:], mask[start:], strict=True))
    expected = ([(_sp(tok, "assistant_start"), 0)] + [(t, 1) for t in _enc(tok, "Let me compute. ")]
                + [(_sp(tok, "python_start"), 1)] + [(t, 1) for t in _enc(tok, "12 + 30")]
                + [(_sp(tok, "python_end"), 1), (_sp(tok, "output_start"), 0)]
                + [(t, 0) for t in _enc(tok, "42")] + [(_sp(tok, "output_end"), 0)]
                + [(t, 1) for t in _enc(tok, " The answer is 42.")] + [(_sp(tok, "assistant_end"), 1)])
    assert reply == expected
    assert all(m == 0 for m in mask[:start])


def test_truncates_to_max_tokens(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hello world " * 20},
                {"role": "assistant", "content": "fine " * 20}]
    full_ids, full_mask = render_conversation(tok, messages)
    ids, mask = render_conversation(tok, messages, max_tokens=10)
    assert (ids, mask) == (full_ids[:10], full_mask[:10])
    assert render_conversation(tok, messages, max_tokens=10**6) == (full_ids, full_mask)


def test_render_for_completion_primes_the_reply(tok: Tokenizer) -> None:
    convo = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
             {"role": "user", "content": "how are you"}]
    prompt = render_for_completion(tok, convo)
    ids, _ = render_conversation(tok, convo)
    assert prompt == ids + [_sp(tok, "assistant_start")]
    # a trailing assistant message (e.g. the reference answer) is dropped, and the input is untouched
    with_answer = convo + [{"role": "assistant", "content": "fine"}]
    snapshot = [dict(m) for m in with_answer]
    assert render_for_completion(tok, with_answer) == prompt
    assert with_answer == snapshot


def test_next_turn_extends_a_rendered_conversation(tok: Tokenizer) -> None:
    """A chat front end that keeps tokens gets exactly what rendering the whole conversation gives."""
    first = [{"role": "user", "content": "hello"}]
    assert [tok.bos_token_id, *render_next_turn(tok, "hello")] == render_for_completion(tok, first)
    history, _ = render_conversation(tok, [*first, {"role": "assistant", "content": "hi"}])
    second = [*first, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "how are you"}]
    assert history + render_next_turn(tok, "how are you") == render_for_completion(tok, second)
    with pytest.raises(ValueError, match="user_text must be a str"):
        render_next_turn(tok, None)  # type: ignore[arg-type]


def test_the_tokenizer_module_knows_nothing_of_the_chat_template() -> None:
    import subprocess
    import sys

    code = "import sys, nanochat_rs.tokenizer; print('nanochat_rs.conversation' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert not hasattr(Tokenizer, "render_conversation") and not hasattr(Tokenizer, "render_for_completion")


@pytest.mark.parametrize(("messages", "match"), [
    ([], "empty"),
    ([{"role": "robot", "content": "beep"}], "unknown role 'robot'"),
    ([{"role": "assistant", "content": "hi"}], "turn 0 has role 'assistant' where 'user' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "turn 1 has role 'user' where 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "assistant", "content": "c"}], "turn 2 has role 'assistant' where 'user'"),
    ([{"role": "system", "content": "s"}], "system message must be followed by a user"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}], "followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], r"messages\[1\] is a system"),
    ([{"role": "user", "content": 42}], r"messages\[0\] \(user\) content must be a str, got int"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "content must be a str, got list"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}],
     "content must be a str or a list of parts"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     r"messages\[1\].content\[0\] has type 'image'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": 1}]}],
     r"content\[0\] text must be a str"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ["text"]}],
     r"content\[0\] must be a dict"),
    ([{"role": "user"}], "must have both 'role' and 'content'"),
    (["hello"], r"messages\[0\] must be a dict"),
    ("hello", "must be a list"),
    (None, "must be a list"),
])
def test_bad_conversations_raise_clear_value_errors(tok: Tokenizer, messages: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_conversation(tok, messages)
    with pytest.raises(ValueError, match=match):
        render_for_completion(tok, messages)


@pytest.mark.parametrize("max_tokens", [0, -1, 1.5, True, None])
def test_bad_max_tokens(tok: Tokenizer, max_tokens: Any) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        render_conversation(tok, [{"role": "user", "content": "a"}], max_tokens=max_tokens)


def test_completion_needs_a_user_turn_to_answer(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="system message must be followed by a user"):
        render_for_completion(tok, [{"role": "system", "content": "s"}])


_text = st.text(alphabet="abc xyz12+=!", max_size=30)
_part = st.fixed_dictionaries({"type": st.sampled_from(["text", "python", "python_output"]), "text": _text})
_assistant = st.one_of(_text, st.lists(_part, max_size=4))


@given(turns=st.lists(st.tuples(_text, _assistant), min_size=1, max_size=4), trailing_user=st.booleans(),
       max_tokens=st.integers(min_value=1, max_value=400))
@settings(max_examples=100, deadline=None)
def test_rendering_invariants(tok: Tokenizer, turns: list[tuple[str, Any]], trailing_user: bool,
                              max_tokens: int) -> None:
    """For any valid conversation: the mask is 1 exactly on assistant-produced tokens, the decoded text
    reproduces the content, and truncation is a prefix."""
    messages: list[dict[str, Any]] = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if trailing_user:
        messages.append({"role": "user", "content": "and then?"})
    ids, mask = render_conversation(tok, messages, max_tokens=10**6)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    assert ids[0] == tok.bos_token_id and mask[0] == 0
    supervised_specials = {_sp(tok, n) for n in ("assistant_end", "python_start", "python_end")}
    unsupervised_specials = {tok.bos_token_id} | {_sp(tok, n) for n in (
        "user_start", "user_end", "assistant_start", "output_start", "output_end")}
    for token, m in zip(ids, mask, strict=True):
        if token in supervised_specials:
            assert m == 1
        if token in unsupervised_specials:
            assert m == 0
    assert ids.count(_sp(tok, "assistant_end")) == len(turns) == sum(mask[i] for i, t in enumerate(ids)
                                                                      if t == _sp(tok, "assistant_end"))
    # the supervised tokens decode to the assistant's own text and tool calls, nothing else
    expected = ""
    for _, assistant in turns:
        parts = [{"type": "text", "text": assistant}] if isinstance(assistant, str) else assistant
        for part in parts:
            if part["type"] == "text":
                expected += part["text"]
            elif part["type"] == "python":
                expected += f"<|python_start|>{part['text']}<|python_end|>"
        expected += "<|assistant_end|>"
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == expected
    assert render_conversation(tok, messages, max_tokens=max_tokens) == (ids[:max_tokens], mask[:max_tokens])
