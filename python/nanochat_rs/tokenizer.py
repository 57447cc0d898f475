"""Byte-level BPE tokenizer: Rust trainer and encoder, exportable to tiktoken.

Token ids 0..255 are the raw bytes, merges follow in the order they were learnt, and the special
tokens come last. Training and encoding run in Rust (`nanochat_rs._native`) with the GIL released;
this module only validates input and converts types. Training the project's tokenizer on the
dataset is the job of `nanochat_rs.tok_train` (`nanochat-tok-train`).

A saved tokenizer is a directory holding `ranks.tiktoken` (tiktoken's format) and `tokenizer.json`
(the pattern, the special tokens and the sha256 of the ranks file). Saving replaces both as one:
the new ranks are written under a hidden name first, then the metadata naming them by hash (the
commit), then the ranks take their place. A load that finds the metadata ahead of the ranks (a save
died between the two) completes that save, so every instant has one complete, loadable pair.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import operator
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from filelock import FileLock

from nanochat_rs import _native
from nanochat_rs.util import atomic_write, read_json

if TYPE_CHECKING:
    import pyarrow as pa
    import tiktoken

DEFAULT_PATTERN: str = _native.DEFAULT_PATTERN

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>",  # every document starts with it; also separates documents in packed rows
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the calculator tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, forced by the engine
    "<|output_end|>",
)

_FORMAT = "nanochat_rs-tokenizer"
_FORMAT_VERSION = 1
_META_FILE = "tokenizer.json"
_RANKS_FILE = "ranks.tiktoken"
_LOCK_FILE = ".tokenizer.lock"  # hidden: checkpoint fingerprints hash the visible files only
_TRAIN_HINT = "train one with `nanochat-tok-train` (or `python -m nanochat_rs.tok_train`)"
_TEXT_BATCH = 8192  # strings handed to Rust per call when training from a Python iterator

ProgressFn = Callable[[str, int, int], None]
"""progress(phase, done, total): phase "count" (done = chars so far, total = max_chars or 0) or
"merge" (done/total merges)."""


def _arrow_chunks(array: Any) -> Iterator[Any]:
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        yield from array.chunks
    else:
        yield array


def _arrow_buffers(chunk: Any) -> tuple[np.ndarray, np.ndarray]:
    """The data bytes and `len + 1` offsets of an Arrow string array, as zero-copy numpy views."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(chunk.type):  # e.g. parquet read with read_dictionary=["text"]
        chunk = chunk.dictionary_decode()
    if pa.types.is_string_view(chunk.type):
        chunk = chunk.cast(pa.large_string())
    if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
        raise TypeError(f"arrow arrays must hold strings, got type {chunk.type}")
    if chunk.null_count:
        chunk = pc.fill_null(chunk, "")  # a null document is an empty one
    _, offsets_buf, data_buf = chunk.buffers()
    offset_type = np.int32 if pa.types.is_string(chunk.type) else np.int64
    itemsize = np.dtype(offset_type).itemsize
    offsets = np.frombuffer(offsets_buf, dtype=offset_type, count=len(chunk) + 1,
                            offset=chunk.offset * itemsize) if offsets_buf is not None \
        else np.zeros(1, dtype=offset_type)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    return data, offsets


def _is_arrow_array(obj: object) -> bool:
    module = type(obj).__module__
    if not module.startswith("pyarrow"):
        return False
    import pyarrow as pa

    return isinstance(obj, pa.Array | pa.ChunkedArray)


class TextRead(NamedTuple):
    """What tokenizer training read: documents, and their chars and UTF-8 bytes after the doc_cap crop."""

    documents: int
    chars: int
    bytes: int


