"""generate.py: padding, positions, sampling filters, stopping, streaming (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from doge_export.errors import DogeExportError
from doge_export.generate import (
    GenerateConfig, apply_repetition_penalty, filter_top_k_top_p, generate, left_pad, prompt_positions, sample,
)
from doge_export.spec import ModelInfo

INFO = ModelInfo(vocab_size=10, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=4, capacity=8,
                 keep_window_size=8, max_prompt=6, max_context=16, eos_token_id=(1,), pad_token_id=2)


class ScriptedRunner:
    """A runner whose logits make token `plan[row][step]` the argmax; records what it is fed."""

    def __init__(self, plan):
        self.info, self.plan, self.fed, self.step_no = INFO, plan, [], 0

    def logits(self):
        out = np.zeros((len(self.plan), INFO.vocab_size), np.float32)
        for row, tokens in enumerate(self.plan):
            out[row, tokens[min(self.step_no, len(tokens) - 1)]] = 5.0
        return out

    def prefill(self, ids, mask, pos):
        self.fed.append(("prefill", ids.copy(), mask.copy(), pos.copy()))
        return self.logits()

    def step(self, ids, pos):
        self.step_no += 1
        self.fed.append(("step", ids.copy(), pos.copy()))
        return self.logits()


def test_left_pad_and_positions_follow_transformers():
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=2)
    assert ids.tolist() == [[5, 6, 7], [2, 2, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert prompt_positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_stop_id_ends_a_row_and_finished_rows_are_fed_pad():
    runner = ScriptedRunner([[4, 1, 7, 7], [3, 5, 6, 8]])  # row 0 stops at its 2nd token
    result = generate(runner, [[5, 6], [7]], GenerateConfig(max_new_tokens=4))
    assert result.tokens == [[4, 1], [3, 5, 6, 8]]
    steps = [f for f in runner.fed if f[0] == "step"]
    # as in transformers: the stop token itself is fed once, then the finished row is fed pad (2)
    assert [s[1][0, 0] for s in steps] == [4, 1, 2]
    assert [s[2][:, 0].tolist() for s in steps] == [[2, 1], [3, 2], [4, 3]]  # positions per row


def test_all_rows_stopped_ends_generation():
    runner = ScriptedRunner([[1], [1]])
    result = generate(runner, [[5], [6]], GenerateConfig(max_new_tokens=10))
    assert result.tokens == [[1], [1]] and runner.step_no == 0


def test_empty_stop_ids_never_stop():
    runner = ScriptedRunner([[1]])
    assert generate(runner, [[5]], GenerateConfig(max_new_tokens=5, stop_ids=())).tokens == [[1] * 5]


def test_streaming_callback_sees_every_step():
    seen = []
    runner = ScriptedRunner([[4, 5, 1]])
    generate(runner, [[3]], GenerateConfig(max_new_tokens=6), on_token=lambda s, t, f: seen.append((s, int(t[0]), bool(f[0]))))
    assert seen == [(0, 4, False), (1, 5, False), (2, 1, True)]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([[2.0, -2.0, 1.0]], np.float32)
    out = apply_repetition_penalty(logits, [[0, 1]], 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_top_k_keeps_k_best():
    logits = np.array([[1.0, 4.0, 3.0, 2.0]])
    out = filter_top_k_top_p(logits, top_k=2, top_p=1.0)
    assert np.isfinite(out).tolist() == [[False, True, True, False]]


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    out = filter_top_k_top_p(np.log(probs), top_k=0, top_p=0.79)
    assert np.isfinite(out).tolist() == [[True, True, False, False]]
    out = filter_top_k_top_p(np.log(probs), top_k=0, top_p=0.81)
    assert np.isfinite(out).tolist() == [[True, True, True, False]]


def test_sampling_is_reproducible_with_a_seed_and_respects_filters():
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]] * 64, np.float32))
    cfg = GenerateConfig(do_sample=True, top_k=2, seed=3)
    a = sample(logits, [[]] * 64, cfg, np.random.default_rng(3))
    b = sample(logits, [[]] * 64, cfg, np.random.default_rng(3))
    assert a.tolist() == b.tolist()
    assert set(a.tolist()) == {0, 1}  # only the top 2 can come out


def test_temperature_zero_is_greedy():
    logits = np.array([[0.1, 0.9, 0.3]], np.float32)
    cfg = GenerateConfig(do_sample=True, temperature=0.0)
    assert sample(logits, [[]], cfg, np.random.default_rng(0)).tolist() == [1]


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
])
def test_invalid_config_values(kwargs, message):
    with pytest.raises(DogeExportError, match=message):
        GenerateConfig(**kwargs)


@pytest.mark.parametrize("prompts,message", [
    ([[1, 2, 3, 4, 5, 6, 7]], "max prompt length 6"), ([[3, 10]], "outside the vocabulary"),
    ([[]], "empty"), ([], "no prompt"),
])
def test_bad_prompts(prompts, message):
    with pytest.raises(DogeExportError, match=message):
        generate(ScriptedRunner([[4]]), prompts, GenerateConfig(max_new_tokens=1))


def test_context_limit():
    with pytest.raises(DogeExportError, match="max context 16"):
        generate(ScriptedRunner([[4]]), [[3] * 6], GenerateConfig(max_new_tokens=11))
