"""Type stubs of the Rust extension `nanochat_rs._native` (crates/bindings).

Public code uses the wrappers `nanochat_rs.tokenizer` and `nanochat_rs.packer`; these classes are
their engines. Buffers are anything exporting the buffer protocol (numpy arrays, Arrow buffers)
with the given element type, C-contiguous.
"""

from collections.abc import Callable, Mapping
from typing import Any

from typing_extensions import Buffer

DEFAULT_PATTERN: str
"""The default split pattern (GPT-4 style with 1-2 digit numbers)."""
MAX_NUM_THREADS: int
"""Largest `num_threads` accepted by the encoder."""
PACKER_STATE_FORMAT: str
PACKER_STATE_VERSION: int

class BpeTrainer:
    """Streaming byte-level BPE trainer: feed documents in batches, then call `train` once."""

    def __init__(self, pattern: str | None = None) -> None: ...
    def add_texts(self, texts: list[str], doc_cap: int | None = None,
                  max_chars: int | None = None) -> tuple[int, int, int]:
        """Count documents; returns (documents, chars, bytes) taken."""
    def add_arrow(self, data: Buffer, offsets: Buffer, doc_cap: int | None = None,
                  max_chars: int | None = None) -> tuple[int, int, int]:
        """Count an Arrow string array (uint8 data, int32 or int64 offsets); like `add_texts`."""
    @property
    def num_unique_chunks(self) -> int: ...
    @property
    def uncovered_bytes(self) -> int:
        """Bytes of counted text that the split pattern did not match (dropped)."""
    def train(self, num_merges: int,
              progress: Callable[[int, int], object] | None = None) -> list[tuple[int, int]]:
        """Learn up to `num_merges` merges; merge i has id 256 + i."""

def merges_to_vocab(merges: list[tuple[int, int]]) -> list[bytes]:
    """Bytes of every token id for the given merges."""

class Encoder:
    """Byte-level BPE encoder (tiktoken-identical) with special tokens after the ranks."""

    def __init__(self, vocab: list[bytes], specials: list[str], pattern: str | None = None) -> None: ...
    @property
    def num_ranks(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    def special_id(self, name: str) -> int | None: ...
    def token_lengths(self) -> list[int]: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str], prepend: int | None = None, append: int | None = None,
                     num_threads: int | None = None) -> list[list[int]]: ...
    def encode_arrow(self, data: Buffer, offsets: Buffer, prepend: int | None = None,
                     num_threads: int | None = None) -> tuple[bytes, bytes]:
        """Flat little-endian uint32 tokens and int64 offsets, as bytes."""
    def encode_flat(self, texts: list[str], prepend: int | None = None,
                    num_threads: int | None = None) -> tuple[bytes, bytes]: ...
    def decode_bytes(self, ids: list[int]) -> bytes: ...

class Packer:
    """Best-fit packer, crop-shortest or pad (see nanochat_rs.packer.BestFitPacker)."""

    def __init__(self, seq_len: int, buffer_size: int = 1000, audio_prefix_len: int = 0,
                 bos_token_id: int | None = None, mode: str = "crop") -> None: ...
    @property
    def seq_len(self) -> int: ...
    @property
    def buffer_size(self) -> int: ...
    @property
    def audio_prefix_len(self) -> int: ...
    @property
    def bos_token_id(self) -> int | None: ...
    @property
    def mode(self) -> str: ...
    @property
    def finished(self) -> bool: ...
    def push(self, tokens: Buffer, offsets: Buffer, mask: Buffer | None = None) -> None:
        """uint32 tokens and int64 offsets, both 1-D; optional uint8 0/1 mask, one per token."""
    def finish(self) -> None: ...
    def pack_into(self, inputs: Buffer, targets: Buffer) -> bool:
        """Writable int64 (B, seq_len - audio_prefix_len) and (B, seq_len) buffers, filled in place."""
    def stats(self) -> dict[str, int]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
