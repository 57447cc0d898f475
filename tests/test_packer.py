"""Specification of the best-fit packer (nanochat_rs.packer.BestFitPacker, Rust).

Rows are checked two independent ways: against the slow list-scan oracle in packer_reference.py, and
directly against the rules (every placement decision is re-derived from the rows alone, using
documents whose tokens identify the document and the position inside it).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nanochat_rs.packer import BestFitPacker
from packer_reference import ReferencePacker

SETTINGS = settings(max_examples=150, deadline=None)
MARKER = 3_000_000_000  # first token of document i is MARKER + i: identifies it even when cropped to 1
STRIDE = 10_000  # token j > 0 of document i is (i + 1) * STRIDE + j
SENTINEL = -7
BOS = 0


# ---- fixtures as data --------------------------------------------------------------------------


def make_docs(lengths: list[int], bos: int | None = None) -> list[list[int]]:
    """Documents with globally unique tokens; with `bos` they start with it instead of a marker."""
    return [[MARKER + i if bos is None else bos] + [(i + 1) * STRIDE + j for j in range(1, n)]
            for i, n in enumerate(lengths)]


def flatten(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(docs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(d) for d in docs])
    tokens = np.array([t for d in docs for t in d], np.uint32)
    return tokens, offsets


@dataclass
class Scenario:
    text_len: int
    audio: int
    buffer_size: int
    batch: int
    lengths: list[int]
    cuts: list[int]  # push boundaries (indices into lengths)

    @property
    def sequence_len(self) -> int:
        return self.text_len + self.audio

    @property
    def capacity(self) -> int:
        return self.text_len + 1

    def chunks(self, docs: list[list[int]]) -> list[list[list[int]]]:
        bounds = [0, *sorted(self.cuts), len(docs)]
        return [docs[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    def packer(self, bos: int | None = None) -> BestFitPacker:
        return BestFitPacker(self.sequence_len, buffer_size=self.buffer_size, audio_prefix_len=self.audio,
                             bos_token_id=bos)

    def reference(self) -> ReferencePacker:
        return ReferencePacker(self.sequence_len, buffer_size=self.buffer_size, audio_prefix_len=self.audio)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    text_len = draw(st.integers(1, 40))
    lengths = draw(st.lists(st.integers(1, 3 * text_len + 5), max_size=40))
    cuts = draw(st.lists(st.integers(0, len(lengths)), max_size=4))
    return Scenario(text_len, draw(st.integers(0, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 4)),
                    lengths, cuts)


# ---- driving the packer like the dataloader does ------------------------------------------------------


def new_batch(s: Scenario) -> tuple[np.ndarray, np.ndarray]:
    return (np.full((s.batch, s.text_len), SENTINEL, np.int64), np.full((s.batch, s.sequence_len), SENTINEL, np.int64))


def drive(s: Scenario, docs: list[list[int]], packer: BestFitPacker, after_batch=None) -> list[tuple]:
    """Push chunk by chunk (finishing with the last), packing until the packer asks for more.

    Every failed pack_into must leave the state exactly as it was.
    """
    batches = []
    chunks = s.chunks(docs)
    for k, chunk in enumerate(chunks):
        packer.push(*flatten(chunk))
        if k == len(chunks) - 1:
            packer.finish()
        while True:
            before = packer.state_dict()
            inputs, targets = new_batch(s)
            if not packer.pack_into(inputs, targets):
                assert packer.state_dict() == before
                break
            batches.append((inputs.tolist(), targets.tolist()))
            if after_batch is not None:
                packer = after_batch(packer)
    return batches


def drive_reference(s: Scenario, docs: list[list[int]]) -> list[tuple]:
    ref = s.reference()
    batches = []
    chunks = s.chunks(docs)
    for k, chunk in enumerate(chunks):
        ref.push(chunk)
        if k == len(chunks) - 1:
            ref.finish()
        while (batch := ref.pack(s.batch)) is not None:
            batches.append(batch)
    return batches


def rows_of(s: Scenario, batches: list[tuple]) -> list[list[int]]:
    """Whole rows (C tokens) back from (inputs, targets), checking how the two views relate."""
    rows = []
    for inputs, targets in batches:
        for inp, tgt in zip(inputs, targets, strict=True):
            assert tgt[:s.audio] == [-1] * s.audio
            row = inp + tgt[-1:]
            assert tgt[s.audio:] == row[1:]
            assert SENTINEL not in row
            rows.append(row)
    return rows


def pieces(row: list[int]) -> list[tuple[int, list[int]]]:
    """Split a row into (document index, tokens) at document markers."""
    assert row[0] >= MARKER, "every row starts at the beginning of a document"
    out: list[tuple[int, list[int]]] = []
    for t in row:
        if t >= MARKER:
            out.append((t - MARKER, [t]))
        else:
            out[-1][1].append(t)
    return out


# ---- properties ------------------------------------------------------------------------------------


@SETTINGS
@given(scenarios())
def test_rows_match_reference(s: Scenario) -> None:
    docs = make_docs(s.lengths)
    assert drive(s, docs, s.packer()) == drive_reference(s, docs)


@SETTINGS
@given(scenarios())
def test_bos_rows_match_reference_and_start_with_bos(s: Scenario) -> None:
    docs = make_docs(s.lengths, bos=BOS)
    batches = drive(s, docs, s.packer(bos=BOS))
    assert batches == drive_reference(s, docs)
    for row in rows_of(s, batches):
        assert row[0] == BOS and len(row) == s.capacity


@SETTINGS
@given(scenarios())
def test_every_placement_follows_the_rules(s: Scenario) -> None:
    """Re-derive each decision from the rows alone: no oracle involved."""
    docs = make_docs(s.lengths)
    packer = s.packer()
    rows = rows_of(s, drive(s, docs, packer))
    consumed: set[int] = set()
    cropped_tokens = 0
    for row in rows:
        assert len(row) == s.capacity
        pos = 0
        for doc_id, piece in pieces(row):
            doc = docs[doc_id]
            assert doc_id not in consumed, "a document is used at most once"
            assert piece == doc[:len(piece)], "pieces are document heads, in order, nothing invented"
            remaining = s.capacity - pos
            # Top-ups before every placement: the buffer holds the first `consumed + buffer_size`
            # documents of the stream that have not been used yet.
            buffer = [i for i in range(min(len(docs), len(consumed) + s.buffer_size)) if i not in consumed]
            assert doc_id in buffer
            fitting = [i for i in buffer if len(docs[i]) <= remaining]
            if len(piece) == len(doc) and fitting:
                best = max(len(docs[i]) for i in fitting)
                assert len(doc) == best, "a whole document is the longest that fits"
                assert doc_id == min(i for i in fitting if len(docs[i]) == best), "ties go to the earliest"
            else:
                assert not fitting and len(piece) == remaining, "crop only when nothing fits, filling the row"
                discarded = len(doc) - remaining
                assert all(len(docs[i]) - remaining >= discarded for i in buffer), "crop discards the least"
                assert doc_id == min(i for i in buffer if len(docs[i]) == len(doc)), "ties go to the earliest"
                cropped_tokens += discarded
            consumed.add(doc_id)
            pos += len(piece)
    stats = packer.stats
    assert stats["docs_in"] == len(docs) and stats["tokens_in"] == sum(s.lengths)
    assert stats["tokens_placed"] == len(rows) * s.capacity
    assert stats["tokens_cropped"] == cropped_tokens
    assert stats["rows_packed"] == len(rows)
    held = stats["tokens_buffered"] + stats["tokens_pending"]
    assert stats["tokens_in"] == stats["tokens_placed"] + stats["tokens_cropped"] + held
    assert stats["docs_buffered"] + stats["docs_pending"] == len(docs) - len(consumed)


def _restored(packer: BestFitPacker) -> BestFitPacker:
    """A brand-new packer loaded from a JSON round trip of `packer`'s state."""
    state = json.loads(json.dumps(packer.state_dict()))
    fresh = BestFitPacker(packer.sequence_len, buffer_size=packer.buffer_size,
                          audio_prefix_len=packer.audio_prefix_len, bos_token_id=packer.bos_token_id)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == packer.state_dict() and fresh.stats == packer.stats
    return fresh


