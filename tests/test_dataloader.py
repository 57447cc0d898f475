"""Specification of the pretraining data loader (nanochat_rs.dataloader.tokenizing_data_loader).

Small parquet shards are generated per test; the expected batches are computed independently by
encoding the same documents one by one and packing them with the slow reference packer.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from nanochat_rs import dataloader
from nanochat_rs.common import DistInfo
from nanochat_rs.dataloader import rank_row_groups, tokenizing_data_loader
from nanochat_rs.tokenizer import Tokenizer
from packer_reference import ReferencePacker

WORDS = ("the cat sat on a mat while dogs ran far away into green hills and blue rivers "
         "under 12 bright stars; 345 birds sang songs of old!").split()


def random_docs(n: int, seed: int, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


def write_shards(directory: Path, shards: list[list[str]], row_group_size: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, docs in enumerate(shards):
        table = pa.table({"text": pa.array(docs, pa.string())})
        pq.write_table(table, directory / f"shard_{i:05d}.parquet", row_group_size=row_group_size)
    return directory


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(random_docs(50, seed=0), vocab_size=256 + 9 + 50)


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, list[list[str]]]:
    docs = [random_docs(30, seed=s) for s in (1, 2, 3)]
    return write_shards(tmp_path / "data", docs, row_group_size=7), docs


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    out = list(itertools.islice(loader, n))
    loader.close()
    return out


def expected_batches(tokenizer: Tokenizer, docs: list[str], n: int, B: int, T: int, audio: int = 0,
                     buffer_size: int = 1000) -> list[tuple[list, list]]:
    """The first n batches from the reference packer over the document stream, epoch after epoch."""
    encoded = [tokenizer.encode(d, prepend="<|bos|>") for d in docs]
    ref = ReferencePacker(T, buffer_size=buffer_size, audio_prefix_len=audio)
    batches = []
    while len(batches) < n:
        batch = ref.pack(B)
        if batch is None:
            ref.push(encoded)  # one more epoch
            continue
        batches.append(batch)
    return batches


def docs_of_rank(shard_docs: list[list[str]], row_group_size: int, rank: int, world: int) -> list[str]:
    groups = [g[i:i + row_group_size] for g in shard_docs for i in range(0, len(g), row_group_size)]
    return [d for g in groups[rank::world] for d in g]


def as_lists(batches) -> list[tuple[list, list]]:
    return [(x.tolist(), y.tolist()) for x, y, _ in batches]


def test_batches_match_reference_packing_of_the_train_split(tokenizer, shards) -> None:
    data_dir, docs = shards
    B, T = 3, 32
    got = take(tokenizing_data_loader(tokenizer, B, T, "train", data_dir=data_dir, buffer_size=8,
                                      tokenizer_batch_rows=5), 12)
    for inputs, targets, state in got:
        assert inputs.dtype == torch.long and targets.dtype == torch.long
        assert inputs.shape == (B, T) and targets.shape == (B, T)
        assert (inputs[:, 0] == tokenizer.bos_token_id).all()
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        json.dumps(state)
    # 60 train documents of up to 60 words: 12 batches of 96 tokens need a second epoch.
    assert as_lists(got) == expected_batches(tokenizer, docs[0] + docs[1], 12, B, T, buffer_size=8)


def test_val_split_is_the_last_shard(tokenizer, shards) -> None:
    data_dir, docs = shards
    got = take(tokenizing_data_loader(tokenizer, 2, 16, "val", data_dir=data_dir, buffer_size=4), 5)
    assert as_lists(got) == expected_batches(tokenizer, docs[2], 5, 2, 16, buffer_size=4)
    assert got[0][2]["files"] == ["shard_00002.parquet"]


def test_audio_prefix(tokenizer, shards) -> None:
    data_dir, docs = shards
    got = take(tokenizing_data_loader(tokenizer, 2, 20, "train", data_dir=data_dir, audio_prefix_len=4,
                                      buffer_size=5), 3)
    for inputs, targets, _ in got:
        assert inputs.shape == (2, 16) and targets.shape == (2, 20)
        assert (targets[:, :4] == -1).all()
        assert torch.equal(targets[:, 4:-1], inputs[:, 1:])
    assert as_lists(got) == expected_batches(tokenizer, docs[0] + docs[1], 3, 2, 20, audio=4, buffer_size=5)


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_resume_reproduces_the_following_batches(tokenizer, shards, k: int) -> None:
    data_dir, _ = shards
    kwargs = dict(data_dir=data_dir, buffer_size=6, tokenizer_batch_rows=4)
    original = take(tokenizing_data_loader(tokenizer, 2, 24, "train", **kwargs), k + 6)
    state = json.loads(json.dumps(original[k][2]))  # as stored in a checkpoint's meta.json
    resumed = take(tokenizing_data_loader(tokenizer, 2, 24, "train", resume_state=state, **kwargs), 5)
    assert as_lists(resumed) == as_lists(original[k + 1:])
    # The state describes rows, not batches: resuming with another B continues the same row stream.
    rows = torch.cat([x for x, _, _ in original[k + 1:]])
    resumed_b1 = take(tokenizing_data_loader(tokenizer, 1, 24, "train", resume_state=state, **kwargs), 10)
    assert torch.equal(torch.cat([x for x, _, _ in resumed_b1]), rows)


def test_resume_state_must_match_the_loader(tokenizer, shards) -> None:
    data_dir, _ = shards
    state = take(tokenizing_data_loader(tokenizer, 2, 24, "train", data_dir=data_dir, buffer_size=6), 1)[0][2]
    with pytest.raises(ValueError, match="split"):
        tokenizing_data_loader(tokenizer, 2, 24, "val", data_dir=data_dir, buffer_size=6, resume_state=state)
    with pytest.raises(ValueError, match="state was saved by a packer"):
        tokenizing_data_loader(tokenizer, 2, 32, "train", data_dir=data_dir, buffer_size=6, resume_state=state)
    with pytest.raises(ValueError, match="version"):
        tokenizing_data_loader(tokenizer, 2, 24, "train", data_dir=data_dir, resume_state={"version": 0})
    without_packer = {k: v for k, v in state.items() if k != "packer"}
    with pytest.raises(ValueError, match="no 'packer' state"):
        tokenizing_data_loader(tokenizer, 2, 24, "train", data_dir=data_dir, buffer_size=6,
                               resume_state=without_packer)
    bad_cursor = {**state, "cursor": {"epoch": 0, "index": 99, "row": 0}}
    with pytest.raises(ValueError, match="row group 99"):
        tokenizing_data_loader(tokenizer, 2, 24, "train", data_dir=data_dir, buffer_size=6, resume_state=bad_cursor)


def test_tiny_corpus_cycles_through_epochs(tokenizer, tmp_path) -> None:
    # Four short documents in all (fewer tokens than one batch), far fewer than buffer_size.
    docs = [["a cat", "the dog ran"], ["hills"], ["blue birds sang"]]
    data_dir = write_shards(tmp_path / "tiny", docs, row_group_size=1)
    got = take(tokenizing_data_loader(tokenizer, 4, 64, "train", data_dir=data_dir, buffer_size=50), 3)
    assert as_lists(got) == expected_batches(tokenizer, docs[0] + docs[1], 3, 4, 64, buffer_size=50)
    assert got[-1][2]["cursor"]["epoch"] > 10


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_reading_many_shards_keeps_only_one_open(tokenizer, tmp_path) -> None:
    # Real datasets have thousands of shards: keeping every file seen open would exhaust the fds.
    docs = [[f"shard {i} says hello"] for i in range(41)]
    data_dir = write_shards(tmp_path / "many", docs, row_group_size=1)
    open_before = len(list(Path("/proc/self/fd").iterdir()))
    loader = tokenizing_data_loader(tokenizer, 1, 8, "train", data_dir=data_dir, buffer_size=2,
                                    tokenizer_batch_rows=1, prefetch=1)
    epochs = 0
    for _, _, state in loader:
        epochs = state["cursor"]["epoch"]
        if epochs >= 2:
            break
    open_during = len(list(Path("/proc/self/fd").iterdir()))
    loader.close()
    assert epochs >= 2
    assert open_during - open_before < 5


def test_no_documents_is_a_clear_error(tokenizer, tmp_path) -> None:
    data_dir = write_shards(tmp_path / "empty", [[], [], []], row_group_size=4)
    loader = tokenizing_data_loader(tokenizer, 2, 16, "train", data_dir=data_dir)
    with pytest.raises(ValueError, match="no documents"):
        next(loader)


def test_single_shard_cannot_be_split(tokenizer, tmp_path) -> None:
    data_dir = write_shards(tmp_path / "one", [["a b c"]], row_group_size=4)
    with pytest.raises(ValueError, match="at least 2 shards"):
        tokenizing_data_loader(tokenizer, 2, 16, "train", data_dir=data_dir)


@pytest.mark.parametrize("kwargs, exc", [
    (dict(batch_size=0), ValueError), (dict(sequence_len=-1), ValueError), (dict(batch_size=2.5), TypeError),
    (dict(split="test"), ValueError), (dict(sequence_len=8, audio_prefix_len=8), ValueError),
    (dict(buffer_size=0), ValueError), (dict(tokenizer_batch_rows=0), ValueError),
])
def test_bad_arguments(tokenizer, shards, kwargs, exc) -> None:
    args = {"batch_size": 2, "sequence_len": 16, "split": "train", **kwargs}
    with pytest.raises(exc):
        tokenizing_data_loader(tokenizer, data_dir=shards[0], **args)


def test_ddp_ranks_read_strided_row_groups(tokenizer, shards, monkeypatch) -> None:
    data_dir, docs = shards
    files = sorted(data_dir.glob("shard_*.parquet"))[:-1]
    world = 3
    per_rank = [rank_row_groups(files, r, world) for r in range(world)]
    everything = sorted(g for groups in per_rank for g in groups)
    assert everything == sorted(set(everything)) == rank_row_groups(files, 0, 1)  # a partition
    assert per_rank[1] == rank_row_groups(files, 0, 1)[1::3]
    for rank in range(world):
        monkeypatch.setattr(dataloader, "get_dist_info", lambda r=rank: DistInfo(True, r, r, world))
        got = take(tokenizing_data_loader(tokenizer, 2, 16, "train", data_dir=data_dir, buffer_size=3), 4)
        mine = docs_of_rank(docs[:2], 7, rank, world)
        assert as_lists(got) == expected_batches(tokenizer, mine, 4, 2, 16, buffer_size=3)
        assert got[0][2]["rank"] == rank and got[0][2]["world_size"] == world


def test_more_ranks_than_row_groups_is_a_clear_error(tokenizer, tmp_path, monkeypatch) -> None:
    data_dir = write_shards(tmp_path / "small", [["a"], ["b"]], row_group_size=4)
    monkeypatch.setattr(dataloader, "get_dist_info", lambda: DistInfo(True, 1, 1, 2))
    with pytest.raises(ValueError, match="fewer row groups than there are ranks"):
        tokenizing_data_loader(tokenizer, 2, 16, "train", data_dir=data_dir)


class _FailingTokenizer:
    """Delegates to a real tokenizer but fails on the n-th encode call."""

    def __init__(self, inner: Tokenizer, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.bos_token_id = inner.bos_token_id

    def encode_arrow(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("tokenizer exploded")
        return self.inner.encode_arrow(*args, **kwargs)


def test_worker_exceptions_reach_the_consumer(tokenizer, shards) -> None:
    loader = tokenizing_data_loader(_FailingTokenizer(tokenizer, fail_at=3), 2, 16, "train", data_dir=shards[0],
                                    buffer_size=2, tokenizer_batch_rows=3)
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        for _ in range(100):
            next(loader)


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "nanochat-dataloader"]


def test_closing_stops_the_worker_thread(tokenizer, shards) -> None:
    assert not _loader_threads()
    loader = tokenizing_data_loader(tokenizer, 2, 16, "train", data_dir=shards[0], buffer_size=4, prefetch=1)
    next(loader)
    assert len(_loader_threads()) == 1
    loader.close()
    assert not _loader_threads()


def test_yielded_batches_are_not_overwritten_later(tokenizer, shards) -> None:
    # The staging slots are reused; batches already handed out must keep their contents.
    loader = tokenizing_data_loader(tokenizer, 2, 16, "train", data_dir=shards[0], buffer_size=4, prefetch=1)
    got = [next(loader) for _ in range(8)]
    snapshot = [(x.clone(), y.clone()) for x, y, _ in got]
    got += [next(loader) for _ in range(8)]
    loader.close()
    assert all(torch.equal(x, sx) and torch.equal(y, sy) for (x, y, _), (sx, sy) in zip(got, snapshot, strict=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches(tokenizer, shards) -> None:
    data_dir, _ = shards
    cpu = take(tokenizing_data_loader(tokenizer, 2, 32, "train", data_dir=data_dir, buffer_size=4), 10)
    gpu = take(tokenizing_data_loader(tokenizer, 2, 32, "train", "cuda", data_dir=data_dir, buffer_size=4), 10)
    for (x, y, s), (gx, gy, gs) in zip(cpu, gpu, strict=True):
        assert gx.is_cuda and gy.is_cuda
        assert torch.equal(x, gx.cpu()) and torch.equal(y, gy.cpu()) and s == gs


def test_documents_are_encoded_with_bos_from_arrow(tokenizer, shards) -> None:
    # Sanity check of the fixture pipeline the expectations rely on.
    texts = pa.chunked_array([pa.array(shards[1][0][:3])])
    tokens, offsets = tokenizer.encode_arrow(texts, prepend=tokenizer.bos_token_id)
    for i, doc in enumerate(shards[1][0][:3]):
        assert tokens[offsets[i]:offsets[i + 1]].tolist() == tokenizer.encode(doc, prepend="<|bos|>")
    assert np.all(np.diff(offsets) > 0)
