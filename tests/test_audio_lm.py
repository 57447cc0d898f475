"""Spec for audio_lm.py: the one W1 path from encoder features and text rows to a GPT loss."""

from __future__ import annotations

import doctest

import pytest
import torch
from nanochat_rs import audio_lm
from nanochat_rs.audio import Projector
from nanochat_rs.audio_lm import AudioLM
from nanochat_rs.dataset import embedded_corpus_dir
from nanochat_rs.gpt import GPTConfig, build_model
from nanochat_rs.tokenizer import Tokenizer

CONFIG = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")


def make_model(num_frames: int = 48, config: GPTConfig = CONFIG) -> AudioLM:
    return AudioLM(build_model(config, "cpu"), Projector(in_dim=16, n_embd=config.n_embd, stack=4), num_frames)


def test_the_docstring_example_trains_a_model_that_listens() -> None:
    """Runs the module docstring's example as written; its last line checks the loss fell well below
    what the transcripts allow without the audio."""
    (example,) = [test for test in doctest.DocTestFinder().find(audio_lm) if test.examples]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(example, clear_globs=False)
    assert result.attempted > 0 and result.failed == 0
    losses = example.globs["losses"]
    assert len(losses) == 40 and torch.isfinite(torch.tensor(losses)).all()
    assert max(losses[-5:]) < min(losses[:5])


def test_text_rows_shift_pad_and_ignore() -> None:
    model = make_model()  # text_len 20
    inputs, targets = model.text_rows([[0, 5, 6, 7], [9, *range(1, 21)]])
    assert inputs.tolist() == [[0, 5, 6] + [0] * 17, [9, *range(1, 20)]]
    assert targets.tolist() == [[5, 6, 7] + [-1] * 17, list(range(1, 21))]
    with pytest.raises(ValueError, match=r"documents\[0\] has 22 tokens"):
        model.text_rows([list(range(22))])
    with pytest.raises(ValueError, match=r"documents\[1\] has 1 tokens"):
        model.text_rows([[0, 1], [0]])
    with pytest.raises(ValueError, match="empty"):
        model.text_rows([])


def test_loader_rows_feed_the_model() -> None:
    """The pretraining loader, told the audio prefix, makes rows that fill the model's positions, and
    the loss covers the text positions only."""
    tokenizer = Tokenizer.train(["the embedded corpus is english text, numbers 0123456789."] * 10,
                                vocab_size=256 + 9 + 20)
    config = GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")
    model = make_model(config=config)
    loader = model.text_loader(tokenizer, 2, "train", data_dir=embedded_corpus_dir())
    try:
        inputs, targets, _ = next(loader)
    finally:
        loader.close()
    assert inputs.shape == (2, model.text_len) and targets.shape == (2, 32)
    assert (targets[:, :model.audio_len] == -1).all() and (targets[:, model.audio_len:] >= 0).all()
    features = torch.randn(2, 48, 16)
    with torch.no_grad():
        per_token = model(inputs, targets, features=features, loss_reduction="none").view(2, 32)
        assert not per_token[:, :model.audio_len].any() and per_token[:, model.audio_len:].all()
        assert model(inputs, features=features).shape == (2, 32, tokenizer.vocab_size)


def test_configuration_errors() -> None:
    gpt = build_model(CONFIG, "cpu")
    with pytest.raises(ValueError, match="n_embd=64"):
        AudioLM(gpt, Projector(in_dim=16, n_embd=32), 48)
    with pytest.raises(ValueError, match="needs 1 to 31"):
        AudioLM(gpt, Projector(in_dim=16, n_embd=64, stack=4), 128)  # 32 audio tokens: no room for text
    with pytest.raises(ValueError, match="needs 1 to 31"):
        AudioLM(gpt, Projector(in_dim=16, n_embd=64, stack=4), 3)
    with pytest.raises(TypeError, match="num_frames"):
        AudioLM(gpt, Projector(in_dim=16, n_embd=64), 48.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a GPT and a Projector"):
        AudioLM(gpt, torch.nn.Linear(16, 64), 48)  # type: ignore[arg-type]
    model = AudioLM(gpt, Projector(in_dim=16, n_embd=64, stack=4), 48)
    idx = torch.zeros(2, 20, dtype=torch.long)
    with pytest.raises(ValueError, match="num_frames=48"):
        model(idx, features=torch.randn(2, 44, 16))
    with pytest.raises(ValueError, match="text_len=20"):
        model(idx[:, :19], features=torch.randn(2, 48, 16))
