"""Spec for loss_eval.evaluate_bpb: nats over byte-bearing targets / (ln 2 * their bytes)."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from nanochat_rs.common import compute_cleanup
from nanochat_rs.loss_eval import evaluate_bpb


class BigramModel(torch.nn.Module):
    """Stands in for GPT: logits depend only on the current token; honours the forward contract."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(logits.clone().float())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss_reduction: str = "mean") -> torch.Tensor:
        logits = self.table[idx]
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)


def batches_of(*pairs: tuple[list[list[int]], list[list[int]]]) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    for inputs, targets in pairs:
        yield torch.tensor(inputs), torch.tensor(targets), {"state": "ignored"}


def reference_bpb(table: torch.Tensor, pairs: list[tuple[list[list[int]], list[list[int]]]],
                  token_bytes: list[int]) -> float:
    """Token by token, in float64 Python arithmetic."""
    nats, nbytes = 0.0, 0
    for inputs, targets in pairs:
        for row_in, row_tg in zip(inputs, targets, strict=True):
            for x, y in zip(row_in, row_tg, strict=True):
                if y < 0 or token_bytes[y] == 0:
                    continue
                logits = [float(v) for v in table[x]]
                top = max(logits)
                log_z = top + math.log(sum(math.exp(v - top) for v in logits))
                nats += log_z - logits[y]
                nbytes += token_bytes[y]
    return nats / (math.log(2) * nbytes)


# p = (1/2, 1/4, 1/8, 1/8) everywhere: a target of id t costs t+1 bits (ids 2 and 3 cost 3).
HALVING = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125])).expand(4, 4)
TOKEN_BYTES = torch.tensor([1, 1, 2, 0])  # id 3 is a special token


def test_hand_computed_value() -> None:
    model = BigramModel(HALVING)
    inputs = [[0, 1, 2, 3], [3, 2, 1, 0]]
    targets = [[0, 1, 3, -1],  # the special (3) and the ignored (-1) target are left out
               [2, 2, 0, 1]]
    # graded targets 0,1,2,2,0,1 -> bits 1+2+3+3+1+2 = 12 ; bytes 1+1+2+2+1+1 = 8
    assert evaluate_bpb(model, batches_of((inputs, targets)), 1, TOKEN_BYTES) == pytest.approx(12 / 8, rel=1e-6)


def test_sums_over_steps_before_dividing() -> None:
    model = BigramModel(HALVING)
    # step 1: one target id 2 -> 3 bits / 2 bytes ; step 2: three targets id 0 -> 3 bits / 3 bytes
    pairs = [([[0]], [[2]]), ([[0, 0, 0]], [[0, 0, 0]])]
    assert evaluate_bpb(model, batches_of(*pairs), 2, TOKEN_BYTES) == pytest.approx(6 / 5, rel=1e-6)


def test_consumes_exactly_steps_batches() -> None:
    pairs = [([[0]], [[i % 3]]) for i in range(5)]
    batches = batches_of(*pairs)
    evaluate_bpb(BigramModel(HALVING), batches, 3, TOKEN_BYTES)
    assert len(list(batches)) == 2


@settings(max_examples=40, deadline=None)
@given(data=st.data(), vocab=st.integers(2, 12), steps=st.integers(1, 3))
def test_matches_token_by_token_reference(data: st.DataObject, vocab: int, steps: int) -> None:
    table = torch.tensor(data.draw(st.lists(st.lists(st.floats(-5, 5), min_size=vocab, max_size=vocab),
                                            min_size=vocab, max_size=vocab)))
    token_bytes = data.draw(st.lists(st.integers(0, 6), min_size=vocab, max_size=vocab))
    token_bytes[data.draw(st.integers(0, vocab - 1))] = 3  # at least one byte-bearing id
    rows, cols = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    ids = st.lists(st.lists(st.integers(0, vocab - 1), min_size=cols, max_size=cols), min_size=rows, max_size=rows)
    tgt = st.lists(st.lists(st.integers(-1, vocab - 1), min_size=cols, max_size=cols), min_size=rows, max_size=rows)
    pairs = [(data.draw(ids), data.draw(tgt)) for _ in range(steps)]
    pairs[0][1][0][0] = token_bytes.index(3)  # so the byte total is never zero
    got = evaluate_bpb(BigramModel(table), batches_of(*pairs), steps, torch.tensor(token_bytes))
    assert got == pytest.approx(reference_bpb(table, pairs, token_bytes), rel=1e-5)


def test_restores_training_mode() -> None:
    model = BigramModel(HALVING)
    model.train()
    evaluate_bpb(model, batches_of(([[0]], [[1]])), 1, TOKEN_BYTES)
    assert model.training


def test_bad_inputs_raise_clear_errors() -> None:
    model = BigramModel(HALVING)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        evaluate_bpb(model, batches_of(([[0]], [[1]])), 0, TOKEN_BYTES)
    with pytest.raises(ValueError, match="ran out after 1 batches"):
        evaluate_bpb(model, batches_of(([[0]], [[1]])), 2, TOKEN_BYTES)
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate_bpb(model, batches_of(([[0, 1]], [[3, -1]])), 1, TOKEN_BYTES)
    with pytest.raises(ValueError, match="outside token_bytes"):
        evaluate_bpb(model, batches_of(([[0]], [[1]])), 1, TOKEN_BYTES[:1])
    with pytest.raises(TypeError, match="token_bytes"):
        evaluate_bpb(model, batches_of(([[0]], [[1]])), 1, [1, 1, 2, 0])  # type: ignore[arg-type]


# ---- distributed: every rank returns the global value ----------------------------------------------

RANK_PAIRS = [([[0, 1]], [[2, 2]]), ([[1, 0, 0]], [[0, 1, 3]])]


def _rank_main(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = evaluate_bpb(BigramModel(HALVING), batches_of(RANK_PAIRS[rank]), 1, TOKEN_BYTES)
    except BaseException:
        compute_cleanup(wait_for_peers=False)
        raise
    compute_cleanup()


def test_all_reduces_across_ranks() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(2, port, results), nprocs=2, join=True)
        got = dict(results)
    # rank 0: ids 2,2 -> 6 bits / 4 bytes ; rank 1: ids 0,1 (3 is special) -> 3 bits / 2 bytes
    assert got[0] == got[1] == pytest.approx(9 / 6, rel=1e-6)
    assert got[0] == pytest.approx(reference_bpb(HALVING, RANK_PAIRS, TOKEN_BYTES.tolist()), rel=1e-6)
