"""The tokenizer, specified against two oracles: rustbpe (training) and tiktoken (encoding)."""

from __future__ import annotations

import itertools
import json
import os
import random
import string
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rustbpe
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nanochat_rs.tokenizer import DEFAULT_PATTERN, SPECIAL_TOKENS, Tokenizer, get_tokenizer

N_SPECIAL = len(SPECIAL_TOKENS)

# Text that exercises every branch of the split pattern: contractions (incl. the case-folded 'ſ'),
# letters with a leading space or punctuation, 1-2 digit number runs, punctuation runs followed by
# newlines, whitespace runs of all kinds (incl. Unicode spaces), emoji and other scripts.
FRAGMENTS = ["'s", "'S", "'ll", "'VE", "'re", "'ſ", "'d", "'t", "'m", " the", " cat", "hello", "HTML", "über",
             "Straße", "ñandú", "中文", "日本語", "١٢٣", "½", "2024", "7", "42", "3.14", " ,", "!!", "...\n",
             " (x)", "\n", "\r\n", "\n\n", "  ", "   ", "\t", "\u00a0", "\u2003", "\u0085", "🎉", "👍🏽",
             "😀😀", " ", "a", "-", "_", "'", '"']
texts_strategy = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=40).map("".join)
corpus_strategy = st.lists(texts_strategy, min_size=1, max_size=12)


def rustbpe_ranks(docs: list[str], vocab_size: int, pattern: str) -> dict[bytes, int]:
    oracle = rustbpe.Tokenizer()
    oracle.train_from_iterator(iter(docs), vocab_size - N_SPECIAL, pattern=pattern)
    return {bytes(token): rank for token, rank in oracle.get_mergeable_ranks()}


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    docs = [
        "The quick brown fox jumps over the lazy dog. It's 2024, and we'll see 12345 numbers!\n",
        "Unicode: ñandú über Straße 中文 🎉🎉 — and   spaces\t\ttabs\r\n",
        "def f(x):\n    return x ** 2  # they're squares\n\n\n",
    ] * 30
    return Tokenizer.train(docs, vocab_size=256 + N_SPECIAL + 300)


# ---- training: identical merges to rustbpe --------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=corpus_strategy, num_merges=st.integers(0, 60))
def test_training_gives_exactly_rustbpes_merges(docs: list[str], num_merges: int) -> None:
    vocab_size = 256 + N_SPECIAL + num_merges
    if not any(docs):
        with pytest.raises(ValueError, match="empty corpus"):
            Tokenizer.train(docs, vocab_size)
        return
    ours = Tokenizer.train(docs, vocab_size)
    assert ours.mergeable_ranks() == rustbpe_ranks(docs, vocab_size, DEFAULT_PATTERN)


def test_training_on_real_sized_text_matches_rustbpe() -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "iota", "kappa", "lambda"]
    docs = [" ".join(words[(i * j) % len(words)] for j in range(50)) + f" {i}\n" for i in range(400)]
    ours = Tokenizer.train(docs, 256 + N_SPECIAL + 200)
    assert ours.mergeable_ranks() == rustbpe_ranks(docs, 256 + N_SPECIAL + 200, DEFAULT_PATTERN)


def test_custom_pattern_matches_rustbpe() -> None:
    pattern = r"\p{L}+|\p{N}+|[^\p{L}\p{N}]+"
    docs = ["abc abc 123 123 abd!!"] * 5 + ["hello world"] * 3
    ours = Tokenizer.train(docs, 256 + N_SPECIAL + 15, pattern=pattern)
    assert ours.pattern == pattern
    assert ours.mergeable_ranks() == rustbpe_ranks(docs, 256 + N_SPECIAL + 15, pattern)