def _feed_trainer(trainer: Any, texts: Any, doc_cap: int | None, max_chars: int | None,
                  progress: ProgressFn | None) -> TextRead:
    """Stream `texts` into the Rust chunk counter; returns what was counted."""
    if isinstance(texts, str | bytes):
        raise TypeError("texts must be an iterable of str (or a pyarrow string array), not a single "
                        f"{type(texts).__name__}")
    items: Iterable[Any] = [texts] if _is_arrow_array(texts) else texts
    try:
        iterator = iter(items)
    except TypeError:
        raise TypeError(f"texts must be an iterable of str, got {type(texts).__name__}") from None

    total = TextRead(0, 0, 0)

    def feed(add: Callable[..., tuple[int, int, int]], *args: Any) -> bool:
        """Returns False once the char budget is spent."""
        nonlocal total
        remaining = None if max_chars is None else max_chars - total.chars
        if remaining is not None and remaining <= 0:
            return False
        read = add(*args, doc_cap=doc_cap, max_chars=remaining)
        total = TextRead(*(a + b for a, b in zip(total, read, strict=True)))
        if progress is not None:
            progress("count", total.chars, max_chars or 0)
        return True

    pending: list[str] = []
    index = 0
    for item in iterator:
        if isinstance(item, str):
            pending.append(item)
            if len(pending) >= _TEXT_BATCH:
                if not feed(trainer.add_texts, pending):
                    return total
                pending = []
        elif _is_arrow_array(item):
            if pending:
                if not feed(trainer.add_texts, pending):
                    return total
                pending = []
            for chunk in _arrow_chunks(item):
                data, offsets = _arrow_buffers(chunk)
                if not feed(trainer.add_arrow, data, offsets):
                    return total
        else:
            raise TypeError(f"texts[{index}] must be str, got {type(item).__name__}")
        index += 1
    if pending:
        feed(trainer.add_texts, pending)
    return total


