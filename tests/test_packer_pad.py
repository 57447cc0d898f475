"""Specification of pad mode and loss masks in the best-fit packer (nanochat_rs.packer.BestFitPacker).

Rows are checked against the slow oracle in packer_reference.py and directly against the rules:
masks only hide targets, every supervised token is a target exactly once, pad mode never splits a
document that fits a row, padding is input BOS / target -1, and a resumed packer continues exactly.
Documents use BOS = 0 and unique other tokens: token j > 0 of document i is (i + 1) * STRIDE + j.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nanochat_rs import _native
from nanochat_rs.packer import BestFitPacker
from packer_reference import ReferencePacker

SETTINGS = settings(max_examples=150, deadline=None)
STRIDE = 10_000
BOS = 0
SENTINEL = -7


def make_docs(lengths: list[int]) -> list[list[int]]:
    return [[BOS] + [(i + 1) * STRIDE + j for j in range(1, n)] for i, n in enumerate(lengths)]


def flatten(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(docs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(d) for d in docs])
    return np.array([t for d in docs for t in d], np.uint32), offsets


@dataclass
class Scenario:
    text_len: int
    buffer_size: int
    batch: int
    mode: str
    lengths: list[int]
    masks: list[list[int]]
    cuts: list[int]  # push boundaries (indices into lengths)
    masked_chunks: list[bool]  # whether each push carries its masks (cycled); unmasked ones push None

    @property
    def capacity(self) -> int:
        return self.text_len + 1

    def chunk_bounds(self) -> list[tuple[int, int]]:
        bounds = [0, *sorted(self.cuts), len(self.lengths)]
        return list(zip(bounds, bounds[1:], strict=False))

    def packer(self) -> BestFitPacker:
        return BestFitPacker(self.text_len, buffer_size=self.buffer_size, bos_token_id=BOS, mode=self.mode)

    def effective_masks(self, with_masks: bool) -> list[list[int]]:
        """The mask each document is pushed with (all ones when its push carries none)."""
        out = []
        for k, (a, b) in enumerate(self.chunk_bounds()):
            masked = with_masks and self.masked_chunks[k % len(self.masked_chunks)]
            out.extend(self.masks[a:b] if masked else [[1] * n for n in self.lengths[a:b]])
        return out


@st.composite
def scenarios(draw: st.DrawFn, modes: tuple[str, ...] = ("pad", "crop")) -> Scenario:
    text_len = draw(st.integers(1, 40))
    lengths = draw(st.lists(st.integers(1, 2 * text_len + 5), max_size=40))
    masks = [draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)) for n in lengths]
    cuts = draw(st.lists(st.integers(0, len(lengths)), max_size=4))
    masked_chunks = draw(st.lists(st.booleans(), min_size=1, max_size=3))
    return Scenario(text_len, draw(st.integers(1, 8)), draw(st.integers(1, 4)), draw(st.sampled_from(modes)),
                    lengths, masks, cuts, masked_chunks)


def drive(s: Scenario, with_masks: bool = True, after_batch=None) -> tuple[list[tuple], BestFitPacker]:
    """Push chunk by chunk (finishing with the last), packing until the packer asks for more."""
    docs, masks = make_docs(s.lengths), s.effective_masks(with_masks)
    packer = s.packer()
    batches = []
    chunks = s.chunk_bounds()
    for k, (a, b) in enumerate(chunks):
        masked = with_masks and s.masked_chunks[k % len(s.masked_chunks)]
        tokens, offsets = flatten(docs[a:b])
        packer.push(tokens, offsets, np.array([m for mm in masks[a:b] for m in mm], np.uint8) if masked else None)
        if k == len(chunks) - 1:
            packer.finish()
        while True:
            inputs = np.full((s.batch, s.text_len), SENTINEL, np.int64)
            targets = np.full((s.batch, s.text_len), SENTINEL, np.int64)
            before = packer.state_dict()
            if not packer.pack_into(inputs, targets):
                assert packer.state_dict() == before
                break
            batches.append((inputs.tolist(), targets.tolist()))
            if after_batch is not None:
                packer = after_batch(packer)
    return batches, packer


def drive_reference(s: Scenario, with_masks: bool = True) -> tuple[list[tuple], ReferencePacker]:
    ref = ReferencePacker(s.text_len, buffer_size=s.buffer_size, mode=s.mode, bos_token_id=BOS)
    docs, masks = make_docs(s.lengths), s.effective_masks(with_masks)
    batches = []
    chunks = s.chunk_bounds()
    for k, (a, b) in enumerate(chunks):
        ref.push(docs[a:b], masks[a:b])
        if k == len(chunks) - 1:
            ref.finish()
        while (batch := ref.pack(s.batch)) is not None:
            batches.append(batch)
    return batches, ref


def rows(batches: list[tuple]) -> list[tuple[list[int], list[int]]]:
    return [row for inputs, targets in batches for row in zip(inputs, targets, strict=True)]


# ---- properties ------------------------------------------------------------------------------------


@SETTINGS
@given(scenarios())
def test_rows_and_padding_match_the_oracle(s: Scenario) -> None:
    got, packer = drive(s)
    expected, ref = drive_reference(s)
    assert got == expected
    assert packer.stats["tokens_padded"] == ref.tokens_padded
    if s.mode == "crop":
        assert ref.tokens_padded == 0


@SETTINGS
@given(scenarios())
def test_masks_only_hide_targets_and_supervised_tokens_are_targets_once(s: Scenario) -> None:
    masked, _ = drive(s)
    plain, _ = drive(s, with_masks=False)
    assert len(masked) == len(plain), "masks must not change placement"
    mask_of = {tok: m for doc, mask in zip(make_docs(s.lengths), s.effective_masks(True), strict=True)
               for tok, m in zip(doc[1:], mask[1:], strict=True)}
    placed: set[int] = set()
    for (m_in, m_tgt), (p_in, p_tgt) in zip(rows(masked), rows(plain), strict=True):
        assert m_in == p_in
        for m, p in zip(m_tgt, p_tgt, strict=True):
            if p in mask_of:  # a non-BOS token: supervised exactly when its mask is 1
                placed.add(p)
                assert m == (p if mask_of[p] else -1)
            else:
                assert m in (p, -1)
    # Non-BOS tokens are never first in a row, so every placed one is someone's target.
    counts = Counter(t for _, tgt in rows(masked) for t in tgt)
    for tok, m in mask_of.items():
        assert counts[tok] == (1 if m and tok in placed else 0), tok


@SETTINGS
@given(scenarios(modes=("pad",)))
def test_pad_mode_splits_only_documents_longer_than_a_row(s: Scenario) -> None:
    batches, packer = drive(s, with_masks=False)
    # Drain one row at a time: a last batch of several rows may not fill.
    while True:
        inputs, targets = np.zeros((1, s.text_len), np.int64), np.zeros((1, s.text_len), np.int64)
        if not packer.pack_into(inputs, targets):
            break
        batches.append((inputs.tolist(), targets.tolist()))
    lengths, padded = s.lengths, 0
    seen: list[int] = []
    for inputs, targets in rows(batches):
        # Unmasked, a target is -1 only at padding: padding is a suffix of the row.
        n_pad = len(targets) - next((p for p in range(len(targets), 0, -1) if targets[p - 1] != -1), 0)
        assert -1 not in targets[:len(targets) - n_pad]
        real = s.capacity - n_pad
        assert inputs[real:] == [BOS] * (s.text_len - real)  # padding inputs hold BOS
        padded += n_pad
        row = (inputs + targets[-1:])[:real]
        starts = [p for p, t in enumerate(row) if t == BOS] + [real]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:], strict=False):
            piece = row[a:b]
            doc = piece[1] // STRIDE - 1 if len(piece) > 1 else None
            if doc is not None:
                seen.append(doc)
                assert piece == make_docs(lengths)[doc][:len(piece)]
                # Whole, or a document longer than a row filling its row alone.
                assert len(piece) == lengths[doc] or (a == 0 and len(piece) == s.capacity < lengths[doc])
    assert padded == packer.stats["tokens_padded"]
    assert len(seen) == len(set(seen))
    # After finish() the last row is padded, so every document of two tokens or more comes out.
    assert sorted(seen) == [i for i, n in enumerate(lengths) if n > 1]


def _json_restored(packer: BestFitPacker) -> BestFitPacker:
    fresh = BestFitPacker(packer.sequence_len, buffer_size=packer.buffer_size, bos_token_id=packer.bos_token_id,
                          mode=packer.mode)
    fresh.load_state_dict(json.loads(json.dumps(packer.state_dict())))
    return fresh


@SETTINGS
@given(scenarios())
def test_resume_from_state_gives_identical_rows(s: Scenario) -> None:
    plain, packer = drive(s)
    resumed, resumed_packer = drive(s, after_batch=_json_restored)
    assert resumed == plain
    assert resumed_packer.stats == packer.stats


def test_worked_example() -> None:
    # Capacity 6 (sequence_len 5), buffer 2. Documents of 4, 3 and 2 tokens.
    packer = BestFitPacker(5, buffer_size=2, bos_token_id=BOS, mode="pad")
    docs = make_docs([4, 3, 2])
    tokens, offsets = flatten(docs)
    packer.push(tokens, offsets, np.array([0, 1, 1, 0, 0, 1, 1, 0, 1], np.uint8))
    packer.finish()
    inputs, targets = np.zeros((2, 5), np.int64), np.zeros((2, 5), np.int64)
    assert packer.pack_into(inputs, targets)
    # Row 1: doc0 (4) then doc2 (2) fill it exactly. Row 2: doc1 (3), then 3 padding positions.
    assert inputs.tolist() == [[BOS, 10001, 10002, 10003, BOS], [BOS, 20001, 20002, BOS, BOS]]
    assert targets.tolist() == [[10001, 10002, -1, -1, 30001], [20001, 20002, -1, -1, -1]]
    assert packer.stats["tokens_padded"] == 3


def test_old_states_load_as_crop_mode_without_masks() -> None:
    packer = BestFitPacker(6, buffer_size=2, bos_token_id=BOS)
    packer.push(*flatten(make_docs([3, 4, 5, 2, 6])))
    inputs, targets = np.zeros((1, 6), np.int64), np.zeros((1, 6), np.int64)
    assert packer.pack_into(inputs, targets)
    state = packer.state_dict()
    assert state["mode"] == "crop" and state["buffer_masks"] == [None]
    old = {k: v for k, v in state.items() if k not in ("mode", "buffer_masks", "pending_masks")}
    old["stats"] = {k: v for k, v in state["stats"].items() if k != "tokens_padded"}
    loaded = BestFitPacker(6, buffer_size=2, bos_token_id=BOS)
    loaded.load_state_dict(old)
    assert loaded.state_dict() == state
    pad = BestFitPacker(6, buffer_size=2, bos_token_id=BOS, mode="pad")
    with pytest.raises(ValueError, match="state was saved by a packer with"):
        pad.load_state_dict(old)


def test_stats_count_padding() -> None:
    packer = BestFitPacker(4, buffer_size=1, bos_token_id=BOS, mode="pad")
    assert packer.stats["tokens_padded"] == 0
    assert "mode='pad'" in repr(packer)


# ---- errors ------------------------------------------------------------------------------------


def _doc_push() -> tuple[np.ndarray, np.ndarray]:
    return flatten(make_docs([2, 3]))


@pytest.mark.parametrize("mask, exc, match", [
    (np.ones(4, np.uint8), ValueError, "one value per token"),
    (np.ones(5, np.bool_), TypeError, "mask must have dtype uint8"),
    (np.ones(5, np.int64), TypeError, "mask must have dtype uint8"),
    (np.array([1, 0, 2, 1, 1], np.uint8), ValueError, "mask values must be 0 or 1, got 2 at index 2"),
    (np.ones((5, 1), np.uint8), ValueError, "mask must be 1-D"),
    ([1, 1, 1, 1, 1], TypeError, "mask must be a numpy array"),
])
def test_bad_mask(mask, exc, match) -> None:
    packer = BestFitPacker(8, bos_token_id=BOS, mode="pad")
    with pytest.raises(exc, match=match):
        packer.push(*_doc_push(), mask)
    assert packer.stats["docs_in"] == 0


def test_native_checks_mask_length() -> None:
    # The Rust layer re-checks what memory safety depends on, even past the wrapper.
    native = _native.Packer(8, 1000, 0, BOS, "pad")
    with pytest.raises(ValueError, match="mask has 4 values but there are 5 tokens"):
        native.push(*_doc_push(), np.ones(4, np.uint8))


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"mode": "padded", "bos_token_id": BOS}, ValueError, "mode must be one of"),
    ({"mode": 1, "bos_token_id": BOS}, TypeError, "mode must be a str"),
    ({"mode": "pad"}, ValueError, "needs bos_token_id"),
    ({"mode": "pad", "bos_token_id": BOS, "audio_prefix_len": 2}, ValueError, "does not support an audio prefix"),
])
def test_bad_mode(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        BestFitPacker(8, **kwargs)


@pytest.mark.parametrize("args, match", [
    ((8, 1000, 0, BOS, "padded"), 'mode must be "crop" or "pad"'),
    ((8, 1000, 2, BOS, "pad"), "does not support an audio prefix"),
    ((8, 1000, 0, None, "pad"), "pad mode needs bos_token_id"),
])
def test_native_rejects_bad_modes(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        _native.Packer(*args)


@pytest.mark.parametrize("key, value, exc, match", [
    ("mode", "padded", ValueError, "state\\['mode'\\]"),
    ("mode", 3, TypeError, "state\\['mode'\\] must be a str"),
    ("buffer_masks", [], ValueError, "state\\['buffer_masks'\\] has 0 entries"),
    ("buffer_masks", [3], TypeError, "must be str or None"),
    ("buffer_masks", ["AAI="], ValueError, "is not an encoded mask"),
])
def test_bad_mask_states_are_rejected(key, value, exc, match) -> None:
    packer = BestFitPacker(6, buffer_size=2, bos_token_id=BOS, mode="pad")
    tokens, offsets = flatten(make_docs([3, 4, 5]))
    packer.push(tokens, offsets, np.ones(len(tokens), np.uint8))
    assert packer.pack_into(np.zeros((1, 6), np.int64), np.zeros((1, 6), np.int64))
    state = packer.state_dict()
    before = packer.state_dict()
    with pytest.raises(exc, match=match):
        packer.load_state_dict({**state, key: value})
    assert packer.state_dict() == before