def test_arrow_input_trains_like_python_strings() -> None:
    docs = ["one two three", "two three four", None, "three four five 55"] * 10
    from_list = Tokenizer.train([d or "" for d in docs], 256 + N_SPECIAL + 25)
    chunked = pa.chunked_array([pa.array(docs[:17]), pa.array(docs[17:])])
    assert Tokenizer.train(chunked, 256 + N_SPECIAL + 25).mergeable_ranks() == from_list.mergeable_ranks()
    per_batch = [pa.array(docs[:17], type=pa.large_string()), pa.array(docs[17:], type=pa.string_view())]
    assert Tokenizer.train(per_batch, 256 + N_SPECIAL + 25).mergeable_ranks() == from_list.mergeable_ranks()
    dictionary = pa.array(docs).dictionary_encode()  # how parquet hands out dictionary columns
    assert Tokenizer.train(dictionary, 256 + N_SPECIAL + 25).mergeable_ranks() == from_list.mergeable_ranks()
    sliced = pa.array(["zz", *docs[:-1]]).slice(1)  # a non-zero array offset
    mixed = [sliced, docs[-1]]
    assert Tokenizer.train(mixed, 256 + N_SPECIAL + 25).mergeable_ranks() == from_list.mergeable_ranks()


def test_doc_cap_and_max_chars_limit_what_is_read() -> None:
    capped = Tokenizer.train(["abcabc" + "xyxyxy" * 50], 256 + N_SPECIAL + 2, doc_cap=6)
    assert b"ab" in capped.mergeable_ranks()
    assert b"xy" not in capped.mergeable_ranks()
    limited = Tokenizer.train(["aaaa"] * 3 + ["zzzz"] * 100, 256 + N_SPECIAL + 1, max_chars=8)
    assert b"aa" in limited.mergeable_ranks() and b"zz" not in limited.mergeable_ranks()


def test_an_exception_in_progress_stops_training_at_once() -> None:
    # Ctrl-C (or any exception from the progress callback) ends the merge phase at that report: the
    # exception propagates and no further merges are reported (the Rust side stops merging at the
    # same point: see train.rs `progress_can_stop_training_early`).
    rng = random.Random(0)
    docs = [" ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 12)))
                     for _ in range(100)) for _ in range(200)]

    class Stop(Exception):
        pass

    merge_reports: list[int] = []

    def interrupt(phase: str, done: int, total: int) -> None:
        if phase == "merge":
            merge_reports.append(done)
            raise Stop

    with pytest.raises(Stop):
        Tokenizer.train(docs, 256 + N_SPECIAL + 5_000, progress=interrupt)
    assert len(merge_reports) == 1 and merge_reports[0] < 5_000


def test_train_with_stats_reports_what_was_read() -> None:
    docs = ["héllo 🎉 wörld", "abc" * 10, "ñ", "not read: past the budget"]
    capped = [d[:6] for d in docs[:3]]  # 6 + 6 + 1 chars: the third crosses the budget of 13 and is read
    _, read = Tokenizer.train_with_stats(docs, 256 + N_SPECIAL + 5, doc_cap=6, max_chars=13)
    assert read == (3, sum(map(len, capped)), sum(len(c.encode()) for c in capped))


def test_progress_is_reported() -> None:
    seen: list[tuple[str, int, int]] = []
    Tokenizer.train(["hello world"] * 10, 256 + N_SPECIAL + 5, progress=lambda *a: seen.append(a))
    assert ("merge", 5, 5) in seen
    assert any(phase == "count" for phase, _, _ in seen)