class Tokenizer:
    """A trained byte-level BPE vocabulary plus the special tokens."""

    def __init__(self, vocab: Sequence[bytes], pattern: str = DEFAULT_PATTERN) -> None:
        """`vocab[i]` is the bytes of token i (i < 256: the single bytes). Prefer `train`/`load`."""
        self._vocab = list(vocab)
        self._pattern = pattern
        self._encoder = _native.Encoder(self._vocab, list(SPECIAL_TOKENS), pattern)
        self._special_ids = {name: self._encoder.special_id(name) for name in SPECIAL_TOKENS}

    # ---- training -----------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str] | pa.Array | pa.ChunkedArray | Iterable[Any], vocab_size: int,
              pattern: str | None = None, *, doc_cap: int | None = None, max_chars: int | None = None,
              progress: ProgressFn | None = None) -> Tokenizer:
        """Learn `vocab_size - 256 - len(SPECIAL_TOKENS)` merges from the documents in `texts`.

        `texts` is an iterable of str, a pyarrow string array / ChunkedArray (read in place, no
        per-string copies), or an iterable mixing str and such arrays (e.g. one array per parquet row
        group). Each document is cut to `doc_cap` chars; reading stops after about `max_chars` chars.
        Fewer merges are learnt only if the corpus runs out of pairs.

        `pattern` splits documents into the chunks that merges stay within (default: GPT-4 style).
        Text that no match of a custom pattern covers is dropped, in training as in encoding (as in
        tiktoken); training warns once (UserWarning) with the number of bytes dropped. The default
        pattern covers all text.
        """
        return cls.train_with_stats(texts, vocab_size, pattern, doc_cap=doc_cap, max_chars=max_chars,
                                    progress=progress)[0]

    @classmethod
    def train_with_stats(cls, texts: Iterable[str] | pa.Array | pa.ChunkedArray | Iterable[Any], vocab_size: int,
                         pattern: str | None = None, *, doc_cap: int | None = None, max_chars: int | None = None,
                         progress: ProgressFn | None = None) -> tuple[Tokenizer, TextRead]:
        """`train`, also returning what was read (counted by the Rust side while it reads)."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise ValueError(f"vocab_size must be at least {minimum} (256 byte tokens + "
                             f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        for name, value in (("doc_cap", doc_cap), ("max_chars", max_chars)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        pattern = DEFAULT_PATTERN if pattern is None else pattern
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
        trainer = _native.BpeTrainer(pattern)  # validates the pattern before any reading
        read = _feed_trainer(trainer, texts, doc_cap, max_chars, progress)
        if trainer.uncovered_bytes:
            warnings.warn(f"the split pattern did not match {trainer.uncovered_bytes:,} of {read.bytes:,} bytes of "
                          f"training text: that text is dropped (in training and in encoding); pattern {pattern!r}",
                          UserWarning, stacklevel=3)
        if trainer.num_unique_chunks == 0:
            raise ValueError("cannot train a tokenizer on an empty corpus: no text was found")
        num_merges = vocab_size - minimum

        def on_merge(done: int, total: int) -> None:
            if progress is not None:
                progress("merge", done, total)

        merges = trainer.train(num_merges, on_merge)
        return cls(_native.merges_to_vocab(merges), pattern), read

    # ---- vocabulary ---------------------------------------------------------------------------

    @property
    def pattern(self) -> str:
        return self._pattern

    @property
    def vocab_size(self) -> int:
        """Ordinary tokens plus special tokens."""
        return int(self._encoder.vocab_size)

    @property
    def bos_token_id(self) -> int:
        return self.encode_special("<|bos|>")

    def encode_special(self, name: str) -> int:
        try:
            return int(self._special_ids[name])
        except (KeyError, TypeError):
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_ids)

    def mergeable_ranks(self) -> dict[bytes, int]:
        return {token: rank for rank, token in enumerate(self._vocab)}

    def token_bytes(self) -> list[int]:
        """Byte length of every token id (0 for special tokens), from the raw token bytes."""
        return list(self._encoder.token_lengths())

    def id_to_token(self, token_id: int) -> str:
        return self.decode([token_id])

    # ---- encoding -----------------------------------------------------------------------------

    def _resolve(self, token: int | str | None, what: str) -> int | None:
        if token is None:
            return None
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and not isinstance(token, bool) and 0 <= token < self.vocab_size:
            return token
        raise ValueError(f"{what} must be a token id in [0, {self.vocab_size}) or a special token name, "
                         f"got {token!r}")

    def encode(self, text: str | list[str], prepend: int | str | None = None,
               append: int | str | None = None, num_threads: int | None = None) -> list[int] | list[list[int]]:
        """Encode a str (-> list of ids) or a list of str (-> list of lists, encoded in parallel).

        Special tokens inside the text are not parsed; use `prepend`/`append` (an id or a special
        token name such as "<|bos|>") to add them. With a custom split pattern, text that no match
        of the pattern covers is silently dropped (as in tiktoken); the default pattern covers all
        text. `num_threads` (lists only; default all cores) is capped at a few threads per core and
        must not exceed `_native.MAX_NUM_THREADS`.
        """
        first = self._resolve(prepend, "prepend")
        last = self._resolve(append, "append")
        try:
            if isinstance(text, str):
                ids = self._encoder.encode(text)
                return ([first] if first is not None else []) + ids + ([last] if last is not None else [])
            if isinstance(text, list):
                return self._encoder.encode_batch(text, first, last, _check_threads(num_threads))
        except UnicodeEncodeError as error:
            raise _not_unicode(error) from None
        raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")

    def encode_flat(self, texts: list[str] | pa.Array | pa.ChunkedArray, prepend: int | str | None = None,
                    num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encode many documents into (uint32 tokens, int64 offsets): document i is
        `tokens[offsets[i]:offsets[i + 1]]`. Arrow string arrays are read in place. Text, pattern
        and `num_threads` as in `encode`."""
        first = self._resolve(prepend, "prepend")
        if _is_arrow_array(texts):
            return self.encode_arrow(texts, prepend=first, num_threads=num_threads)
        if not isinstance(texts, list):
            raise TypeError(f"texts must be a list of str or a pyarrow string array, got {type(texts).__name__}")
        try:
            tokens, offsets = self._encoder.encode_flat(texts, first, _check_threads(num_threads))
        except UnicodeEncodeError as error:
            raise _not_unicode(error) from None
        return np.frombuffer(tokens, dtype=np.uint32), np.frombuffer(offsets, dtype=np.int64)

    def encode_arrow(self, array: pa.Array | pa.ChunkedArray, prepend: int | str | None = None,
                     num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encode an Arrow string column straight from its buffers: (uint32 tokens, int64 offsets)
        with `len(offsets) == len(array) + 1`. Null entries are encoded as empty documents."""
        if not _is_arrow_array(array):
            raise TypeError(f"encode_arrow takes a pyarrow string Array or ChunkedArray, got {type(array).__name__}")
        first = self._resolve(prepend, "prepend")
        token_parts: list[np.ndarray] = []
        offset_parts: list[np.ndarray] = []
        base = 0
        for chunk in _arrow_chunks(array):
            data, offsets = _arrow_buffers(chunk)
            tokens_b, offsets_b = self._encoder.encode_arrow(data, offsets, first,
                                                                _check_threads(num_threads))
            tokens = np.frombuffer(tokens_b, dtype=np.uint32)
            chunk_offsets = np.frombuffer(offsets_b, dtype=np.int64)
            token_parts.append(tokens)
            offset_parts.append(chunk_offsets[1:] + base)
            base += len(tokens)
        if len(token_parts) == 1:
            return token_parts[0], np.concatenate([np.zeros(1, np.int64), offset_parts[0]])
        all_tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, np.uint32)
        return all_tokens, np.concatenate([np.zeros(1, np.int64), *offset_parts])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids (special tokens as their names); invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, str | bytes):
            raise TypeError(f"decode takes an iterable of int token ids, not {type(ids).__name__}")
        try:
            id_list = [operator.index(i) for i in ids]  # int() would silently truncate 3.7 to 3
        except TypeError:
            raise TypeError("decode takes an iterable of int token ids") from None
        return self._encoder.decode_bytes(id_list).decode("utf-8", errors="replace")

    # ---- interop and persistence ---------------------------------------------------------------

    def to_tiktoken(self) -> tiktoken.Encoding:
        import tiktoken

        return tiktoken.Encoding(name="nanochat_rs", pat_str=self._pattern,
                                 mergeable_ranks=self.mergeable_ranks(), special_tokens=self.special_tokens())

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the tokenizer into `directory` (created if needed), replacing a tokenizer saved there
        as one unit: a process that dies midway leaves the old pair or the new one, never a mix."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        ranks = "".join(f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for rank, tok in enumerate(self._vocab))
        data = ranks.encode("ascii")
        digest = _sha256(data)
        meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "pattern": self._pattern,
                "num_ranks": len(self._vocab), "special_tokens": list(SPECIAL_TOKENS), "ranks_sha256": digest}
        with FileLock(str(path / _LOCK_FILE)):  # two savers must not interleave their steps
            staged = _staged_ranks(path, digest)
            atomic_write(staged, lambda f: f.write(data))
            atomic_write(path / _META_FILE, lambda f: f.write(json.dumps(meta, indent=2) + "\n"), mode="w")
            _complete_save(staged, path / _RANKS_FILE, digest)
            _remove_leftovers(path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        path = Path(directory)
        meta_path, ranks_path = path / _META_FILE, path / _RANKS_FILE
        if not meta_path.is_file() or not ranks_path.is_file():
            raise FileNotFoundError(f"no tokenizer in {path} (expected {_META_FILE} and {_RANKS_FILE}); "
                                    f"{_TRAIN_HINT}")
        meta, data = _read_pair(meta_path, ranks_path)
        vocab: list[bytes] = []
        for line_no, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            try:
                token_b64, rank_text = line.split()
                token = base64.b64decode(token_b64, validate=True)
                rank = int(rank_text)
            except ValueError:
                raise ValueError(f"corrupt line {line_no} in {ranks_path}: {line[:80]!r}") from None
            if rank != len(vocab):
                raise ValueError(f"{ranks_path} line {line_no}: rank {rank} out of order (expected {len(vocab)})")
            vocab.append(token)
        if len(vocab) != meta.get("num_ranks"):
            raise ValueError(f"{ranks_path} has {len(vocab)} ranks but {meta_path} says {meta.get('num_ranks')}")
        return cls(vocab, meta["pattern"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self._vocab) - 256})"


def _not_unicode(error: UnicodeEncodeError) -> ValueError:
    """A lone surrogate (a JSON "\\ud800" escape, or bytes decoded with surrogateescape) is not valid
    Unicode and has no UTF-8 form: say so instead of passing on the codec's error."""
    char = error.object[error.start:error.start + 1]
    return ValueError(f"the text holds an unpaired surrogate {char!r} at character {error.start}, which is not "
                      "valid Unicode: only valid Unicode text can be encoded")


def _check_threads(num_threads: int | None) -> int | None:
    """The upper bound is checked in Rust, which owns the thread pools."""
    if num_threads is None:
        return None
    if isinstance(num_threads, bool) or not isinstance(num_threads, int):
        raise TypeError(f"num_threads must be an int or None (all cores), got {type(num_threads).__name__}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be at least 1 (or None for all cores), got {num_threads}")
    return num_threads


# ---- the saved pair ----------------------------------------------------------------------------------


def _staged_ranks(directory: Path, digest: str) -> Path:
    """Where a save puts the new ranks before its metadata commits to them (hidden, named by hash)."""
    return directory / f".{_RANKS_FILE}.{digest}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _complete_save(staged: Path, ranks_path: Path, digest: str) -> None:
    """Move committed ranks into place. A concurrent load may have done it already (see _read_pair)."""
    try:
        os.replace(staged, ranks_path)
    except FileNotFoundError:
        if not ranks_path.is_file() or _sha256(ranks_path.read_bytes()) != digest:
            raise


def _remove_leftovers(directory: Path) -> None:
    """Remove what interrupted saves left: staged ranks and half-written temp files (hidden names
    that start with a tokenizer file's name, or a staged file's). Called under the save lock, after
    a complete save, when none of them is needed."""
    prefixes = (f".{_RANKS_FILE}.", f".{_META_FILE}.", f"..{_RANKS_FILE}.")
    for entry in directory.iterdir():
        if entry.name.startswith(prefixes):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def _read_meta(meta_path: Path) -> dict[str, Any]:
    meta = read_json(meta_path, "tokenizer metadata")
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{meta_path} is not a nanochat_rs tokenizer")
    if meta.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format version {meta.get('version')}, expected {_FORMAT_VERSION}")
    if not isinstance(meta.get("pattern"), str):
        raise ValueError(f"{meta_path} has no split pattern (a 'pattern' string)")
    if tuple(meta.get("special_tokens", ())) != SPECIAL_TOKENS:
        raise ValueError(f"{meta_path} lists special tokens {meta.get('special_tokens')}, "
                         f"expected {SPECIAL_TOKENS}")
    digest = meta.get("ranks_sha256")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ValueError(f"{meta_path} has a malformed ranks_sha256 {digest!r}")
    return meta


def _read_pair(meta_path: Path, ranks_path: Path) -> tuple[dict[str, Any], bytes]:
    """The metadata and the ranks it names. If the ranks file is older than the metadata (a save
    died after its commit), the save is completed from its staged ranks. Tokenizers saved before
    the metadata held a hash are taken as they are."""
    for _ in range(3):  # a save running alongside may replace the files between our two reads
        meta = _read_meta(meta_path)
        data = ranks_path.read_bytes()
        expected = meta.get("ranks_sha256")
        if expected is None or _sha256(data) == expected:
            return meta, data
        staged = _staged_ranks(meta_path.parent, str(expected))
        try:
            data = staged.read_bytes()
        except FileNotFoundError:
            continue
        if _sha256(data) == expected:
            with contextlib.suppress(OSError):  # read-only directory: still loadable, repaired by the next save
                _complete_save(staged, ranks_path, expected)
            return meta, data
    raise ValueError(f"{ranks_path} does not match {meta_path} (the sha256 it records): the two files come from "
                     f"different saves; {_TRAIN_HINT}")


def tokenizer_dir() -> Path:
    """Where the project's tokenizer lives: `$NANOCHAT_BASE_DIR/tokenizer`."""
    from nanochat_rs.common import base_dir

    return base_dir() / "tokenizer"


def get_tokenizer(directory: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Load the project tokenizer (default: `tokenizer_dir()`). FileNotFoundError when none was
    trained; `nanochat_rs.tok_train.load_or_train_tokenizer` trains one on the embedded corpus instead."""
    return Tokenizer.load(Path(directory) if directory is not None else tokenizer_dir())
