"""BOS-aligned best-fit sequence packing (Rust), written straight into caller-owned int64 buffers.

Documents (each starting with BOS) are pushed as one flat uint32 token array plus int64 offsets, as
`Tokenizer.encode_arrow` returns them. They wait in a FIFO *pending* queue and move into a *buffer*
that is topped up to `buffer_size` documents before every placement. A row holds
`C = T_text + 1` tokens (`T_text = sequence_len - audio_prefix_len`) and is filled left to right: while
space remains, place the **longest** buffered document that fits whole (ties: the earliest
arrived); when none fits, place the first `remaining` tokens of the **shortest** buffered document
(ties: the earliest arrived) and discard the rest of it. `inputs = row[:-1]`, `targets = row[1:]`;
every position is a real token. With an audio prefix, `targets` is `sequence_len` long and starts with
`audio_prefix_len` copies of -1 (the loss's ignore index).

That is `mode="crop"` (pretraining). `mode="pad"` (conversations, SFT) never cuts a document: when
none fits the rest of a row, the rest is padded (inputs BOS, targets -1). Only a document longer
than a whole row is cropped: when the row is still empty and nothing fits, the shortest buffered
document (ties: earliest) fills it and its tail is discarded. After `finish()` the last started row
is padded rather than dropped. `stats["tokens_padded"]` counts padding positions.

Documents may carry a loss mask (uint8, 0/1 per token, pushed beside the tokens): targets are -1
wherever the target token's mask is 0, in either mode.

The rows depend only on the document stream, never on how it was chunked into `push` calls:
`pack_into` is transactional. When the pending queue runs dry before the batch is complete (a
top-up cannot reach `buffer_size` documents while the stream is open), it returns False and leaves
the packer exactly as it was, so the caller pushes more documents and retries; the output buffers
then hold garbage. After `finish()` (end of stream) top-ups take whatever is left, and `pack_into`
returns False (again without changing anything) only when the buffer empties before the batch is
complete.

Packing runs in Rust with the GIL released. `state_dict()` is JSON-serialisable and
`load_state_dict()` restores it so the following rows are identical.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from nanochat_rs import _native
from nanochat_rs.util import check_int

STATE_FORMAT: str = _native.PACKER_STATE_FORMAT
STATE_VERSION: int = _native.PACKER_STATE_VERSION

SFT_BUFFER_SIZE = 100
"""Conversations buffered for best fit in pad mode (nanochat's SFT loader): conversations are few
and long next to pretraining documents, so a small buffer already packs them well."""

MODES = ("crop", "pad")


def _torch_tensor_type() -> type | None:
    # Only look at torch if the caller already imported it: this module must not require torch.
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else None


def _to_numpy(name: str, value: object) -> np.ndarray:
    """numpy arrays pass through; CPU torch tensors become numpy views sharing their memory."""
    tensor_type = _torch_tensor_type()
    if tensor_type is not None and isinstance(value, tensor_type):
        if value.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor (pinned is fine), got one on {value.device}")
        if value.requires_grad:
            raise ValueError(f"{name} must not require grad")
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"{name} must be a numpy array or a CPU torch tensor, got {type(value).__name__}")


def _input_array(name: str, value: object, dtype: type[np.generic]) -> np.ndarray:
    array = _to_numpy(name, value)
    if array.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {array.dtype} "
                        f"(convert with .astype(np.{np.dtype(dtype).name}))")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return np.ascontiguousarray(array)  # a no-op for the contiguous arrays the tokenizer returns


def _output_array(name: str, value: object, columns: int) -> np.ndarray:
    array = _to_numpy(name, value)
    if array.dtype != np.int64:
        raise TypeError(f"{name} must have dtype int64 (torch.long), got {array.dtype}")
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] != columns:
        raise ValueError(f"{name} must have shape (B, {columns}) with B >= 1, got {tuple(array.shape)}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not array.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return array


class BestFitPacker:
    """Best-fit packer, crop-shortest or pad; see the module docstring for the exact rules.

    `bos_token_id`, when given, is checked to start every pushed document; pad mode needs it (it is
    the input at padding positions) and takes no audio prefix.
    """

    def __init__(self, sequence_len: int, buffer_size: int = 1000, audio_prefix_len: int = 0,
                 bos_token_id: int | None = None, mode: str = "crop") -> None:
        sequence_len = check_int("sequence_len", sequence_len, 1)
        buffer_size = check_int("buffer_size", buffer_size, 1)
        audio_prefix_len = check_int("audio_prefix_len", audio_prefix_len, 0)
        if sequence_len <= audio_prefix_len:
            raise ValueError(f"sequence_len ({sequence_len}) must be greater than audio_prefix_len "
                             f"({audio_prefix_len}) so every row holds at least one text token")
        if bos_token_id is not None:
            bos_token_id = check_int("bos_token_id", bos_token_id, 0)
            if bos_token_id > np.iinfo(np.uint32).max:
                raise ValueError(f"bos_token_id must fit in uint32, got {bos_token_id}")
        if not isinstance(mode, str):
            raise TypeError(f"mode must be a str, got {type(mode).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "pad" and bos_token_id is None:
            raise ValueError("mode='pad' needs bos_token_id: padding positions take BOS as their input")
        if mode == "pad" and audio_prefix_len:
            raise ValueError("mode='pad' does not support an audio prefix (audio_prefix_len must be 0)")
        self._native = _native.Packer(sequence_len, buffer_size, audio_prefix_len, bos_token_id, mode)

    @property
    def sequence_len(self) -> int:
        return self._native.seq_len

    @property
    def buffer_size(self) -> int:
        return self._native.buffer_size

    @property
    def audio_prefix_len(self) -> int:
        return self._native.audio_prefix_len

    @property
    def bos_token_id(self) -> int | None:
        return self._native.bos_token_id

    @property
    def mode(self) -> str:
        """"crop" or "pad"."""
        return self._native.mode

    @property
    def text_len(self) -> int:
        """Columns of `inputs`: `sequence_len - audio_prefix_len`."""
        return self.sequence_len - self.audio_prefix_len

    @property
    def finished(self) -> bool:
        return self._native.finished

    def push(self, tokens: np.ndarray, offsets: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append documents `tokens[offsets[i]:offsets[i + 1]]` to the stream.

        `tokens` is uint32 and `offsets` int64, both 1-D; `offsets[0] == 0`,
        `offsets[-1] == len(tokens)` and offsets strictly increase (no empty documents). `mask`,
        when given, is uint8 with one 0/1 value per token (1: the token is a training target);
        None supervises every token. Invalid input raises ValueError/TypeError and adds nothing.
        """
        tokens = _input_array("tokens", tokens, np.uint32)
        offsets = _input_array("offsets", offsets, np.int64)
        if mask is not None:
            mask = _input_array("mask", mask, np.uint8)
            if mask.shape != tokens.shape:
                raise ValueError(f"mask must have one value per token ({tokens.shape[0]}), got {mask.shape[0]}")
        self._native.push(tokens, offsets, mask)

    def finish(self) -> None:
        """Mark the end of the stream; pushing afterwards raises ValueError."""
        self._native.finish()

    def pack_into(self, inputs: Any, targets: Any) -> bool:
        """Fill int64 `inputs` (B, sequence_len - audio_prefix_len) and `targets` (B, sequence_len) in place.

        Both may be numpy arrays or CPU torch tensors (pinned or not), C-contiguous, writable and
        not overlapping. Returns True when all B rows were filled. Returns False, with the packer
        state unchanged, when more documents must be pushed first (or, after `finish()`, when the
        documents left cannot complete the batch).
        """
        inputs = _output_array("inputs", inputs, self.text_len)
        targets = _output_array("targets", targets, self.sequence_len)
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs and targets must have the same number of rows, got {inputs.shape[0]} "
                             f"and {targets.shape[0]}")
        if np.may_share_memory(inputs, targets):
            raise ValueError("inputs and targets must not share memory")
        return self._native.pack_into(inputs, targets)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: docs_in, tokens_in, tokens_placed, tokens_cropped, docs_placed, docs_cropped,
        rows_packed, tokens_padded, plus docs/tokens currently buffered and pending. Every pushed
        token is placed, cropped, buffered or pending; padding positions are counted apart."""
        return self._native.stats()

    def state_dict(self) -> dict[str, Any]:
        """The full state (configuration, counters, held documents and masks as base64), JSON-serialisable."""
        return self._native.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()` taken from a packer with the same configuration.

        The state is checked in full (by the Rust packer, which owns its schema) before anything
        changes: TypeError for a value of the wrong type, ValueError for a wrong value, a state
        of another format or configuration, or counters without room left to count on.
        """
        self._native.load_state_dict(state)

    def __repr__(self) -> str:
        s = self.stats
        return (f"BestFitPacker(sequence_len={self.sequence_len}, buffer_size={self.buffer_size}, "
                f"audio_prefix_len={self.audio_prefix_len}, bos_token_id={self.bos_token_id}, mode={self.mode!r}, "
                f"buffered={s['docs_buffered']}, pending={s['docs_pending']})")
