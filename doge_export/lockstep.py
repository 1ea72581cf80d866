"""Lock-step comparison of a runner with a reference runner, and when a mismatch is legitimate.

Both runners get the same prompts and then the reference's greedy token at every step (teacher
forcing), so logits are compared call by call and the argmax agreement at each step is exactly
"greedy tokens identical". Two correct fp32 runtimes round differently; where a discrete decision
hangs on a difference below that noise (a keep-window or CDMoE routing near tie, logged by the
stable reference, or the reference's own top-2 logits within the tolerance) the comparison ends
there: past it the two runs legitimately follow different trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .generate import left_pad, prompt_positions

# Relative gap below which two correct fp32 runtimes may order two numbers differently: the
# activations feeding a bias or a router score already differ by up to ~1e-5 relative between
# ONNX Runtime and PyTorch (measured on Doge-20M, 8 layers), more than an ulp of the value itself.
NEAR_TIE = 1e-5

# Tie-log entries are (kind, exact, gap, rows), one per call and layer: kind "window" (keep-window
# boundary: kept vs dropped biases) or "route" (CDMoE: selected vs rejected expert scores); exact:
# some row has equal values across the boundary (decided by the documented rule); gap: the
# smallest relative difference between a kept and a dropped value that are NOT equal (inf when
# there is none); rows: the (batch row, token index) pairs whose decision rounding may flip.


def exact_ties(log: list, kind: str = "window") -> int:
    return sum(1 for k, exact, *_ in log if k == kind and exact)


def near_ties(log: list, kind: str | None = None) -> int:
    """Calls where a kept and a dropped value differ, but by less than the fp32 noise between runtimes."""
    return sum(1 for k, _, gap, *_ in log if (kind is None or k == kind) and gap <= NEAR_TIE)


def has_near_tie(entries: list) -> bool:
    """A decision that rounding may flip: a near tie, or an exact routing tie (transformers' topk
    order among equal expert scores is unspecified). Exact keep-window ties are decided by the rule."""
    return any(gap <= NEAR_TIE or (k == "route" and exact) for k, exact, gap, *_ in entries)


@dataclass
class Lockstep:
    prefill_diff: float
    step_diffs: list[float] = field(default_factory=list)
    first_divergence: int | None = None  # call (0 = prefill, s = step s) where the argmax first differs
    top2_gap_at_divergence: float | None = None  # the reference's own top-2 margin there
    tokens: list[np.ndarray] = field(default_factory=list)  # the reference's greedy tokens per call
    near_tie_calls: list[bool] = field(default_factory=list)  # per call: did a rounding-level tie occur?
    reference_finite: bool = True
    reference_scale: float = 0.0  # the reference's largest finite |logit| over all calls

    @property
    def max_step_diff(self) -> float:
        return max(self.step_diffs, default=0.0)

    @property
    def diffs(self) -> list[float]:
        return [self.prefill_diff] + self.step_diffs


def top2_gap(logits: np.ndarray) -> float:
    part = np.sort(logits, axis=-1)[:, -2:]
    return float((part[:, 1] - part[:, 0]).min())


def lockstep(runner, reference, prompts: list[list[int]], steps: int, tie_log: list | None = None,
             forced: np.ndarray | None = None) -> Lockstep:
    """Prefill, then `steps` teacher-forced steps; tie_log: the stable reference's log (reference.py).

    The tokens fed are the reference's greedy ones, or `forced` [steps, B] when given."""
    log = tie_log if tie_log is not None else []
    ids, mask = left_pad(prompts, runner.info.pad_token_id or 0)
    pos = prompt_positions(mask)
    start = len(log)
    got, want = runner.prefill(ids, mask, pos), reference.prefill(ids, mask, pos)
    result = Lockstep(float(np.abs(got.astype(np.float64) - want).max()))
    result.near_tie_calls.append(has_near_tie(log[start:]))
    positions = pos[:, -1:]
    for step in range(steps + 1):
        finite = np.isfinite(want)
        result.reference_finite &= bool(finite.all())
        result.reference_scale = max(result.reference_scale, float(np.abs(want[finite]).max(initial=0.0)))
        if result.first_divergence is None and not np.array_equal(got.argmax(-1), want.argmax(-1)):
            result.first_divergence, result.top2_gap_at_divergence = step, top2_gap(want)
        tokens = want.argmax(-1)[:, None] if forced is None or step == steps else forced[step][:, None]
        result.tokens.append(tokens[:, 0])
        if step == steps:
            break
        positions, start = positions + 1, len(log)
        got, want = runner.step(tokens, positions), reference.step(tokens, positions)
        result.step_diffs.append(float(np.abs(got.astype(np.float64) - want).max()))
        result.near_tie_calls.append(has_near_tie(log[start:]))
    return result


def first_mismatch(result: Lockstep, atol: float) -> int | None:
    """The first call whose logits differ by more than atol or whose argmax differs."""
    bad = [i for i, d in enumerate(result.diffs) if not d <= atol]
    if result.first_divergence is not None:
        bad.append(result.first_divergence)
    return min(bad, default=None)


def tie_excuse(result: Lockstep, call: int | None, atol: float) -> str | None:
    """Why a mismatch at `call` is legitimate, or None when it is not (or there is none).

    Only the call itself counts: a decision flipped by rounding changes that call's own logits
    at once (measured on Doge-20M-MoE: 1.7e-5 before the call of a 1e-6 routing gap, 2.4e-3 in it).
    """
    if call is None:
        return None
    if result.near_tie_calls[call]:
        return "a rounding-level tie at the keep-window boundary or in the CDMoE routing"
    only_argmax = result.diffs[min(call, len(result.diffs) - 1)] <= atol
    if call == result.first_divergence and only_argmax and (result.top2_gap_at_divergence or 0.0) <= atol:
        return "the reference's own top-2 logits are within the tolerance"
    return None