@SETTINGS
@given(scenarios())
def test_resume_from_state_gives_identical_rows(s: Scenario) -> None:
    docs = make_docs(s.lengths)
    assert drive(s, docs, s.packer(), after_batch=_restored) == drive(s, docs, s.packer())


@SETTINGS
@given(scenarios(), st.integers(0, 5))
def test_resume_at_batch_k(s: Scenario, k: int) -> None:
    docs = make_docs(s.lengths, bos=BOS)
    packer = s.packer(bos=BOS)
    packer.push(*flatten(docs))
    packer.finish()
    for _ in range(k):
        if not packer.pack_into(*new_batch(s)):
            break
    resumed = _restored(packer)
    resumed_pickled = s.packer(bos=BOS)
    resumed_pickled.load_state_dict(pickle.loads(pickle.dumps(packer.state_dict())))
    while True:
        a, b, c = new_batch(s), new_batch(s), new_batch(s)
        ok = packer.pack_into(*a)
        assert resumed.pack_into(*b) == ok and resumed_pickled.pack_into(*c) == ok
        if not ok:
            break
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1])


# ---- examples --------------------------------------------------------------------------------------


def test_worked_example() -> None:
    # C = 8. Buffer {6, 5, 9, 3}: place 6, top up with 4; 2 left: nothing fits, crop the 3 (shortest).
    docs = make_docs([6, 5, 9, 3, 4, 9], bos=BOS)
    packer = BestFitPacker(7, buffer_size=4, bos_token_id=BOS)
    packer.push(*flatten(docs))
    inputs, targets = np.zeros((1, 7), np.int64), np.zeros((1, 7), np.int64)
    assert packer.pack_into(inputs, targets)
    row = docs[0] + docs[3][:2]
    assert inputs[0].tolist() == row[:-1] and targets[0].tolist() == row[1:]
    assert packer.stats["tokens_cropped"] == 1 and packer.stats["docs_cropped"] == 1