# ---- encoding: bit-identical to tiktoken -----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(text=texts_strategy)
def test_encoding_is_identical_to_tiktoken(trained: Tokenizer, text: str) -> None:
    assert trained.encode(text) == trained.to_tiktoken().encode_ordinary(text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_encoding_arbitrary_unicode_is_identical_to_tiktoken(trained: Tokenizer, text: str) -> None:
    assert trained.encode(text) == trained.to_tiktoken().encode_ordinary(text)


# Long runs of letters or whitespace are single chunks of more than 64 bytes, which the encoder merges
# with a heap instead of tiktoken's rescan: the result must still be tiktoken's. The tokenizer is
# trained on such runs so that merges of merges (aa -> aaaa -> ...) happen inside them.
RUN_PIECES = ["ab", "the", "a", "e", "aab", "é", " ", "\n", "ing"]
long_chunks_strategy = st.lists(st.tuples(st.sampled_from(RUN_PIECES), st.integers(1, 80)), min_size=1,
                                max_size=6).map(lambda runs: "".join(piece * count for piece, count in runs))


@pytest.fixture(scope="module")
def runs_tokenizer() -> Tokenizer:
    docs = [piece * count + " " + piece * (count + 1) for piece in RUN_PIECES for count in (2, 3, 4, 5, 8, 16, 33)]
    return Tokenizer.train(docs * 4, vocab_size=256 + N_SPECIAL + 150)


@settings(max_examples=150, deadline=None)
@given(text=long_chunks_strategy)
def test_long_chunks_encode_identically_to_tiktoken(runs_tokenizer: Tokenizer, text: str) -> None:
    assert runs_tokenizer.encode(text) == runs_tokenizer.to_tiktoken().encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(texts_strategy, st.text(max_size=200)))
def test_decode_inverts_encode(trained: Tokenizer, text: str) -> None:
    assert trained.decode(trained.encode(text)) == text


def test_batch_flat_and_arrow_encodings_agree(trained: Tokenizer) -> None:
    texts = ["The quick brown fox", "", "über 🎉 12345", "it's  \n\n  done"] * 5
    bos = trained.bos_token_id
    batch = trained.encode(texts, prepend="<|bos|>", num_threads=2)
    assert batch == [[bos, *trained.encode(t)] for t in texts]
    tokens, offsets = trained.encode_flat(texts, prepend=bos)
    assert tokens.dtype.name == "uint32" and offsets.dtype.name == "int64"
    assert [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(texts))] == batch
    chunked = pa.chunked_array([pa.array(texts[:7]), pa.array(texts[7:])])
    a_tokens, a_offsets = trained.encode_arrow(chunked, prepend="<|bos|>")
    assert a_tokens.tolist() == tokens.tolist() and a_offsets.tolist() == offsets.tolist()


def test_arrow_encoding_of_sliced_nullable_and_dictionary_columns(trained: Tokenizer, tmp_path) -> None:
    texts = ["zero", None, "two 22", "", "four four", None, "six 🎉"]
    expected = trained.encode([t or "" for t in texts], prepend="<|bos|>")

    def docs(array) -> list[list[int]]:
        tokens, offsets = trained.encode_arrow(array, prepend="<|bos|>")
        assert len(offsets) == len(array) + 1
        return [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(array))]

    for kind in (pa.string(), pa.large_string()):
        assert docs(pa.array(texts, kind).slice(2, 4)) == expected[2:6]
        chunked = pa.chunked_array([pa.array(texts[:3], kind), pa.array(texts[3:], kind)]).slice(1, 5)
        assert docs(chunked) == expected[1:6]
    pq.write_table(pa.table({"text": texts}), tmp_path / "dict.parquet")
    column = pq.read_table(tmp_path / "dict.parquet", read_dictionary=["text"]).column("text")
    assert pa.types.is_dictionary(column.type)
    assert docs(column) == expected


def test_prepend_append_and_specials(trained: Tokenizer) -> None:
    specials = trained.special_tokens()
    assert list(specials) == list(SPECIAL_TOKENS)
    assert sorted(specials.values()) == list(range(trained.vocab_size - N_SPECIAL, trained.vocab_size))
    ids = trained.encode("hi", prepend="<|bos|>", append=trained.encode_special("<|assistant_end|>"))
    assert ids[0] == trained.bos_token_id and ids[-1] == specials["<|assistant_end|>"]
    assert trained.decode([trained.bos_token_id]) == "<|bos|>"


