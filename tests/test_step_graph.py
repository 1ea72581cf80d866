"""The step graph's speed-ups keep the model's numbers: fused projections, RoPE as a matrix with
the attention scale folded into q, and the runner options that only change scheduling."""

import numpy as np
import pytest
import torch
from torch import nn

from doge_export import state as state_module
from doge_export.backends.ort import OrtRunner
from doge_export.errors import DogeExportError
from doge_export.fused import FusedLinear
from doge_export.model import load_model
from doge_export.rope import ElementwiseRope, MatrixRope, RotaryFromPositions, rotate_half, rotate_half_matrix


def test_rotate_half_matrix_is_rotate_half_exactly():
    x = torch.randn(3, 1, 2, 16)
    assert torch.equal(x @ rotate_half_matrix(16), rotate_half(x))


@pytest.mark.parametrize("position", [5, 63, 64, 250])  # 64+: dynamic NTK frequencies
def test_matrix_rope_matches_elementwise_rope(position):
    """One new token per row, positions differing per row; the query also carries 1/sqrt(D)."""
    model = load_model("random:tiny", overrides={"max_position_embeddings": 64}).model
    rotary = RotaryFromPositions(model.config, 300)
    positions = torch.tensor([[position], [3]])
    cos, sin = rotary(positions, torch.float32)  # [B,1,D]
    D = cos.shape[-1]
    x = torch.randn(2, 1, 4, D)  # [B,S,heads,D]
    exact, matrix = ElementwiseRope(cos, sin), MatrixRope(cos, sin, fold_scale=True)
    assert matrix.query_scaled and not exact.query_scaled
    torch.testing.assert_close(matrix.key(x), exact.key(x), rtol=0, atol=2e-6)
    torch.testing.assert_close(matrix.query(x), exact.query(x) * D**-0.5, rtol=0, atol=1e-6)
    assert torch.equal(MatrixRope(cos, sin, fold_scale=False).query(x), matrix.key(x))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_matches_the_separate_layers(bias):
    layers = [nn.Linear(32, n, bias=bias) for n in (64, 16, 16)]
    x = torch.randn(2, 3, 32)
    fused = FusedLinear.of(*layers)
    for got, layer in zip(fused(x), layers):
        torch.testing.assert_close(got, layer(x), rtol=0, atol=1e-6)


def test_fused_linear_refuses_what_it_cannot_fuse():
    assert FusedLinear.of(nn.Linear(8, 4), nn.Linear(6, 4)) is None  # different inputs
    assert FusedLinear.of(nn.Linear(8, 4), nn.Identity()) is None


def test_the_graphs_hold_only_the_fused_projections(artifacts):
    manifest = artifacts("tiny", seed=1)[0]
    names = [t["name"] for t in manifest.data["weights"]["tensors"]]
    layers = manifest.info.num_layers
    assert sum(n.startswith("qkv.") for n in names) == layers, names
    assert sum(n.startswith("gate_up.") for n in names) == layers, names
    assert not any("q_proj" in n or "gate_proj" in n or "up_proj" in n for n in names), names


def _decode(runner, ids, steps=6):
    B, T = ids.shape
    logits = [runner.prefill(ids, np.ones_like(ids), np.tile(np.arange(T), (B, 1)))]
    for p in range(T, T + steps):
        logits.append(runner.step(logits[-1].argmax(-1)[:, None], np.full((B, 1), p)))
    return np.stack(logits)


def test_spinning_and_batch_specialized_sessions_give_the_same_logits(artifacts):
    """spin and the per-batch sessions (prepacked weights for batch > 1) change scheduling only."""
    manifest = artifacts("tiny", seed=1)[0]
    ids = np.random.default_rng(0).integers(3, manifest.info.vocab_size, (3, 5))
    with OrtRunner(manifest) as plain, OrtRunner(manifest, threads=2, spin=True, batch=3) as spinning:
        assert plain.session_batch == 1
        first = _decode(plain, ids)
        assert plain.session_batch == 3  # rebuilt for the batch it met
        np.testing.assert_allclose(_decode(spinning, ids), first, rtol=0, atol=1e-5)
        np.testing.assert_allclose(_decode(plain, ids[:1]), first[:, :1], rtol=0, atol=1e-5)
        # spinning workers stop when a run ends (an idle session's spinning slowed the other's runs)
        for session in (spinning.prefill_session, spinning.step_session):
            assert session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"


def test_a_step_of_another_batch_size_is_refused_with_the_expected_shape(artifacts):
    """The step's inputs are bound once per generation: a step must match the prefill's batch."""
    manifest = artifacts("tiny", seed=1)[0]
    ids = np.random.default_rng(0).integers(3, manifest.info.vocab_size, (2, 5))
    with OrtRunner(manifest) as runner:
        logits = runner.prefill(ids, np.ones_like(ids), np.tile(np.arange(5), (2, 1)))
        with pytest.raises(DogeExportError, match=r"batch 2, so it takes \[2, 1\]"):
            runner.step(logits.argmax(-1)[:1, None], np.full((1, 1), 5))
        assert runner.step(logits.argmax(-1)[:, None], np.full((2, 1), 5)).shape == (2, manifest.info.vocab_size)


def test_the_step_over_the_filled_slots_gives_what_the_step_over_all_slots_gives(artifacts, monkeypatch):
    """The runner reads only the first S slots (the filled ones and an empty one, S growing by
    WIDTH_STEP): the same logits, tokens and state as reading all C, through the growth, the full
    window and its evictions. Batch 3, left-padded prompts of 9, 3 and 6 tokens, 2 KV heads."""
    monkeypatch.setattr(state_module, "WIDTH_STEP", 4)
    manifest = artifacts("tiny", seed=3, overrides={"keep_window_size": 24})[0]
    C = manifest.info.capacity
    assert C == 24 and next(i for i in manifest.data["graphs"]["step"]["inputs"] if i["name"] == "key.0")["shape"][2] == "slots"
    rng = np.random.default_rng(3)
    ids = rng.integers(3, manifest.info.vocab_size, (3, 9))
    mask = np.ones_like(ids)
    mask[1, :6], mask[2, :3] = 0, 0
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    results = {}
    for filled in (True, False):
        with OrtRunner(manifest, batch=3) as runner:
            runner.attend_filled = filled
            logits, widths = [runner.prefill(ids, mask, positions)], [runner.state.width]
            for p in range(9, 40):  # 40 > C: the window fills and evicts
                logits.append(runner.step(logits[-1].argmax(-1)[:, None], np.full((3, 1), p)))
                widths.append(runner.state.width)
            results[filled] = np.stack(logits), runner.state.full_arrays(), widths
    (narrow, narrow_state, widths), (full, full_state, full_widths) = results[True], results[False]
    assert widths[0] == 12 and widths[-1] == C and sorted(set(widths)) == [12, 16, 20, 24], widths
    assert set(full_widths) == {C}
    assert (narrow.argmax(-1) == full.argmax(-1)).all()
    np.testing.assert_allclose(narrow, full, rtol=0, atol=1e-5)
    for name, array in full_state.items():
        np.testing.assert_allclose(narrow_state[name], array, rtol=0, atol=1e-5, err_msg=name)