def test_audio_prefix_targets_hold_ignore_index() -> None:
    packer = BestFitPacker(6, buffer_size=1, audio_prefix_len=2, bos_token_id=BOS)
    docs = make_docs([5], bos=BOS)
    packer.push(*flatten(docs))
    packer.finish()
    inputs, targets = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)
    assert packer.pack_into(inputs, targets)
    assert inputs[0].tolist() == docs[0][:4]
    assert targets[0].tolist() == [-1, -1] + docs[0][1:]


def test_false_return_leaves_state_unchanged() -> None:
    packer = BestFitPacker(7, buffer_size=3, bos_token_id=BOS)
    packer.push(*flatten(make_docs([4] * 5, bos=BOS)))
    state, stats = packer.state_dict(), packer.stats
    assert not packer.pack_into(np.zeros((2, 7), np.int64), np.zeros((2, 7), np.int64))
    assert packer.state_dict() == state and packer.stats == stats
    # More documents make the same call succeed.
    packer.push(*flatten(make_docs([4], bos=BOS)))
    assert packer.pack_into(np.zeros((2, 7), np.int64), np.zeros((2, 7), np.int64))


def test_finish_drains_then_fails_without_change() -> None:
    packer = BestFitPacker(3, buffer_size=100, bos_token_id=BOS)
    packer.push(*flatten(make_docs([4, 4, 2], bos=BOS)))
    out = np.zeros((1, 3), np.int64), np.zeros((1, 3), np.int64)
    assert not packer.pack_into(*out)  # buffer cannot reach 100 documents while the stream is open
    packer.finish()
    assert packer.finished
    assert packer.pack_into(*out) and packer.pack_into(*out)
    state = packer.state_dict()
    assert not packer.pack_into(*out)  # one 2-token document cannot fill a 4-token row
    assert packer.state_dict() == state
    with pytest.raises(ValueError, match="after finish"):
        packer.push(*flatten(make_docs([2], bos=BOS)))