def test_token_bytes_come_from_raw_rank_bytes(trained: Tokenizer) -> None:
    lengths = trained.token_bytes()
    ranks = trained.mergeable_ranks()
    assert len(lengths) == trained.vocab_size
    assert all(lengths[rank] == len(token) for token, rank in ranks.items())
    assert lengths[-N_SPECIAL:] == [0] * N_SPECIAL
    # A merge that is not valid UTF-8 on its own still has its true byte length.
    assert any(lengths[rank] > 0 and not _is_utf8(token) for token, rank in ranks.items())


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_tiktoken_export_has_specials_after_merges(trained: Tokenizer) -> None:
    enc = trained.to_tiktoken()
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.n_vocab == trained.vocab_size
    text = "<|bos|>hello"
    assert enc.encode(text, allowed_special="all")[0] == trained.bos_token_id


# ---- persistence ---------------------------------------------------------------------------------


def test_save_load_round_trip(trained: Tokenizer, tmp_path) -> None:
    trained.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.mergeable_ranks() == trained.mergeable_ranks()
    assert loaded.pattern == trained.pattern and loaded.vocab_size == trained.vocab_size
    text = "über 🎉 it's 12345 numbers\n\n  end"
    assert loaded.encode(text) == trained.encode(text)
    # The ranks file is standard tiktoken format.
    from tiktoken.load import load_tiktoken_bpe

    assert load_tiktoken_bpe(str(tmp_path / "tok" / "ranks.tiktoken")) == trained.mergeable_ranks()


def test_load_errors_are_clear(tmp_path, trained: Tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer") as missing:
        Tokenizer.load(tmp_path / "missing")
    # wheels ship no scripts/: the message names the installed command
    assert "nanochat-tok-train" in str(missing.value) and "scripts/" not in str(missing.value)
    trained.save(tmp_path / "tok")
    (tmp_path / "tok" / "ranks.tiktoken").write_text("not base64 at all!\n")
    with pytest.raises(ValueError, match="does not match"):  # the metadata records the ranks' sha256
        Tokenizer.load(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    del meta["ranks_sha256"]  # as saved before the hash was recorded: the lines are parsed
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="corrupt line 1"):
        Tokenizer.load(tmp_path / "tok")
    (tmp_path / "tok" / "ranks.tiktoken").write_text("YQ== first\n")
    with pytest.raises(ValueError, match="corrupt line 1"):
        Tokenizer.load(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps({**meta, "ranks_sha256": "../x"}))
    with pytest.raises(ValueError, match="malformed ranks_sha256"):
        Tokenizer.load(tmp_path / "tok")
    with pytest.raises(ValueError, match="token 256 repeats the bytes of token 97"):
        Tokenizer([bytes([b]) for b in range(256)] + [b"a"])  # ambiguous ranks, as a bad file would give
    (tmp_path / "tok" / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="corrupt tokenizer metadata"):
        Tokenizer.load(tmp_path / "tok")


class _Crash(BaseException):
    """The process dies here: nothing after it runs, not even cleanup handlers."""


@contextmanager
def _dies_at_file_operation(monkeypatch: pytest.MonkeyPatch, crash_at: int) -> Iterator[None]:
    """Every rename, replace and unlink before the `crash_at`-th one happens; that one and all later
    ones raise _Crash (a dead process renames and removes nothing more)."""
    calls = itertools.count()
    for name in ("replace", "rename", "unlink", "rmdir"):
        real = getattr(os, name)

        def dying(*args, _real=real, **kwargs):
            if next(calls) >= crash_at:
                raise _Crash
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, dying)
    try:
        yield
    finally:
        monkeypatch.undo()


