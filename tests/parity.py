"""Lock-step comparison of a runner against a reference runner (shared by the parity tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from doge_export.generate import left_pad, prompt_positions


@dataclass
class Lockstep:
    prefill_diff: float
    step_diffs: list[float] = field(default_factory=list)
    first_divergence: int | None = None  # greedy step where argmax differs (None: identical)
    top2_gap_at_divergence: float | None = None
    tokens: list[np.ndarray] = field(default_factory=list)  # the reference's greedy tokens

    @property
    def max_step_diff(self) -> float:
        return max(self.step_diffs, default=0.0)


def top2_gap(logits: np.ndarray) -> float:
    part = np.sort(logits, axis=-1)[:, -2:]
    return float((part[:, 1] - part[:, 0]).min())


def lockstep(runner, reference, prompts: list[list[int]], steps: int) -> Lockstep:
    """Feed both runners the reference's greedy tokens; compare logits and argmax every step."""
    ids, mask = left_pad(prompts, runner.info.pad_token_id or 0)
    pos = prompt_positions(mask)
    got, want = runner.prefill(ids, mask, pos), reference.prefill(ids, mask, pos)
    result = Lockstep(float(np.abs(got - want).max()))
    positions = pos[:, -1:]
    for step in range(steps + 1):
        if result.first_divergence is None and not np.array_equal(got.argmax(-1), want.argmax(-1)):
            result.first_divergence, result.top2_gap_at_divergence = step, top2_gap(want)
        tokens = want.argmax(-1)[:, None]
        result.tokens.append(tokens[:, 0])
        if step == steps:
            break
        positions = positions + 1
        got, want = runner.step(tokens, positions), reference.step(tokens, positions)
        result.step_diffs.append(float(np.abs(got - want).max()))
    return result


def varied_prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]