def test_torch_tensors_are_written_in_place() -> None:
    packer = BestFitPacker(4, buffer_size=1, bos_token_id=BOS)
    docs = make_docs([5], bos=BOS)
    packer.push(*flatten(docs))
    inputs, targets = torch.full((1, 4), -5, dtype=torch.long), torch.full((1, 4), -5, dtype=torch.long)
    assert packer.pack_into(inputs, targets)
    assert inputs.tolist() == [docs[0][:4]] and targets.tolist() == [docs[0][1:]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_tensors() -> None:
    packer = BestFitPacker(4, buffer_size=1, bos_token_id=BOS)
    docs = make_docs([5], bos=BOS)
    packer.push(*flatten(docs))
    inputs = torch.zeros((1, 4), dtype=torch.long).pin_memory()
    targets = torch.zeros((1, 4), dtype=torch.long).pin_memory()
    assert packer.pack_into(inputs, targets)
    assert inputs.tolist() == [docs[0][:4]]


def test_empty_push_and_stats_keys() -> None:
    packer = BestFitPacker(4)
    packer.push(np.zeros(0, np.uint32), np.zeros(1, np.int64))
    assert set(packer.stats) >= {"docs_in", "tokens_in", "tokens_placed", "tokens_cropped", "tokens_padded"}
    assert packer.stats["docs_in"] == 0
    assert "BestFitPacker(sequence_len=4" in repr(packer)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(sequence_len=4, audio_prefix_len=4), ValueError, "greater than audio_prefix_len"),
    (dict(sequence_len=0), ValueError, "sequence_len must be >= 1"),
    (dict(sequence_len=8, buffer_size=0), ValueError, "buffer_size must be >= 1"),
    (dict(sequence_len=8, audio_prefix_len=-1), ValueError, "audio_prefix_len"),
    (dict(sequence_len=8.0), TypeError, "sequence_len must be an int"),
    (dict(sequence_len=True), TypeError, "sequence_len must be an int"),
    (dict(sequence_len=8, bos_token_id=2**32), ValueError, "uint32"),
])
def test_bad_config(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        BestFitPacker(**kwargs)


def _tok(*values: int, dtype=np.uint32) -> np.ndarray:
    return np.array(values, dtype)


def _off(*values: int, dtype=np.int64) -> np.ndarray:
    return np.array(values, dtype)


@pytest.mark.parametrize("tokens, offsets, exc, match", [
    (_tok(0, 5, 6), _off(0, 2, 1, 3), ValueError, "strictly increasing"),
    (_tok(0, 5, 6), _off(1, 3), ValueError, r"offsets\[0\] must be 0"),
    (_tok(0, 5, 6), _off(0, 4), ValueError, r"offsets\[-1\]"),
    (_tok(0, 5, 6), _off(0, 2), ValueError, r"offsets\[-1\]"),
    (_tok(0, 5, 6), _off(0, -1, 3), ValueError, "strictly increasing"),
    (_tok(0, 5, 6), _off(0, 0, 3), ValueError, "document 0 is empty"),
    (_tok(0, 5, 6), _off(), ValueError, "at least one value"),
    (_tok(0, 5, 6), _off(0, 1, 3), ValueError, "document 1 starts with token 5, expected BOS token 0"),
    (_tok(0, 5, 6, dtype=np.int64), _off(0, 3), TypeError, "tokens must have dtype uint32"),
    (_tok(0, 5, 6), _off(0, 3, dtype=np.int32), TypeError, "offsets must have dtype int64"),
    (_tok(0, 5, 6).reshape(1, 3), _off(0, 3), ValueError, "tokens must be 1-D"),
    ([0, 5, 6], _off(0, 3), TypeError, "numpy array or a CPU torch tensor"),
])
def test_bad_push(tokens, offsets, exc, match) -> None:
    packer = BestFitPacker(8, buffer_size=1, bos_token_id=0)
    with pytest.raises(exc, match=match):
        packer.push(tokens, offsets)
    assert packer.stats["docs_in"] == 0


def test_non_contiguous_push_input_is_accepted() -> None:
    packer = BestFitPacker(8, buffer_size=1, bos_token_id=0)
    tokens = np.array([0, 99, 5, 99, 0, 99], np.uint32)[::2]
    packer.push(tokens, np.array([0, 2, 3], np.int64))
    assert packer.stats["tokens_in"] == 3


def _ready_packer() -> BestFitPacker:
    packer = BestFitPacker(4, buffer_size=1, audio_prefix_len=1, bos_token_id=BOS)
    packer.push(*flatten(make_docs([9, 9], bos=BOS)))
    return packer


@pytest.mark.parametrize("make_outputs, exc, match", [
    (lambda: (np.zeros((1, 3), np.int32), np.zeros((1, 4), np.int64)), TypeError, "inputs must have dtype int64"),
    (lambda: (np.zeros((1, 3), np.int64), np.zeros((1, 4), np.float64)), TypeError, "targets must have dtype"),
    (lambda: (np.zeros((1, 4), np.int64), np.zeros((1, 4), np.int64)), ValueError, r"inputs must have shape \(B, 3\)"),
    (lambda: (np.zeros((1, 3), np.int64), np.zeros((1, 3), np.int64)), ValueError, r"targets must have shape \(B, 4\)"),
    (lambda: (np.zeros((0, 3), np.int64), np.zeros((0, 4), np.int64)), ValueError, "B >= 1"),
    (lambda: (np.zeros(3, np.int64), np.zeros((1, 4), np.int64)), ValueError, "inputs must have shape"),
    (lambda: (np.zeros((1, 3), np.int64), np.zeros((2, 4), np.int64)), ValueError, "same number of rows"),
    (lambda: (np.zeros((1, 6), np.int64)[:, ::2], np.zeros((1, 4), np.int64)), ValueError, "C-contiguous"),
    (lambda: (_readonly(np.zeros((1, 3), np.int64)), np.zeros((1, 4), np.int64)), ValueError, "writable"),
    (lambda: _overlapping(), ValueError, "share memory"),
    (lambda: (torch.zeros((1, 3), dtype=torch.int32), torch.zeros((1, 4), dtype=torch.long)), TypeError, "int64"),
    (lambda: (torch.zeros((1, 3), dtype=torch.long).expand(2, 3),
              torch.zeros((2, 4), dtype=torch.long)), ValueError, "C-contiguous"),
    (lambda: ([[0, 0, 0]], np.zeros((1, 4), np.int64)), TypeError, "numpy array or a CPU torch tensor"),
])
def test_bad_outputs(make_outputs, exc, match) -> None:
    packer = _ready_packer()
    state = packer.state_dict()
    with pytest.raises(exc, match=match):
        packer.pack_into(*make_outputs())
    assert packer.state_dict() == state


def test_grad_tensor_is_rejected() -> None:
    inputs = torch.zeros((1, 3), dtype=torch.float32, requires_grad=True)
    with pytest.raises(ValueError, match="require grad"):
        _ready_packer().pack_into(inputs, torch.zeros((1, 4), dtype=torch.long))


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _overlapping() -> tuple[np.ndarray, np.ndarray]:
    base = np.zeros(8, np.int64)
    return base[:3].reshape(1, 3), base[2:6].reshape(1, 4)


# ---- state errors ------------------------------------------------------------------------------


def _state_after_one_batch() -> tuple[BestFitPacker, dict]:
    packer = BestFitPacker(7, buffer_size=3, bos_token_id=BOS)
    packer.push(*flatten(make_docs([6, 5, 9, 3, 4, 9, 2], bos=BOS)))
    assert packer.pack_into(np.zeros((1, 7), np.int64), np.zeros((1, 7), np.int64))
    return packer, json.loads(json.dumps(packer.state_dict()))


def _edit(state: dict, key: str, value) -> dict:
    state = json.loads(json.dumps(state))
    if key.startswith("stats."):
        state["stats"][key[6:]] = value
    elif value is KeyError:
        del state[key]
    else:
        state[key] = value
        if key in ("buffer_docs", "pending_docs") and isinstance(value, list):
            # Keep one mask entry per document, so the edit reaches the check it aims at.
            state[key.replace("docs", "masks")] = [None] * len(value)
    return state


@pytest.mark.parametrize("key, value, exc, match", [
    ("format", "something else", ValueError, "not a packer state"),
    ("version", 99, ValueError, "not a packer state"),
    ("buffer_docs", KeyError, ValueError, "missing keys"),
    ("seq_len", 8, ValueError, "state was saved by a packer with"),
    ("buffer_size", 4, ValueError, "state was saved by a packer with"),
    ("bos_token_id", None, ValueError, "state was saved by a packer with"),
    ("next_seq", 6, ValueError, "next_seq"),
    ("next_seq", -1, ValueError, "next_seq"),
    ("next_seq", "7", TypeError, "next_seq"),
    ("finished", 1, TypeError, "finished"),
    ("stats.tokens_in", 1, ValueError, "tokens_in"),
    ("stats.docs_placed", 0, ValueError, "docs_in"),
    ("stats", {}, ValueError, "stats"),
    ("buffer_docs", ["not base64!"], ValueError, "buffer_seqs has"),
    ("pending_docs", ["not base64!"], ValueError, r"pending_docs\[0\] is not an encoded document"),
    ("pending_docs", ["AgEA"], ValueError, "starts with 1, not BOS"),
    ("pending_docs", "AAAAAA==", TypeError, "must be a list"),
    ("pending_docs", [1], TypeError, r"pending_docs'\]\[0\] must be str"),
    ("buffer_seqs", [2, 1], ValueError, "increasing arrival order"),
])
def test_bad_states_are_rejected(key, value, exc, match) -> None:
    _, state = _state_after_one_batch()
    packer = BestFitPacker(7, buffer_size=3, bos_token_id=BOS)
    with pytest.raises(exc, match=match):
        packer.load_state_dict(_edit(state, key, value))
    assert packer.stats["docs_in"] == 0  # nothing was loaded
    packer.load_state_dict(state)
    assert packer.stats["docs_in"] == 7


def test_state_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match="state must be a dict"):
        BestFitPacker(4).load_state_dict([1, 2])  # type: ignore[arg-type]