def test_a_save_over_a_tokenizer_that_dies_midway_leaves_one_complete_pair(tmp_path, monkeypatch) -> None:
    # Different vocabulary sizes, so that the ranks of one with the metadata of the other do not load.
    old = Tokenizer.train(["the cat sat on the mat"] * 5, 256 + N_SPECIAL + 10)
    new = Tokenizer.train(["a dog ran in the park, 12 times"] * 5, 256 + N_SPECIAL + 20)
    clean = tmp_path / "clean"
    new.save(clean)
    for crash_at in itertools.count():
        assert crash_at < 100, "a save should not take a hundred file operations"
        directory = tmp_path / f"tok{crash_at}"
        old.save(directory)
        completed = False
        with _dies_at_file_operation(monkeypatch, crash_at):
            try:
                new.save(directory)
                completed = True
            except _Crash:
                pass
        loaded = Tokenizer.load(directory).mergeable_ranks()
        assert loaded in (old.mergeable_ranks(), new.mergeable_ranks()), f"crash at operation {crash_at}"
        if completed:
            assert loaded == new.mergeable_ranks()
        new.save(directory)  # the next save leaves nothing of the interrupted one behind
        assert sorted(os.listdir(directory)) == sorted(os.listdir(clean))
        assert Tokenizer.load(directory).mergeable_ranks() == new.mergeable_ranks()
        if completed:
            break


def test_load_never_mixes_the_files_of_two_saves(tmp_path) -> None:
    # Same size and pattern: the two metadata files differ only in what identifies the ranks.
    one = Tokenizer.train(["the cat sat on the mat"] * 5, 256 + N_SPECIAL + 10)
    other = Tokenizer.train(["a dog ran in the park"] * 5, 256 + N_SPECIAL + 10)
    assert one.vocab_size == other.vocab_size and one.mergeable_ranks() != other.mergeable_ranks()
    one.save(tmp_path / "a")
    other.save(tmp_path / "b")
    (tmp_path / "b" / "ranks.tiktoken").replace(tmp_path / "a" / "ranks.tiktoken")
    with pytest.raises(ValueError, match="does not match"):
        Tokenizer.load(tmp_path / "a")


def test_get_tokenizer_only_loads(tmp_path, trained: Tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="nanochat-tok-train") as missing:
        get_tokenizer(tmp_path / "none")
    assert "python -m nanochat_rs.tok_train" in str(missing.value) and "\n" not in str(missing.value)
    assert not (tmp_path / "none").exists()
    trained.save(tmp_path / "tok")
    assert get_tokenizer(tmp_path / "tok").mergeable_ranks() == trained.mergeable_ranks()


# ---- a split pattern that does not cover the text --------------------------------------------------


def test_a_pattern_that_skips_text_warns_once_with_the_bytes_dropped() -> None:
    docs = ["abc 123 déf", "xyz 45"] * 3  # the letters are 7 of 12 bytes, then 3 of 6
    with pytest.warns(UserWarning, match=r"did not match 24 of 54 bytes") as record:
        Tokenizer.train(docs, 256 + N_SPECIAL + 5, pattern=r"\p{L}+")
    assert len(record) == 1


