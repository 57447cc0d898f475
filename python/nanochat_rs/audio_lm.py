"""Audio-conditioned language modelling (W1): encoder features -> `audio.Projector` -> GPT soft-token prefix.

A row is the model's `sequence_len` positions: `audio_len` audio soft tokens, then `text_len` text
tokens. Inputs hold only the text `(B, text_len)`; targets are either `(B, text_len)` or the full
`(B, sequence_len)` with -1 over the audio positions (GPT.forward pads the short form itself). Rows
come from two places, in the same shape:

- `AudioLM.text_loader`: the pretraining loader with `audio_prefix_len=audio_len`, so the packer
  leaves room for the prefix (best-fit rows of text; the caller supplies the features of each row);
- `AudioLM.text_rows`: one (features, transcript) pair per row, for audio paired with its text.

Audio has a fixed number of encoder frames per row (Whisper pads every clip to 30 s = 1500 frames),
hence a fixed `audio_len = projector.num_tokens(num_frames)`.

Example: learn to recognise spoken words. Each synthetic clip is one of 8 words (token ids 1-8),
each word a sound of its own, heard through noise for all 32 frames; the transcript is that word.
Without listening the loss cannot go below ln(8) = 2.08; listening, it falls towards 0 (40 steps,
seconds on a CPU):

>>> import torch
>>> from nanochat_rs.audio import Projector
>>> from nanochat_rs.audio_lm import AudioLM
>>> from nanochat_rs.gpt import GPTConfig, build_model
>>> _ = torch.manual_seed(0)
>>> config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
...                    window_pattern="L")
>>> model = AudioLM(build_model(config, "cpu"), Projector(in_dim=16, n_embd=64, stack=4), num_frames=32)
>>> model.audio_len, model.text_len
(8, 8)
>>> sounds = torch.randn(9, 16)  # the sound of each word
>>> def pairs(n):  # n (features, document) pairs; documents start with BOS (id 0)
...     words = torch.randint(1, 9, (n,))
...     features = sounds[words, None, :] + 0.5 * torch.randn(n, 32, 16)
...     return features, [[0, word] for word in words.tolist()]
>>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
>>> losses = []
>>> for step in range(40):
...     features, documents = pairs(16)
...     inputs, targets = model.text_rows(documents)
...     loss = model(inputs, targets, features=features)
...     loss.backward()
...     optimizer.step()
...     optimizer.zero_grad(set_to_none=True)
...     losses.append(loss.item())
>>> losses[0] > 4.0 and sum(losses[-5:]) / 5 < 1.0
True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from nanochat_rs.audio import Projector
from nanochat_rs.dataloader import tokenizing_data_loader
from nanochat_rs.gpt import GPT

__all__ = ["AudioLM"]


class AudioLM(nn.Module):
    """A GPT that reads `num_frames` encoder frames, projected to `audio_len` soft tokens, before its text."""

    def __init__(self, gpt: GPT, projector: Projector, num_frames: int) -> None:
        super().__init__()
        if not isinstance(gpt, GPT) or not isinstance(projector, Projector):
            raise TypeError(f"need a GPT and a Projector, got {type(gpt).__name__} and {type(projector).__name__}")
        if projector.n_embd != gpt.config.n_embd:
            raise ValueError(f"the projector makes {projector.n_embd}-dim tokens, the GPT takes "
                             f"n_embd={gpt.config.n_embd}")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int):
            raise TypeError(f"num_frames must be an int, got {type(num_frames).__name__}")
        audio_len = projector.num_tokens(num_frames)
        if not 1 <= audio_len < gpt.config.sequence_len:
            raise ValueError(f"{num_frames} frames make {audio_len} audio tokens (stack={projector.stack}); a row "
                             f"of sequence_len={gpt.config.sequence_len} needs 1 to {gpt.config.sequence_len - 1} "
                             "so text still fits")
        self.gpt = gpt
        self.projector = projector
        self.num_frames = num_frames
        self.audio_len = audio_len
        self.text_len = gpt.config.sequence_len - audio_len

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, features: torch.Tensor,
                loss_reduction: str = "mean") -> torch.Tensor:
        """Logits `(B, sequence_len, vocab)` over audio and text positions, or the loss over the text
        positions when `targets` are given. `features` are `(B, num_frames, in_dim)` encoder frames."""
        if isinstance(features, torch.Tensor) and features.dim() == 3 and features.size(1) != self.num_frames:
            raise ValueError(f"features must have num_frames={self.num_frames} frames, got {features.size(1)} "
                             "(pad or trim every clip to the same length, as Whisper does)")
        if isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.size(1) != self.text_len:
            raise ValueError(f"inputs must have text_len={self.text_len} columns (sequence_len - audio_len), "
                             f"got {idx.size(1)}")
        return self.gpt(idx, targets, loss_reduction=loss_reduction, audio_features=self.projector(features))

    def text_rows(self, documents: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One row per (BOS-prefixed) document: inputs `(B, text_len)` = document[:-1] padded with
        its BOS, targets `(B, text_len)` = document[1:] padded with -1, on the model's device.
        The padding follows the document (causal attention never lets it change what came before)
        and is ignored by the loss."""
        if not documents:
            raise ValueError("documents is empty")
        inputs = torch.empty((len(documents), self.text_len), dtype=torch.long)
        targets = torch.full((len(documents), self.text_len), -1, dtype=torch.long)
        for row, document in enumerate(documents):
            tokens = list(document)
            if not 2 <= len(tokens) <= self.text_len + 1:
                raise ValueError(f"documents[{row}] has {len(tokens)} tokens; a row takes 2 to "
                                 f"{self.text_len + 1} (text_len + 1)")
            inputs[row] = tokens[0]
            inputs[row, :len(tokens) - 1] = torch.tensor(tokens[:-1])
            targets[row, :len(tokens) - 1] = torch.tensor(tokens[1:])
        device = self.gpt.get_device()
        return inputs.to(device), targets.to(device)

    def text_loader(self, tokenizer: Any, batch_size: int, split: str,
                    **kwargs: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """The pretraining loader (`dataloader.tokenizing_data_loader`) making rows for this model:
        inputs `(B, text_len)`, targets `(B, sequence_len)` with -1 over the audio prefix. Keyword
        arguments (device, data_dir, resume_state, ...) go to the loader."""
        return tokenizing_data_loader(tokenizer, batch_size, self.gpt.config.sequence_len, split,
                                      audio_prefix_len=self.audio_len, **kwargs)
