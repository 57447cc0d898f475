"""Spec for the audio prefix (W1): GPT.forward(..., audio_features=...) and audio.Projector.

(The float64 reference in test_gpt_reference.py checks the audio forward numerically end to end;
these tests pin each rule down on its own.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_helpers import random_gpt
from nanochat_rs.audio import Projector, stack_frames
from nanochat_rs.gpt import GPT, GPTConfig
from nanochat_rs.kv_cache import KVCache

CONFIG = GPTConfig(sequence_len=32, vocab_size=100, n_layer=3, n_head=2, n_kv_head=1, n_embd=64,
                   window_pattern="SL")
T_AUDIO, T_TEXT = 5, 12


def random_model(seed: int = 0) -> GPT:
    return random_gpt(CONFIG, seed)


def inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 100, (batch, T_TEXT), generator=generator)
    targets = torch.randint(0, 100, (batch, T_TEXT), generator=generator)
    audio = torch.randn(batch, T_AUDIO, 64, generator=generator)
    return idx, targets, audio


MODEL = random_model()


def test_logits_cover_audio_and_text_positions() -> None:
    idx, _, audio = inputs()
    assert MODEL(idx, audio_features=audio).shape == (2, T_AUDIO + T_TEXT, 100)


def test_loss_is_cross_entropy_over_text_positions_only() -> None:
    idx, targets, audio = inputs()
    with torch.no_grad():
        logits = MODEL(idx, audio_features=audio)
        expected = F.cross_entropy(logits[:, T_AUDIO:].reshape(-1, 100), targets.reshape(-1))
        torch.testing.assert_close(MODEL(idx, targets, audio_features=audio), expected)
        padded = F.pad(targets, (T_AUDIO, 0), value=-1)  # already full length: accepted as is
        torch.testing.assert_close(MODEL(idx, padded, audio_features=audio), expected)
        per_token = MODEL(idx, targets, loss_reduction="none", audio_features=audio).view(2, -1)
        assert not per_token[:, :T_AUDIO].any()
    with pytest.raises(ValueError, match="targets have length"):
        MODEL(idx, targets[:, :-1], audio_features=audio)


def capture_block_inputs(model: GPT, idx: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
    """The residual stream entering block 0, i.e. (resid_lambdas[0] + x0_lambdas[0]) * x0."""
    captured: list[torch.Tensor] = []
    handle = model.transformer.h[0].register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(idx, audio_features=audio)
    finally:
        handle.remove()
    return captured[0]


def test_audio_is_normed_and_prepended_after_smear() -> None:
    """Smear stays text-only: with audio in front, text position 0 still gets no smear and the whole
    text embedding path equals the text-only one; the audio rows are just normed."""
    with torch.no_grad():
        MODEL.smear_lambda.fill_(2.0)  # make smear large so any leak would show
    idx, _, audio = inputs()
    with_audio = capture_block_inputs(MODEL, idx, audio * 7.0)
    text_only = capture_block_inputs(MODEL, idx, None)
    scale = MODEL.resid_lambdas[0] + MODEL.x0_lambdas[0]
    torch.testing.assert_close(with_audio[:, T_AUDIO:], text_only)
    torch.testing.assert_close(with_audio[:, :T_AUDIO], scale.detach() * F.rms_norm(audio, (64,)))


def test_audio_rows_take_positions_before_the_text() -> None:
    """Make audio indistinguishable from text: switch smear off (it is text-only by design), zero the
    value embeddings (audio rows look up id 0) and feed token embeddings as the audio features. Then
    an audio forward of (a, idx) must equal the text-only forward of cat(a, idx) at every position,
    which holds only if audio sits at rotary positions 0..T_a-1, text at T_a.., and audio rows are
    normed like token embeddings."""
    model = random_model(seed=4)
    with torch.no_grad():
        model.smear_lambda.fill_(0.0)
        for table in model.value_embeds.values():
            table.weight.zero_()
    idx, _, _ = inputs()
    prefix = torch.randint(0, 100, (2, T_AUDIO), generator=torch.Generator().manual_seed(9))
    audio = model.transformer.wte.weight.detach()[prefix].float() * 3.7  # the model norms audio rows
    with torch.no_grad():
        as_audio = model(idx, audio_features=audio)
        as_text = model(torch.cat((prefix, idx), dim=1))
    # norm(3.7 * e) and norm(e) differ in the last fp32 bits (rms_norm's eps), which three layers
    # grow to ~2e-5; a wrong position or a missed norm would differ by O(0.1)
    torch.testing.assert_close(as_audio, as_text, atol=1e-4, rtol=1e-4)


def test_value_embeddings_look_up_id_zero_at_audio_positions() -> None:
    looked_up: list[torch.Tensor] = []
    handles = [table.register_forward_hook(lambda _, args, __: looked_up.append(args[0].clone()))
               for table in MODEL.value_embeds.values()]
    idx, _, audio = inputs()
    try:
        with torch.no_grad():
            MODEL(idx, audio_features=audio)
    finally:
        for handle in handles:
            handle.remove()
    assert len(looked_up) == len(MODEL.value_embeds) > 0
    for ids in looked_up:
        assert ids.shape == (2, T_AUDIO + T_TEXT)
        assert not ids[:, :T_AUDIO].any()
        assert torch.equal(ids[:, T_AUDIO:], idx)


def test_audio_input_errors() -> None:
    idx, _, audio = inputs()
    cache = KVCache(batch_size=2, num_kv_heads=1, max_seq_len=32, head_dim=32, num_layers=3, device="cpu",
                    dtype=torch.float32, n_embd=64)
    with pytest.raises(ValueError, match="KV cache"):
        MODEL(idx, kv_cache=cache, audio_features=audio)
    assert cache.get_pos() == 0
    with pytest.raises(ValueError, match="n_embd=64"):
        MODEL(idx, audio_features=audio[..., :32])
    with pytest.raises(ValueError, match="B=2"):
        MODEL(idx, audio_features=audio[:1])
    with pytest.raises(ValueError, match="T_audio"):
        MODEL(idx, audio_features=audio[0])
    with pytest.raises(TypeError, match="floating-point"):
        MODEL(idx, audio_features=audio.long())
    too_long = torch.randn(2, 10 * 32, 64)  # audio + text beyond the 10x rotary table
    with pytest.raises(ValueError, match="rotary table"):
        MODEL(idx, audio_features=too_long)


# ---- Projector ----------------------------------------------------------------------------------------


def test_stack_frames_concatenates_consecutive_frames() -> None:
    frames = torch.arange(2 * 9 * 3, dtype=torch.float32).view(2, 9, 3)
    stacked = stack_frames(frames, 4)
    assert stacked.shape == (2, 2, 12)  # the 9th frame is dropped
    for b in range(2):
        for j in range(2):
            assert torch.equal(stacked[b, j], frames[b, 4 * j:4 * j + 4].reshape(-1))
    with pytest.raises(ValueError, match="not a multiple of stack=4"):
        stack_frames(frames, 4, drop_remainder=False)
    with pytest.raises(ValueError, match="at least stack=4"):
        stack_frames(frames[:, :3], 4)
    for bad_stack in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="stack must be a positive int"):
            stack_frames(frames, bad_stack)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(B, T_frames, D\)"):
        stack_frames(frames.tolist(), 4)  # type: ignore[arg-type]


def test_projector_shapes_and_validation() -> None:
    projector = Projector(in_dim=20, n_embd=64, stack=4)
    assert [m.out_features for m in (projector.fc1, projector.fc2)] == [256, 64]  # hidden = 4 * n_embd
    assert projector(torch.randn(3, 16, 20)).shape == (3, 4, 64)
    assert projector(torch.randn(3, 18, 20)).shape == (3, 4, 64)
    assert projector.num_tokens(1500) == 375
    with pytest.raises(ValueError, match="in_dim=20"):
        projector(torch.randn(3, 16, 21))
    with pytest.raises(ValueError, match="stack"):
        Projector(in_dim=20, n_embd=64, stack=0)
    with pytest.raises(ValueError, match="not a multiple"):
        Projector(in_dim=20, n_embd=64, drop_remainder=False)(torch.randn(1, 18, 20))


def test_gradient_reaches_the_projector_through_the_gpt_loss() -> None:
    """Audio influences text predictions only through attention; the random model's non-zero output
    projections let it (a freshly initialised GPT has zero c_proj, so the first step's gradient would
    legitimately be zero)."""
    torch.manual_seed(0)
    model = random_model(seed=2)
    projector = Projector(in_dim=20, n_embd=64, stack=4)
    idx, targets, _ = inputs()
    audio = projector(torch.randn(2, 4 * T_AUDIO, 20))
    loss = model(idx, targets, audio_features=audio)
    loss.backward()
    for param in projector.parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