@pytest.mark.parametrize("pattern", [None, r"\p{L}+|\p{N}+|[^\p{L}\p{N}]+"])
def test_a_pattern_that_covers_the_text_does_not_warn(pattern: str | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Tokenizer.train(["abc 123 déf", "xyz 45\n\n"], 256 + N_SPECIAL + 5, pattern=pattern)


# ---- bad input: clear Python exceptions, never a panic ---------------------------------------------


def test_vocab_size_too_small() -> None:
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train(["abc"], 264)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        Tokenizer.train(["abc"], "300")  # type: ignore[arg-type]


def test_non_str_items() -> None:
    with pytest.raises(TypeError, match=r"texts\[1\] must be str, got int"):
        Tokenizer.train(["ok", 3, "ok"], 300)
    with pytest.raises(TypeError, match="not a single str"):
        Tokenizer.train("just one string", 300)
    with pytest.raises(TypeError, match="must hold strings"):
        Tokenizer.train(pa.array([1, 2, 3]), 300)


def test_empty_corpus() -> None:
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train([], 300)
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train(["", ""], 300)


def test_invalid_pattern() -> None:
    with pytest.raises(ValueError, match="invalid split pattern"):
        Tokenizer.train(["abc"], 300, pattern="(unclosed")


def test_unknown_special_token(trained: Tokenizer) -> None:
    with pytest.raises(ValueError, match="unknown special token '<|nope|>'"):
        trained.encode_special("<|nope|>")
    with pytest.raises(ValueError, match="prepend must be"):
        trained.encode("x", prepend=10**9)


def test_out_of_range_ids_in_decode(trained: Tokenizer) -> None:
    with pytest.raises(ValueError, match=f"token id {trained.vocab_size} is not in the vocabulary"):
        trained.decode([1, trained.vocab_size])
    with pytest.raises(ValueError, match="token id -1 is not in the vocabulary"):
        trained.decode([-1])
    with pytest.raises(TypeError, match="iterable of int"):
        trained.decode(["a"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="iterable of int"):
        trained.decode([104.7, 105])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not str"):
        trained.decode("104")  # type: ignore[arg-type]
    assert trained.decode(np.array([104, 105], np.uint32)) == trained.decode([104, 105]) == "hi"


def test_bad_encode_arguments(trained: Tokenizer) -> None:
    with pytest.raises(TypeError, match="str or a list of str"):
        trained.encode(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[0\] must be str"):
        trained.encode([b"bytes"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="num_threads"):
        trained.encode(["a"], num_threads=0)


@pytest.mark.parametrize("encode", [lambda tok, text: tok.encode(text), lambda tok, text: tok.encode(["ok", text]),
                                    lambda tok, text: tok.encode_flat(["ok", text])])
def test_text_with_a_lone_surrogate_is_refused_in_plain_words(trained: Tokenizer,
                                                             encode: Callable[[Tokenizer, str], object]) -> None:
    """A JSON "\\udc80" escape or surrogateescape-decoded input reaches encode as a lone surrogate."""
    with pytest.raises(ValueError, match=r"unpaired surrogate '\\udc80' at character 3, which is not valid Unicode"):
        encode(trained, "abc\udc80d")


# ---- the tok_train job's report -------------------------------------------------------------------------


def _slow_bytes_read(shards, chars: int, doc_cap: int) -> int:
    """Oracle: walk the documents as Python str, each capped, until the char budget is spent."""
    total, remaining = 0, chars
    for shard in shards:
        for text in pq.read_table(shard).column("text").to_pylist():
            if remaining <= 0:
                return total
            text = (text or "")[:doc_cap]
            total += len(text.encode("utf-8"))
            remaining -= len(text)
    return total


@pytest.mark.parametrize("max_chars, chars_read", [(1, 12), (30, 34), (10**9, 46)])
def test_training_report_counts_the_bytes_actually_read(tmp_path, max_chars: int, chars_read: int) -> None:
    # Capped at 12 chars the training documents have 12, 0, 0, 12, 10 and 12 chars; the document
    # that crosses the budget is read whole.
    from nanochat_rs.tok_train import train_on_shards

    shards = []
    for i, docs in enumerate([["héllo wörld 🎉🎉", None, "", "abc " * 20], ["ñandú über", "x" * 50],
                              ["validation text ünïcode"]]):
        shards.append(tmp_path / f"shard_{i:05d}.parquet")
        pq.write_table(pa.table({"text": pa.array(docs, pa.string())}), shards[-1], row_group_size=2)
    tokenizer, report = train_on_shards(shards[:-1], shards[-1], 256 + N_SPECIAL + 10, max_chars, doc_cap=12,
                                        show_progress=False)
    assert report.chars == chars_read
    assert report.bytes == _slow_bytes_read(shards[:-1], report.chars, 12)
    val = "validation text ünïcode"
    assert report.val_bytes_per_token == len(val.encode()) / len(tokenizer.encode(val))
