"""Faults of the Rust extension found in review: thread counts and packer counters at their limits."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
from nanochat_rs import _native
from nanochat_rs.packer import BestFitPacker
from nanochat_rs.tokenizer import SPECIAL_TOKENS, Tokenizer

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")

# Bounds the tests hold the extension to. They are far below the faulty behaviour (a thread per
# requested thread, a pool per distinct request) yet leave room for implementation choices.
MOST_THREADS_PER_POOL = 256
MOST_CACHED_POOLS = 8


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["the cat sat on the mat, 12 times"] * 10, 256 + len(SPECIAL_TOKENS) + 20)


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def threads_settle_to(bound: int, deadline_s: float = 60.0) -> int:
    """The thread count once it is <= bound (threads of a dropped pool exit asynchronously), or the
    last count seen when the deadline passes first."""
    end = time.monotonic() + deadline_s
    while (count := os_threads()) > bound and time.monotonic() < end:
        time.sleep(0.05)
    return count


# ---- num_threads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_threads", [_native.MAX_NUM_THREADS + 1, 100_000])
def test_absurd_thread_counts_are_rejected_with_the_limit(tokenizer: Tokenizer, num_threads: int) -> None:
    with pytest.raises(ValueError, match=f"at most {_native.MAX_NUM_THREADS}"):
        tokenizer.encode(["a b c"], num_threads=num_threads)
    with pytest.raises(ValueError, match=f"at most {_native.MAX_NUM_THREADS}"):
        tokenizer.encode_flat(["a b c"], num_threads=num_threads)


def test_thread_count_type_errors(tokenizer: Tokenizer) -> None:
    with pytest.raises(TypeError, match="num_threads must be an int"):
        tokenizer.encode(["a"], num_threads=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_threads must be at least 1"):
        tokenizer.encode(["a"], num_threads=0)


@linux_only
def test_a_large_thread_request_is_capped(tokenizer: Tokenizer) -> None:
    texts = ["the cat sat on the mat"] * 64
    before = os_threads()
    assert tokenizer.encode(texts, num_threads=_native.MAX_NUM_THREADS) == tokenizer.encode(texts)
    assert os_threads() - before <= MOST_THREADS_PER_POOL


@linux_only
def test_many_distinct_thread_counts_do_not_leak_pools(tokenizer: Tokenizer) -> None:
    texts = ["the cat sat on the mat"] * 16
    before = os_threads()
    expected = tokenizer.encode(texts)
    for n in range(1, 41):  # one pool per n, never dropped, left 820 threads behind
        assert tokenizer.encode(texts, num_threads=n) == expected
    settled = threads_settle_to(before + MOST_CACHED_POOLS * 40)
    assert settled - before <= MOST_CACHED_POOLS * 40


# ---- packer counters near 2**64 --------------------------------------------------------------------

U64_MAX = 2**64 - 1
BOS = 0


def _state_after_one_batch() -> dict:
    packer = BestFitPacker(7, buffer_size=3, bos_token_id=BOS)
    tokens = np.array([BOS, 1, 2, BOS, 3, BOS, 4, 5, BOS, 6, 7, 8, 9], np.uint32)
    packer.push(tokens, np.array([0, 3, 5, 8, 13], np.int64))
    assert packer.pack_into(np.zeros((1, 7), np.int64), np.zeros((1, 7), np.int64))
    return json.loads(json.dumps(packer.state_dict()))


def _shift_history(state: dict, docs: int, tokens: int) -> dict:
    """A state that is consistent but claims `docs` more documents and `tokens` more tokens were
    placed long ago (only the counters change: held documents keep their arrival numbers)."""
    state = json.loads(json.dumps(state))
    state["next_seq"] += docs
    state["stats"]["docs_in"] += docs
    state["stats"]["docs_placed"] += docs
    state["stats"]["tokens_in"] += tokens
    state["stats"]["tokens_placed"] += tokens
    return state


@pytest.mark.parametrize("docs, tokens", [
    (U64_MAX - 7, 0),  # next_seq = 2**64 - 1: the next pushed document wraps to arrival number 0
    (0, U64_MAX - 13),  # tokens_in = 2**64 - 1: the next push wraps the counter
    (2**63, 0),
    (0, 2**63),
])
def test_states_without_counter_headroom_are_rejected(docs: int, tokens: int) -> None:
    state = _shift_history(_state_after_one_batch(), docs, tokens)
    packer = BestFitPacker(7, buffer_size=3, bos_token_id=BOS)
    with pytest.raises(ValueError, match="headroom"):
        packer.load_state_dict(state)
    assert packer.stats["docs_in"] == 0  # nothing was loaded


def test_a_state_with_headroom_loads_and_keeps_counting() -> None:
    state = _shift_history(_state_after_one_batch(), 2**62, 2**62)
    packer = BestFitPacker(7, buffer_size=3, bos_token_id=BOS)
    packer.load_state_dict(state)
    packer.push(np.array([BOS, 1], np.uint32), np.array([0, 2], np.int64))
    assert packer.state_dict()["next_seq"] == state["next_seq"] + 1
    assert packer.stats["tokens_in"] == state["stats"]["tokens_in"] + 2


@pytest.mark.parametrize("key, value", [("next_seq", 2**64), ("next_seq", 2**200), ("buffer_seqs", [-1])])
def test_out_of_range_integers_are_value_errors(key: str, value: object) -> None:
    state = _state_after_one_batch()
    state[key] = value
    with pytest.raises(ValueError, match=key):
        BestFitPacker(7, buffer_size=3, bos_token_id=BOS).load_state_dict(state)


# ---- the extension documents itself ----------------------------------------------------------------


def _public_members(cls: type) -> list[tuple[str, Callable[..., object]]]:
    return [(name, member) for name, member in vars(cls).items() if not name.startswith("_")]


@pytest.mark.parametrize("cls", [_native.Encoder, _native.BpeTrainer, _native.Packer])
def test_every_native_class_method_and_getter_has_a_docstring(cls: type) -> None:
    assert (cls.__doc__ or "").strip(), cls.__name__
    undocumented = [name for name, member in _public_members(cls) if not (member.__doc__ or "").strip()]
    assert undocumented == []
    assert (_native.merges_to_vocab.__doc__ or "").strip()


def _stub_signatures() -> dict[str, list[str] | None]:
    """`name` or `Class.method` -> parameter names (None for constants and properties), from _native.pyi."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(_native.__file__).parent / "_native.pyi").read_text())
    out: dict[str, list[str] | None] = {}

    def params(fn: ast.FunctionDef) -> list[str] | None:
        if any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list):
            return None
        return [a.arg for a in fn.args.args if a.arg != "self"]

    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = None
        elif isinstance(node, ast.FunctionDef):
            out[node.name] = params(node)
        elif isinstance(node, ast.ClassDef):
            out[node.name] = None
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef):
                    out[f"{node.name}.{fn.name}"] = params(fn)
    return out


def _real_signatures() -> dict[str, list[str] | None]:
    import inspect

    def params(obj: object) -> list[str]:
        return [p for p in inspect.signature(obj).parameters if p != "self"]  # type: ignore[arg-type]

    out: dict[str, list[str] | None] = {}
    for name, obj in vars(_native).items():
        if name.startswith("_"):
            continue
        if isinstance(obj, type):
            out[name] = None
            out[f"{name}.__init__"] = params(obj)
            for member, value in vars(obj).items():
                if not member.startswith("_"):
                    out[f"{name}.{member}"] = None if inspect.isdatadescriptor(value) else params(value)
        else:
            out[name] = params(obj) if callable(obj) else None
    return out


def test_the_type_stub_matches_the_extension() -> None:
    assert _stub_signatures() == _real_signatures()
